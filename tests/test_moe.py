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
    listed = [*range(EXPERTS), *(["shared"] if name == "qwen2_moe" else [])]
    assert [(e["layer"], e["expert"]) for e in experts] == [(layer, e) for layer in range(LAYERS) for e in listed]


# A model built so that each expert's routed tokens and active neurons are known by hand:
# attention writes nothing (o_proj = 0) and the FFNs write nothing (down_proj = 0), so every
# MoE block sees token t (0 to 3) as RMSNorm(e_t) = sqrt(D) e_t. Block 0's router sends t
# to experts t and t+1 (mod 4), block 1's to t and t+2; in every expert, the gate is
# positive on all four tokens and the up projection is sqrt(D) on neurons j < 6 (t + 1) and
# exactly 0 on the others, so token t activates (t + 1) / 4 of each expert's 24 neurons (of
# the shared expert's 16: 4 (t + 1)).
ROUTES = [lambda t: {t, (t + 1) % 4}, lambda t: {t, (t + 2) % 4}]
# 2 sequences, each token 0-3 four times among the 16 predicted-from positions
KNOWN_TOKENS = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 0], [3, 2, 1, 0, 2, 0, 3, 1, 2]], dtype=np.int64)
# (layer, expert) -> (routed tokens, activation ratio): e.g. block 0's expert 0 sees tokens 0
# and 3, four times each: (1/4 + 4/4) / 2 = 0.625
KNOWN = {(0, 0): (8, 0.625), (0, 1): (8, 0.375), (0, 2): (8, 0.625), (0, 3): (8, 0.875),
         (1, 0): (8, 0.5), (1, 1): (8, 0.75), (1, 2): (8, 0.5), (1, 3): (8, 0.75)}


@torch.no_grad()
def _known_moe(name: str, path) -> None:
    cls, config = CASES[name]
    torch.manual_seed(0)
    model = cls(config())
    embedding = model.model.embed_tokens.weight
    embedding[:4] = torch.eye(4, D)
    for block, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.weight.zero_()
        mlp = layer.mlp
        mlp.gate.weight.zero_()
        for t in range(4):
            for e in ROUTES[block](t):
                mlp.gate.weight[e, t] = 1.0
        experts = [(mlp.experts.gate_up_proj[e], mlp.experts.down_proj[e], WIDTH) for e in range(EXPERTS)]
        if hasattr(mlp, "shared_expert"):
            s = mlp.shared_expert
            experts.append((torch.cat([s.gate_proj.weight, s.up_proj.weight]), s.down_proj.weight, SHARED_WIDTH))
        for gate_up, down, width in experts:
            gate_up.zero_()
            gate_up[:width, :4] = 1.0  # gate sqrt(D) on every token 0-3
            for t in range(4):
                gate_up[width: width + width * (t + 1) // 4, t] = 1.0
            down.zero_()
        if hasattr(mlp, "shared_expert"):  # the views above were copies: write them back
            s.gate_proj.weight.copy_(experts[-1][0][:SHARED_WIDTH])
            s.up_proj.weight.copy_(experts[-1][0][SHARED_WIDTH:])
    model.save_pretrained(path)


@pytest.mark.parametrize("name", list(CASES))
def test_an_moe_built_by_hand_gives_the_ratios_counted_by_hand(name, tmp_path):
    """`evaluate`'s per-expert tokens and ratios, and the model's ratio, against a model whose
    routing and activations are known from its construction (see ROUTES above)."""
    import json

    _known_moe(name, tmp_path / "model")
    np.save(tmp_path / "valid.npy", KNOWN_TOKENS)
    out = tmp_path / "result.json"
    assert main(["evaluate", "--hf-model", str(tmp_path / "model"), "--tokens", str(tmp_path / "valid.npy"),
                 "--metric", "fat", "--value", "1.0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    known = dict(KNOWN)
    if name == "qwen2_moe":  # sees all 16 tokens: (1 + 2 + 3 + 4) / 4 / 4
        known = {**{k: v for k, v in known.items() if k[0] == 0}, (0, "shared"): (16, 0.625),
                 **{k: v for k, v in known.items() if k[0] == 1}, (1, "shared"): (16, 0.625)}
    experts = result["extra"]["experts"]
    assert [(e["layer"], e["expert"]) for e in experts] == list(known)
    assert [e["tokens"] for e in experts] == [tokens for tokens, _ in known.values()]
    assert [e["activation_ratio"] for e in experts] == pytest.approx([ratio for _, ratio in known.values()], abs=1e-12)
    assert result["layer_activation_ratios"] == pytest.approx([ratio for _, ratio in known.values()], abs=1e-12)
    # every routed (token, neuron) entry once: each token goes to 2 experts per block, where
    # it activates (t + 1) / 4 of their neurons; 10 / 16 on average
    assert result["activation_ratio"] == pytest.approx(0.625, abs=1e-12)


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


def test_the_activation_analyses_refuse_an_moe_model_in_one_line(tmp_path, capsys):
    """As the README says: `analyze` needs every FFN to see every token; no result written."""
    cls, config = CASES["mixtral"]
    torch.manual_seed(0)
    cls(config()).save_pretrained(tmp_path / "mixtral")
    np.save(tmp_path / "valid.npy", KNOWN_TOKENS)
    out = tmp_path / "analysis"
    capsys.readouterr()
    assert main(["analyze", "frequency", str(tmp_path / "mixtral"), "--tokens", str(tmp_path / "valid.npy"),
                 "--metric", "cett", "--value", "0.2", "--out", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"sparsity-scaling: error: {tmp_path / 'mixtral'}: MoE experts see "
                          "only their routed tokens; the activation analyses need FFNs that see every token "
                          "(measure MoE models with `evaluate`)")
    assert not out.exists()


def assert_one_error_line(stderr: str, start: str) -> None:
    """The command's error is one line (after any loading progress bars), no traceback."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(start) and "Traceback" not in stderr, stderr
