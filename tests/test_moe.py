"""Mixture-of-experts Hugging Face models: each expert measured as a gated FFN over the
tokens its router sent it, counted independently here from the router logits and the
expert weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
    Qwen2MoeConfig, Qwen2MoeForCausalLM,
)

from sparsity_scaling.cli import main
from sparsity_scaling.errors import UserError
from sparsity_scaling.hf import HFCausalLM
from sparsity_scaling.metrics.measure import EvalData
from sparsity_scaling.metrics.rules import FixedThreshold
from sparsity_scaling.metrics.search import Evaluator, expert_ratios
from sparsity_scaling.model import Probe
from sparsity_scaling.parallel import init_parallel, shutdown_parallel

VOCAB, D, WIDTH, EXPERTS, TOP_K, LAYERS = 64, 32, 24, 4, 2, 2
SHARED_WIDTH = 16
EPS = 0.004  # |a| threshold: about half of the tiny models' activations

CASES = {
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)),
    "qwen2_moe": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=D, moe_intermediate_size=WIDTH, shared_expert_intermediate_size=SHARED_WIDTH,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=False)),
    "olmoe": (OlmoeForCausalLM, lambda: OlmoeConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_experts=EXPERTS, num_experts_per_tok=TOP_K, eos_token_id=1, pad_token_id=0)),
}


@pytest.fixture(scope="module")
def one_rank():
    """A world of one for the evaluator, closed after this module's tests."""
    init_parallel(1)
    yield
    shutdown_parallel()


@pytest.fixture(scope="module", params=list(CASES))
def moe(request, tmp_path_factory, one_rank):
    """(layout, HFCausalLM loaded from a saved directory)."""
    cls, config = CASES[request.param]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    cls(config()).save_pretrained(path)
    return request.param, HFCausalLM.load(path)


def _direct_counts(target, inputs: dict[int, list[torch.Tensor]]) -> dict[tuple[int, object], tuple[int, int]]:
    """(block, expert) -> (active entries, routed tokens) from each MoE block's inputs, its
    router's logits (softmax, top-k) and its experts' weights, at |a| >= EPS."""
    counts = {}
    for block, layer in enumerate(target.model.model.layers):
        x = torch.cat(inputs[block]).reshape(-1, D)
        mlp = layer.mlp
        logits = F.linear(x, mlp.gate.weight)
        chosen = logits.softmax(-1).topk(TOP_K, dim=-1).indices
        for e in range(EXPERTS):
            routed = x[(chosen == e).any(-1)]
            gate, up = F.linear(routed, mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
            a = F.silu(gate) * up
            counts[block, e] = (int((a.abs() >= EPS).sum()), routed.shape[0])
        if hasattr(mlp, "shared_expert"):  # every token
            s = mlp.shared_expert
            a = F.silu(s.gate_proj(x)) * s.up_proj(x)
            counts[block, "shared"] = (int((a.abs() >= EPS).sum()), x.shape[0])
    return counts


@torch.no_grad()
def test_each_expert_counts_only_its_routed_tokens(moe):
    name, target = moe
    tokens = torch.randint(0, VOCAB, (6, 17), generator=torch.Generator().manual_seed(2))
    evaluator = Evaluator(target, EvalData(tokens, batch_size=3))
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, b=b: inputs.setdefault(b, []).append(args[0]))
             for b, layer in enumerate(target.model.model.layers)]
    try:
        sparse = evaluator.measure(FixedThreshold(eps=EPS))
    finally:
        for hook in hooks:
            hook.remove()
    experts = expert_ratios(target, sparse)
    expected = _direct_counts(target, inputs)
    assert [(e["layer"], e["expert"]) for e in experts] == list(expected)
    widths = {ffn.layer: ffn.local_neurons for ffn in target.ffns}
    for ffn, record in zip(target.ffns, experts):
        active, routed = expected[record["layer"], record["expert"]]
        assert record["tokens"] == routed
        assert sparse.active[ffn.layer] == active
        assert record["activation_ratio"] == pytest.approx(active / (routed * widths[ffn.layer]))
    # every token goes to TOP_K experts of each block; the shared expert sees all of them
    routed_tokens = sum(e["tokens"] for e in experts if e["expert"] != "shared")
    assert routed_tokens == LAYERS * TOP_K * evaluator.data.tokens
    # the model-wide ratio: every (routed token, neuron) entry counted once
    weighted = sum(e["activation_ratio"] * e["tokens"] * widths[f.layer] for f, e in zip(target.ffns, experts))
    assert sparse.activation_ratio == pytest.approx(weighted / sum(e["tokens"] * widths[f.layer]
                                                                   for f, e in zip(target.ffns, experts)))
    assert 0.1 < sparse.activation_ratio < 0.9


@torch.no_grad()
def test_probing_leaves_the_model_unchanged_and_results_list_every_expert(moe):
    name, target = moe
    tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    dense = target.model(tokens).logits
    with target.probing(Probe()):
        probed = target.model(tokens).logits
    assert torch.allclose(probed, dense, atol=1e-6)
    assert target.model.config._experts_implementation != "sparsity_scaling_probe"  # given back
    evaluator = Evaluator(target, EvalData(tokens))
    rule = evaluator.cett_rule(0.2)
    experts = evaluator.result("cett", rule, evaluator.measure(rule)).to_dict()["extra"]["experts"]
    assert len(experts) == LAYERS * (EXPERTS + (name == "qwen2_moe"))
    assert all(e["activation_ratio"] is None or 0 <= e["activation_ratio"] <= 1 for e in experts)


def test_an_moe_layout_we_do_not_probe_is_refused_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    GptOssForCausalLM(GptOssConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=WIDTH, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="MoE layout not recognised: GptOssExperts at model.layers.0.mlp.experts"):
        HFCausalLM.load(tmp_path)
    tokens = tmp_path / "valid.npy"
    np.save(tokens, np.zeros((2, 9), dtype=np.int64))
    capsys.readouterr()
    assert main(["evaluate", "--hf-model", str(tmp_path), "--tokens", str(tokens)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"sparsity-scaling: error: {tmp_path}: MoE layout not recognised: "
                                                   "GptOssExperts at model.layers.0.mlp.experts has parameters")


def assert_one_error_line(stderr: str, start: str) -> None:
    """The command's error is one line (after any loading progress bars), no traceback."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(start) and "Traceback" not in stderr, stderr
