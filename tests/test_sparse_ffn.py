"""The sparse FFN computes what the probe's masked dense FFN computes, for our model and the
Hugging Face layouts (gated Llama, plain GPT-2 Conv1D and OPT), at every site it takes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from sparsity_scaling.config import ModelConfig
from sparsity_scaling.errors import SettingError
from sparsity_scaling.hf import HFCausalLM
from sparsity_scaling.metrics.rules import FixedThreshold, PerNeuronThreshold, SparsifyingProbe, TopK, site_scores
from sparsity_scaling.model.probe import Probe
from sparsity_scaling import sparse_ffn
from sparsity_scaling.sparse_ffn import SparseFFN, ffn_weights, installed, sparse_modules

VOCAB, D, D_FF = 100, 32, 48


def _ours(activation: str):
    from sparsity_scaling.model import MiniCPM

    torch.manual_seed(0)
    model = MiniCPM(ModelConfig(d_model=D, n_layers=2, n_heads=4, d_ff=D_FF, activation=activation), VOCAB).eval()
    return model, model, lambda tokens: model(tokens)


def _hf(cls, config):
    torch.manual_seed(0)
    target = HFCausalLM(cls(config), cls.__name__)
    with torch.no_grad():  # Hugging Face starts biases at 0, which would hide one left out
        for name, parameter in target.model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.02)
    return target, target.model, lambda tokens: target.model(input_ids=tokens, use_cache=False).logits


MODELS = {
    "ours-relu": lambda: _ours("relu"),
    "ours-silu": lambda: _ours("silu"),
    "llama-relu": lambda: _hf(LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="relu", mlp_bias=True)),
    "gpt2": lambda: _hf(GPT2LMHeadModel, GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_inner=D_FF, n_layer=2, n_head=4, n_positions=64)),
    "opt": lambda: _hf(OPTForCausalLM, OPTConfig(
        vocab_size=VOCAB, hidden_size=D, ffn_dim=D_FF, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=D, max_position_embeddings=64)),
}


class SiteScores(Probe):
    """Every site's scores of a dense pass, per site, all layers together."""

    def __init__(self):
        self.scores: dict[str, list[torch.Tensor]] = {}

    def on_activation(self, ffn, trace):
        for site in ("intermediate", "gate", "up"):
            self.scores.setdefault(site, []).append(site_scores(trace, site).flatten())
        self.scores.setdefault("input", []).append(trace.input.abs().flatten())


def _rules(target, logits_of, tokens, gated: bool) -> list:
    """Rules at every site the FFN takes, each keeping about a third of what it looks at."""
    with torch.no_grad(), target.probing(SiteScores()) as seen:
        logits_of(tokens)
    cut = {site: float(torch.cat(values).float().quantile(0.67)) for site, values in seen.scores.items()}
    generator = torch.Generator().manual_seed(2)
    per_neuron = {f.layer: cut["intermediate"] * 2 * torch.rand(f.local_neurons, generator=generator)
                  for f in target.ffns}
    sites = ("input", "gate", "up") if gated else ("input",)
    return [PerNeuronThreshold(thresholds=per_neuron), TopK(k=D_FF // 4),
            *(FixedThreshold(site=site, eps=cut[site]) for site in sites)]


@pytest.mark.parametrize("by_rows", [True, False], ids=["by-rows", "linear"])
@pytest.mark.parametrize("gather", [1.0, 0.0], ids=["gathered", "dense"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sparse_ffns_equal_the_probes_masked_dense_ffns(name, gather, by_rows, monkeypatch, world_of_one):
    """Whether the needed rows of gate and up are gathered or all computed, and whether a
    token decoded alone is multiplied by rows or by `F.linear`."""
    monkeypatch.setattr(sparse_ffn, "GATHER_BELOW", gather)
    target, module, logits_of = MODELS[name]()
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    gated = ffn_weights(target.ffns[0]).gated
    with torch.no_grad():
        dense = logits_of(tokens)
        with installed(module, target.ffns, sparse_modules(target.ffns, None, by_rows)) as baseline:
            for s in baseline:
                s.recorded = []
            assert torch.allclose(logits_of(tokens), dense, atol=1e-5)
        _one_token_at_a_time_is_the_same(baseline, "dense")
        for rule in _rules(target, logits_of, tokens, gated):
            with target.probing(SparsifyingProbe(rule)) as probe:
                masked = logits_of(tokens)
            with installed(module, target.ffns, sparse_modules(target.ffns, rule, by_rows)) as sparse:
                for s in sparse:
                    s.recorded = []
                computed = logits_of(tokens)
            assert torch.allclose(computed, masked, atol=1e-5), (rule.name, rule.site)
            assert not torch.allclose(computed, dense, atol=1e-3)  # the rule did mask something
            assert [s.kept for s in sparse] == [probe.active[f.layer] for f in target.ffns]
            assert [s.scored for s in sparse] == [probe.total[f.layer] for f in target.ffns]
            assert all(s.macs < s.dense_macs for s in sparse), (rule.name, rule.site)
            _one_token_at_a_time_is_the_same(sparse, (rule.name, rule.site))
        assert torch.equal(logits_of(tokens), dense)  # the model's own FFNs are back


def _one_token_at_a_time_is_the_same(modules: list[SparseFFN], what) -> None:
    """Each module's recorded inputs, given one token at a time (decoding at batch 1), give
    what they give together."""
    for s in modules:
        x, s.recorded = torch.cat(s.recorded).reshape(-1, D), None
        one_by_one = torch.cat([s(x[i : i + 1]) for i in range(len(x))])
        assert torch.allclose(one_by_one, s(x), atol=1e-5), what


def test_relu_intermediate_site_computes_up_only_where_the_gate_is_positive(monkeypatch, world_of_one):
    target, _, _ = MODELS["ours-relu"]()
    weights = ffn_weights(target.ffns[0])
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    positive = int((x @ weights.gate.t() > 0).sum())
    assert positive > sparse_ffn.GATHER_BELOW * D_FF  # random weights: about half the gates
    for gather, up_rows in ((sparse_ffn.GATHER_BELOW, D_FF), (1.0, positive)):
        monkeypatch.setattr(sparse_ffn, "GATHER_BELOW", gather)
        sparse = SparseFFN(weights, FixedThreshold(eps=1e9))  # keeps nothing: W_out does no work
        sparse(x)
        assert sparse.kept == 0
        assert sparse.macs == (D_FF + up_rows) * D  # the gate dense, up for the rows worth gathering


def test_a_plain_ffn_has_no_gate_or_up_site():
    target, _, _ = MODELS["opt"]()
    for site in ("gate", "up"):
        with pytest.raises(SettingError, match="plain FFN"):
            SparseFFN(ffn_weights(target.ffns[0]), FixedThreshold(site=site, eps=0.1))


def test_one_token_products_by_rows_only_where_they_are_timed_faster(monkeypatch):
    """On a CPU the choice is timed (and kept per shape); elsewhere (a GPU's cuBLAS) it is
    F.linear, untimed."""
    assert not sparse_ffn.one_token_by_rows(torch.empty(48, 32, device="meta"))
    timed = []
    monkeypatch.setattr(sparse_ffn, "_timed_by_rows", {})
    monkeypatch.setattr(sparse_ffn, "_fastest", lambda run: timed.append(run) or len(timed))  # rows timed first
    weight = torch.randn(48, 32)
    assert sparse_ffn.one_token_by_rows(weight) and sparse_ffn.one_token_by_rows(weight)
    assert len(timed) == 2  # both ways, once
