"""Hugging Face models as sparsity targets; our checkpoints exported to Llama and re-sharded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
)

from helpers import MICRO
from distributed import run_ranks
from sparsity_scaling.errors import UserError
from sparsity_scaling.hf import HFCausalLM, export_llama, load_target
from sparsity_scaling.model import ActivationRecorder, MaskNeurons, Probe

VOCAB, D, D_FF, LAYERS = 100, 32, 48, 2  # d_ff != d_model: a transposed W_out would show


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))


# Each case: a model class, its config, and per layer (x -> (gate, up), W_out) computed
# from the model's own modules, independently of the hooks.

def _llama_parts(model):
    mlps = [layer.mlp for layer in model.model.layers]
    return [(lambda x, m=m: (m.act_fn(m.gate_proj(x)), m.up_proj(x)), m.down_proj) for m in mlps]


def _gpt2_parts(model):  # Conv1D projections: weights stored [in, out]
    mlps = [block.mlp for block in model.transformer.h]
    return [(lambda x, m=m: (m.act(m.c_fc(x)), 1.0), m.c_proj) for m in mlps]


def _opt_parts(model):  # the FFN lives directly in the decoder layer
    layers = model.model.decoder.layers
    return [(lambda x, m=m: (m.activation_fn(m.fc1(x)), 1.0), m.fc2) for m in layers]


CASES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=4), _llama_parts),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_inner=D_FF, n_layer=LAYERS, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0), _gpt2_parts),
    "opt": (OPTForCausalLM, lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=D, ffn_dim=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, word_embed_proj_dim=D, max_position_embeddings=64), _opt_parts),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf(request, tmp_path_factory):
    """(model name, HFCausalLM loaded from a saved directory, its per-layer parts)."""
    cls, config, parts = CASES[request.param]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    cls(config()).save_pretrained(path)
    target = HFCausalLM.load(path)
    return request.param, target, parts(target.model)


class TraceRecorder(Probe):
    """Keeps every FFN's inputs and trace; optionally replaces the input by `scale` * x."""

    def __init__(self, scale: float | None = None):
        self.scale, self.original, self.traces = scale, {}, {}

    def on_input(self, ffn, x):
        self.original[ffn.layer] = x.detach().clone()
        return None if self.scale is None else x * self.scale

    def on_activation(self, ffn, trace):
        self.traces[trace.layer] = trace


def _logits(target, tokens):
    with torch.no_grad():
        return target.model(input_ids=tokens).logits


def test_ffns_are_found_with_their_output_weights(hf):
    name, target, parts = hf
    assert [f.layer for f in target.ffns] == list(range(LAYERS))
    assert all(f.gated == (name == "llama") for f in target.ffns)
    for ffn, (_, down) in zip(target.ffns, parts):
        assert ffn.local_neurons == D_FF and ffn.neuron_offset == 0
        with torch.no_grad():  # W_out's column i is its output for a = e_i, bias removed
            columns = (down(torch.eye(D_FF)) - down(torch.zeros(1, D_FF))).t()
        assert ffn.output_weight().shape == (D, D_FF)
        assert torch.allclose(ffn.output_weight(), columns, atol=1e-6)
        assert torch.allclose(ffn.output_weight_norms(), columns.norm(dim=0), atol=1e-6)


@pytest.mark.parametrize("scale", [None, 2.0], ids=["observe", "replace-input"])
def test_probe_sees_the_ffn_computation(hf, scale):
    _, target, parts = hf
    tokens = _tokens(VOCAB)
    dense = _logits(target, tokens)
    with target.probing(TraceRecorder(scale)) as recorder:
        probed = _logits(target, tokens)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in target.model.modules())
    assert torch.equal(probed, dense) == (scale is None)
    for layer, (gate_up, _) in enumerate(parts):
        trace = recorder.traces[layer]
        expected_input = recorder.original[layer] * (scale or 1.0)
        assert trace.input.shape[-1] == D and trace.input[..., 0].numel() == tokens.numel()
        assert torch.equal(trace.input, expected_input)
        with torch.no_grad():
            gate, up = gate_up(trace.input)
        assert torch.allclose(trace.gate, gate, atol=1e-6)
        assert torch.allclose(trace.up, torch.as_tensor(up).expand_as(trace.up), atol=1e-6)
        assert torch.allclose(trace.activation, gate * up, atol=1e-6)


def test_masking_every_neuron_equals_zero_output_weights(hf):
    _, target, parts = hf
    tokens = _tokens(VOCAB)
    drop_all = {i: torch.zeros(D_FF, dtype=torch.bool) for i in range(LAYERS)}
    with target.probing(MaskNeurons(drop_all)):
        masked = _logits(target, tokens)
    saved = [down.weight.detach().clone() for _, down in parts]
    with torch.no_grad():
        for _, down in parts:
            down.weight.zero_()
        zeroed = _logits(target, tokens)
        for (_, down), weight in zip(parts, saved):
            down.weight.copy_(weight)
    assert torch.allclose(masked, zeroed, atol=1e-6)
    assert not torch.allclose(masked, _logits(target, tokens))


def test_token_losses_are_cross_entropy_of_the_logits(hf):
    _, target, _ = hf
    tokens = _tokens(VOCAB)
    with torch.no_grad():
        losses = target.token_losses(tokens[:, :-1], tokens[:, 1:])
    logits = _logits(target, tokens[:, :-1])
    expected = -logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert losses.dtype == torch.float32 and losses.shape == (2, 16)
    assert torch.allclose(losses, expected, atol=1e-5)


def test_a_model_without_ffns_is_refused(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=1,
        num_attention_heads=4))
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    with pytest.raises(UserError) as error:
        HFCausalLM(model, "some/dir")
    assert str(error.value) == (
        "some/dir: no recognisable FFN (gate/up/down or two-projection MLP) in LlamaForCausalLM"
    )
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        HFCausalLM.load(tmp_path / "missing")


# --- our checkpoints: TP 1 reference, Llama export, TP 2 ------------------------------------

def _write_checkpoint(run_dir: Path) -> Path:
    """A checkpoint of the micro model with perturbed (not initial) weights, plus a tokenizer."""
    from sparsity_scaling.config import load_config
    from sparsity_scaling.model import MiniCPM
    from sparsity_scaling.parallel import full_state_dict
    from sparsity_scaling.rundir import RunDir

    config = load_config(MICRO)
    torch.manual_seed(0)
    state = full_state_dict(MiniCPM(config.model, config.data.vocab_size))
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    run = RunDir(run_dir)
    tmp = run.start_checkpoint(1024)
    torch.save(state, tmp / "model.pt")
    (tmp / "config.yaml").write_text(config.to_yaml())
    (run_dir / "tokenizer.model").write_bytes(b"not really sentencepiece")
    return run.finish_checkpoint(tmp, {"tokens": 1024, "step": 1, "vocab_size": config.data.vocab_size}).path


def _measure(checkpoint: Path, tp: int) -> dict:
    """Token losses, logits, FFN activations and FFN attributes of the checkpoint at TP `tp`."""
    from sparsity_scaling.parallel import init_parallel

    init_parallel(tp)
    model = load_target(checkpoint, tp=tp)
    tokens = _tokens(model.vocab_size)
    with torch.no_grad():
        with model.probing(ActivationRecorder()) as recorder:
            logits = model(tokens)
        losses = model.token_losses(tokens[:, :-1], tokens[:, 1:])
    ffns = [(f.layer, f.local_neurons, f.neuron_offset, f.output_weight().shape,
             f.output_weight_norms().shape) for f in model.ffns]
    return dict(losses=losses, logits=logits, activations=recorder.activations, ffns=ffns)


def _refusals(checkpoint: Path) -> list[str]:
    """Messages for an incomplete checkpoint and one whose config does not fit its weights."""
    incomplete = checkpoint.with_name("incomplete")
    shutil.copytree(checkpoint, incomplete)
    (incomplete / "manifest.json").unlink()
    other = checkpoint.with_name("other")
    shutil.copytree(checkpoint, other)
    config = (other / "config.yaml").read_text().replace("d_ff: 160", "d_ff: 128")
    (other / "config.yaml").write_text(config)
    messages = []
    for path in (incomplete, other):
        try:
            load_target(path)
        except UserError as error:
            messages.append(str(error))
    return messages


def _reference(run_dir: Path) -> tuple[Path, dict, list[str]]:
    from sparsity_scaling.parallel import init_parallel

    init_parallel(1)
    checkpoint = _write_checkpoint(run_dir)
    return checkpoint, _measure(checkpoint, 1), _refusals(checkpoint)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """(checkpoint, its TP 1 measurements, refusal messages), computed in a spawned rank."""
    run_dir = tmp_path_factory.mktemp("run")
    (result,) = run_ranks(1, _reference, run_dir)
    return result


def test_our_checkpoint_loads_as_a_target(ours):
    checkpoint, reference, _ = ours
    for i, ffn in enumerate(reference["ffns"]):  # the FFNLayer protocol
        assert ffn == (i, 160, 0, (64, 160), (160,))
    assert reference["losses"].shape == (2, 16) and reference["losses"].dtype == torch.float32


def test_bad_checkpoints_are_refused(ours):
    _, _, (incomplete, other) = ours
    assert incomplete.endswith("incomplete: not a complete checkpoint (no manifest.json)")
    assert "other: weights do not fit this model: layers.0.ffn.gate.weight has shape" in other
    assert "\n" not in incomplete + other


def test_export_llama_reproduces_our_model(ours, tmp_path):
    checkpoint, reference, _ = ours
    out = export_llama(checkpoint, tmp_path / "llama")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu" and config["tie_word_embeddings"] is False
    assert (out / "tokenizer.model").read_bytes() == b"not really sentencepiece"

    target = load_target(hf_model=out)
    tokens = _tokens(target.vocab_size)
    with target.probing(ActivationRecorder()) as recorder:
        logits = _logits(target, tokens)
    ours_logits = reference["logits"].transpose(0, 1)  # ours [seq, batch, ...], HF [batch, seq, ...]
    print(f"max |logit difference| of the Llama export: {(logits - ours_logits).abs().max():.3g}")
    assert (logits - ours_logits).abs().max() < 1e-4
    for layer, activation in reference["activations"].items():
        assert torch.allclose(recorder.activations[layer], activation.transpose(0, 1), atol=1e-5)
    with torch.no_grad():
        losses = target.token_losses(tokens[:, :-1], tokens[:, 1:])
    assert torch.allclose(losses, reference["losses"], atol=1e-5)

    with pytest.raises(UserError, match="not empty"):
        export_llama(checkpoint, out)
    with pytest.raises(UserError, match="runs unsharded"):
        load_target(hf_model=out, tp=2)
    with pytest.raises(UserError, match="either a checkpoint or"):
        load_target(checkpoint, hf_model=out)


def test_tp2_gives_the_same_token_losses(ours):
    checkpoint, reference, _ = ours
    rank0, rank1 = run_ranks(2, _measure, checkpoint, 2)
    assert torch.allclose(rank0["losses"], reference["losses"], atol=1e-5)
    assert torch.equal(rank0["losses"], rank1["losses"])
    assert [f[1:4] for f in rank1["ffns"]] == [(80, 80, (64, 80))] * 2


# --- a series of Hugging Face checkpoints named as trainers name them ------------------------

# Hugging Face Trainer's checkpoint-N and Megatron's zero-padded iter_N, in no order
SERIES = ["checkpoint-1500", "iter_0000500", "checkpoint-1000"]
IN_STEP_ORDER = ["iter_0000500", "checkpoint-1000", "checkpoint-1500"]


@pytest.fixture(scope="module")
def hf_series(tmp_path_factory) -> Path:
    """One tiny Llama's training history: saved after 10, 20 and 30 AdamW steps on sequences
    whose next token is 3 x the previous plus 0-2 (mod VOCAB), as steps 500, 1000 and 1500,
    each with the same tokenizer file; those sequences are the validation tokens. A model that
    learned them gets worse when its FFN neurons are masked (a random one need not)."""
    root = tmp_path_factory.mktemp("series")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF,
                                         num_hidden_layers=LAYERS, num_attention_heads=4))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (40, 1), generator=g)
    for _ in range(32):
        tokens = torch.cat([tokens, (tokens[:, -1:] * 3 + torch.randint(0, 3, (40, 1), generator=g)) % VOCAB], 1)
    saves = dict(zip((10, 20, 30), IN_STEP_ORDER))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(1, 31):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in saves:
            model.save_pretrained(root / saves[step])
            (root / saves[step] / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}}}')
    np.save(root / "valid.npy", tokens.numpy())
    return root


def test_a_series_named_by_step_is_in_step_order_with_tokens_from_the_names(hf_series, tmp_path):
    """--tokens-per-step 7 over checkpoint-1500, iter_0000500, checkpoint-1000: the points in
    step order, trained tokens 7 x the step in each name, each point that model's own
    `evaluate --metric cett` at the series' CETT, and that CETT the one whose PPL ratio over
    the --last 2 newest (steps 1000 and 1500) averages 1.01."""
    from sparsity_scaling.cli import main

    out, tokens = tmp_path / "series.json", str(hf_series / "valid.npy")
    assert main(["evaluate-series", *(str(hf_series / name) for name in SERIES), "--tokens-per-step", "7",
                 "--last", "2", "--token-file", tokens, "--out", str(out)]) == 0
    series = json.loads(out.read_text())
    assert series["token_passed"] == [3500, 7000, 10500]
    assert [(p["checkpoint"], p["step"], p["tokens"]) for p in series["checkpoints"]] == [
        ("iter_0000500", 500, 3500), ("checkpoint-1000", 1000, 7000), ("checkpoint-1500", 1500, 10500)]
    alone = []
    for name in IN_STEP_ORDER:
        result = tmp_path / f"{name}.json"
        assert main(["evaluate", "--hf-model", str(hf_series / name), "--metric", "cett", "--value",
                     repr(series["cett"]), "--tokens", tokens, "--json", str(result)]) == 0
        alone.append(json.loads(result.read_text()))
    assert series["activation_ratio"] == pytest.approx([a["activation_ratio"] for a in alone], abs=5e-4)
    assert (alone[1]["ppl_ratio"] + alone[2]["ppl_ratio"]) / 2 == pytest.approx(1.01, abs=1e-3)


def test_a_series_whose_tokenizers_differ_is_refused_in_one_line(hf_series, tmp_path, capfd):
    from sparsity_scaling.cli import main

    other = tmp_path / "checkpoint-2000"  # the same shape, another tokenizer
    shutil.copytree(hf_series / "checkpoint-1500", other)
    (other / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}}')
    first, out = hf_series / "iter_0000500", tmp_path / "series.json"
    capfd.readouterr()
    status = main(["evaluate-series", str(first), str(hf_series / "checkpoint-1000"), str(other),
                   "--tokens-per-step", "7", "--last", "2", "--token-file", str(hf_series / "valid.npy"),
                   "--out", str(out)])
    err = capfd.readouterr().err
    assert status == 2 and err == f"sparsity-scaling: error: {other}: its tokenizer differs from {first}'s\n", err
    assert not out.exists()
