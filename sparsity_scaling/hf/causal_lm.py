"""A local Hugging Face causal LM as a `SparsityTarget`, probed through module hooks.

FFNs are found from the module structure, whatever the model's name:

    gated  a module with gate_proj, up_proj, down_proj and an activation module (Llama,
           Mistral, Qwen2, MiniCPM, ...): a = act(gate_proj x) * up_proj(x), W_out = down_proj
    plain  a module with two projections and an activation module between them (GPT-2
           mlp.c_fc/c_proj, OPT layer fc1/fc2, GPT-J fc_in/fc_out, ...): a = act(W_in x)
    MoE    fused experts (`moe.FusedExperts`: Mixtral, Qwen-MoE, OLMoE): one gated FFN per
           expert, seeing only its routed tokens; a gated FFN beside them (Qwen-MoE's shared
           expert) is expert "shared", and experts kept as a list of gated FFNs are found
           one by one (each is called on its routed tokens only)

Each FFN has `layer` (its index among the model's FFNs: the key of thresholds and counts),
`block` (the decoder layer it sits in) and `expert` (None for a dense FFN).

The probe sees the same `FFNTrace` semantics as in our model, with two differences:
tensors are laid out as the model computes them, features last: [batch, seq, features] for
most, [batch * seq, features] where the model flattens tokens (OPT); and for a plain FFN
`trace.gate` is a = act(W_in x) and `trace.up` is ones (a broadcast view, not writable), so
that a == gate * up holds for every FFN. There is no tensor parallelism:
every FFN holds all of its neurons (`neuron_offset` 0).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from ..model.probe import FFNTrace, Probe
from .gguf import gguf_model
from .moe import FusedExperts, RoutedExpert, experts_probed
from .paths import model_kind

GATED = ("gate_proj", "up_proj", "down_proj")
PLAIN = (("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"))
ACTIVATIONS = ("act_fn", "act", "activation_fn", "activation")


def _child(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    child = getattr(module, name, None)
    return child if isinstance(child, torch.nn.Module) else None


def _projection(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    child = _child(module, name)
    return child if isinstance(getattr(child, "weight", None), torch.Tensor) else None


class HFFFN:
    """One FFN of a Hugging Face model: neuron i outputs W_out[:, i] * a_i.

    `entry` is the module whose first positional input is the FFN input x (the MLP for a
    gated FFN, W_in for a plain one); `down` is W_out, whose input is a. For a gated FFN,
    `up` and `act` give the trace its up and gate tensors.
    """

    neuron_offset = 0
    block: int | None = None  # the decoder layer (set by find_ffns)
    expert: int | str | None = None  # MoE: the expert's index, or "shared"

    def __init__(self, layer: int, entry, down, up=None, act=None):
        self.layer = layer
        self.entry, self.down, self.up, self.act = entry, down, up, act
        self.transposed = isinstance(down, Conv1D)  # GPT-2's Conv1D stores [in, out]
        self.local_neurons = down.weight.shape[0 if self.transposed else 1]

    @property
    def gated(self) -> bool:
        return self.up is not None

    def output_weight(self) -> torch.Tensor:
        """W_out as [d_model, neurons], fp32: neuron i writes column i (bias not included)."""
        weight = self.down.weight.detach().float()
        return weight.t() if self.transposed else weight

    def output_weight_norms(self) -> torch.Tensor:
        """||W_out[:, i]|| for each neuron i: neuron i's output norm is |a_i| times this."""
        return self.output_weight().norm(dim=0)

    def attach(self, probe: Probe) -> list:
        """Hooks that call `probe` as our FFN's forward does; returns their handles."""
        seen: dict[str, torch.Tensor] = {}

        def on_input(module, args):
            replacement = probe.on_input(self, args[0])
            seen["input"] = args[0] if replacement is None else replacement
            return None if replacement is None else (replacement, *args[1:])

        def keep(name):
            def hook(module, args, output):
                seen[name] = output
            return hook

        def on_activation(module, args):
            a = args[0]
            if self.gated:
                gate, up = seen.pop("gate"), seen.pop("up")
            else:
                gate, up = a, torch.ones((), dtype=a.dtype, device=a.device).expand_as(a)
            trace = FFNTrace(self.layer, seen.pop("input"), gate, up, a)
            replacement = probe.on_activation(self, trace)
            return None if replacement is None else (replacement, *args[1:])

        handles = [self.entry.register_forward_pre_hook(on_input)]
        if self.gated:
            handles.append(self.act.register_forward_hook(keep("gate")))
            handles.append(self.up.register_forward_hook(keep("up")))
        handles.append(self.down.register_forward_pre_hook(on_activation))
        return handles


def _as_ffn(module: torch.nn.Module, layer: int) -> HFFFN | None:
    acts = (_child(module, name) for name in ACTIVATIONS)
    act = next((child for child in acts if child is not None), None)
    if act is None:
        return None
    gate, up, down = (_projection(module, name) for name in GATED)
    if gate is not None and up is not None and down is not None:
        return HFFFN(layer, module, down, up, act)
    for first, second in PLAIN:
        w_in, w_out = _projection(module, first), _projection(module, second)
        if w_in is not None and w_out is not None:
            return HFFFN(layer, w_in, w_out, act=act)
    return None


def _block(path: str) -> int | None:
    """The decoder layer of a module: the first index in its path (model.layers.3.mlp -> 3)."""
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def find_ffns(model: torch.nn.Module) -> list[HFFFN | RoutedExpert]:
    """The model's FFNs in module order (which is layer order in every HF decoder)."""
    found, moe_blocks = [], set()
    for path, module in model.named_modules():
        group = FusedExperts.find(module, path, _block(path), len(found))
        if group is not None:
            found.extend(group.experts)
            moe_blocks.add(group.parent)
            continue
        ffn = _as_ffn(module, len(found))
        if ffn is None:
            continue
        ffn.block = _block(path)
        parent, _, last = path.rpartition(".")
        if parent in moe_blocks:
            ffn.expert = "shared"
        elif last.isdigit() and parent.rpartition(".")[2] == "experts":
            ffn.expert = int(last)
        found.append(ffn)
    return found


class HFCausalLM:
    """A Hugging Face causal LM that the sparsity metrics can probe and mask."""

    def __init__(self, model: PreTrainedModel, name: str):
        self.model = model.eval()
        self.name = name
        self.vocab_size = model.config.vocab_size
        try:
            self._ffns = find_ffns(model)
        except UserError as error:
            raise UserError(f"{name}: {error}") from None
        self._fused = list({id(f.group): f.group for f in self._ffns if isinstance(f, RoutedExpert)}.values())
        if not self._ffns:
            raise UserError(
                f"{name}: no recognisable FFN (gate/up/down or two-projection MLP) "
                f"in {type(model).__name__}"
            )

    @classmethod
    def load(cls, path: str | Path, dtype=torch.float32, device="cpu",
             trust_remote_code: bool = False) -> "HFCausalLM":
        """Load a local model directory or GGUF file (never downloads); fp32 on the CPU by default."""
        kind = model_kind(path)
        if kind not in ("hf", "gguf"):
            raise UserError(f"{path}: not a Hugging Face model directory (config.json) or a .gguf file")
        try:
            if kind == "gguf":
                model = gguf_model(Path(path))
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), local_files_only=True, trust_remote_code=trust_remote_code
                )
        except (OSError, ValueError, KeyError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path}: cannot load as a Hugging Face causal LM ({message})") from None
        _check_output_layer(model, path)
        return cls(model.to(device=device, dtype=dtype), str(path))

    @property
    def ffns(self) -> list[HFFFN | RoutedExpert]:
        return self._ffns

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self):
        return self.model.parameters()

    @contextmanager
    def probing(self, probe: Probe):
        """Run forward passes with `probe` hooked into every FFN."""
        handles = [handle for ffn in self._ffns if isinstance(ffn, HFFFN) for handle in ffn.attach(probe)]
        try:
            with experts_probed(self.model, self._fused, probe):
                yield probe
        finally:
            for handle in handles:
                handle.remove()

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [batch, seq, vocab], fp32."""
        return self.model(input_ids=tokens.to(self.device), use_cache=False).logits.float()

    def token_losses(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq], in fp32."""
        logits = self.logits(tokens)
        losses = F.cross_entropy(
            logits.flatten(0, 1), targets.to(logits.device).flatten(), reduction="none"
        )
        return losses.view(targets.shape)


def _check_output_layer(model, path) -> None:
    """Refuse a model whose output layer is all zeros: it predicts every token as equally
    likely, so no FFN can move its perplexity (a tied output layer that loading left apart
    from the embedding looks like this)."""
    output = model.get_output_embeddings()
    if output is not None and not output.weight.detach().any():
        raise UserError(f"{path}: the output layer ({type(model).__name__}'s output embeddings, "
                        f"{tuple(output.weight.shape)}) is all zeros: weights not loaded?")
