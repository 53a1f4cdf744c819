"""Mixture-of-experts FFNs stored fused, as transformers 5 stores them (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, ...): one `experts` module per decoder layer holding every expert's
weights as 3-D tensors, gate_up_proj [E, 2I, H] and down_proj [E, H, I], and computing
all experts in one call (`forward(hidden_states, top_k_index, top_k_weights)`).

Each expert is a gated FFN, a = act(x W_gate_e) * (x W_up_e), W_out = down_proj[e], that
sees only the tokens the router sent it. There are no per-expert modules to hook, so
while probing, the model's experts run through an implementation of our own, registered
with transformers' experts interface: the same computation as transformers' eager loop,
with each expert's input and activations shown to the probe. The router is untouched, so
its choices are respected, and each expert's counts cover only its routed tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model.probe import FFNTrace, Probe

PROBED = "sparsity_scaling_probe"  # our experts implementation's name in transformers' registry
SUPPORTED = ("experts stored as gate_up_proj [E, 2I, H] and down_proj [E, H, I] with the default gate "
             "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)")
_probes: WeakKeyDictionary = WeakKeyDictionary()  # experts module -> (its FusedExperts, the probe set on it)


class RoutedExpert:
    """Expert `expert` of a `FusedExperts`: one gated FFN of `local_neurons` neurons.

    `layer` is its index among the model's FFNs (the key of thresholds and counts),
    `block` the decoder layer it belongs to."""

    neuron_offset = 0
    gated = True

    def __init__(self, group: FusedExperts, layer: int, expert: int):
        self.group, self.layer, self.expert, self.block = group, layer, expert, group.block
        self.local_neurons = group.module.down_proj.shape[2]

    def output_weight(self) -> torch.Tensor:
        """W_out as [d_model, neurons], fp32."""
        return self.group.module.down_proj[self.expert].detach().float()

    def output_weight_norms(self) -> torch.Tensor:
        return self.output_weight().norm(dim=0)

    def compute(self, x: torch.Tensor, probe: Probe) -> torch.Tensor:
        """W_out a for the routed tokens x [tokens, d_model], with the probe called as in every FFN."""
        module = self.group.module
        replacement = probe.on_input(self, x)
        x = x if replacement is None else replacement
        gate, up = F.linear(x, module.gate_up_proj[self.expert]).chunk(2, dim=-1)
        gate = module.act_fn(gate)
        a = gate * up
        replacement = probe.on_activation(self, FFNTrace(self.layer, x, gate, up, a))
        a = a if replacement is None else replacement
        return F.linear(a, module.down_proj[self.expert])


def _layout_problem(module: torch.nn.Module) -> str | None:
    """Why a module holding 3-D expert weights is not the layout we probe, or None."""
    from transformers.integrations.moe import _default_apply_gate

    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"}:
        return f"parameters {', '.join(sorted(params))}"
    flags = {"has_bias": False, "is_transposed": False, "has_gate": True, "is_concatenated": True,
             "has_post_expert_norm": False}
    for flag, expected in flags.items():
        if getattr(module, flag, expected) != expected:
            return f"{flag}={not expected}"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return "its own gate function"
    if not isinstance(getattr(module, "act_fn", None), torch.nn.Module):
        return "no act_fn"
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    experts, hidden, width = down.shape
    if gate_up.shape != (experts, 2 * width, hidden):
        return f"gate_up_proj {tuple(gate_up.shape)} for down_proj {tuple(down.shape)}"
    return None


class FusedExperts:
    """One decoder layer's experts module, as one `RoutedExpert` per expert."""

    def __init__(self, module: torch.nn.Module, path: str, block: int | None, first_layer: int):
        self.module, self.path, self.block = module, path, block
        self.experts = [RoutedExpert(self, first_layer + e, e) for e in range(module.down_proj.shape[0])]

    @classmethod
    def find(cls, module: torch.nn.Module, path: str, block: int | None, first_layer: int) -> FusedExperts | None:
        """The module as fused experts; None if it holds no experts' 3-D projections (a
        convolution's 3-D weight is none); refused if their layout is not the one we probe."""
        if not any(p.dim() == 3 and name.endswith("proj") for name, p in module.named_parameters(recurse=False)):
            return None
        problem = _layout_problem(module)
        if problem is not None:
            raise UserError(f"MoE layout not recognised: {type(module).__name__} at {path} has {problem}; "
                            f"supported: {SUPPORTED}")
        return cls(module, path, block, first_layer)

    @property
    def parent(self) -> str:
        """The path of the MoE block that holds these experts (and any shared expert)."""
        return self.path.rpartition(".")[0]

    def forward(self, probe: Probe, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """transformers' eager experts loop, through `RoutedExpert.compute`."""
        out = torch.zeros_like(hidden_states)
        for expert in self.experts:
            tokens, slot = torch.where(top_k_index == expert.expert)
            if tokens.numel() == 0:
                continue
            y = expert.compute(hidden_states[tokens], probe) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _probed_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    group, probe = _probes[module]
    return group.forward(probe, hidden_states, top_k_index, top_k_weights)


@contextmanager
def experts_probed(model, groups: list[FusedExperts], probe: Probe):
    """Run the model's fused experts through `FusedExperts.forward` with `probe`."""
    if not groups:
        yield
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if PROBED not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(PROBED, _probed_experts_forward)
    previous = model.get_experts_implementation()
    model.set_experts_implementation(PROBED)
    if model.config._experts_implementation != PROBED:
        model.set_experts_implementation(previous)
        raise UserError(f"MoE layout not recognised: {type(model).__name__} does not let its experts "
                        f"implementation be chosen; supported: {SUPPORTED}")
    for group in groups:
        _probes[group.module] = (group, probe)
    try:
        yield
    finally:
        for group in groups:
            _probes.pop(group.module, None)
        model.set_experts_implementation(previous)
