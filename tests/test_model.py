"""The model: tensor-parallel equality and the FFN probe interface."""

from __future__ import annotations

import torch

from distributed import run_ranks
from sparsity_scaling.config import ModelConfig

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=160, activation="silu")
VOCAB = 300


def _tokens():
    return torch.randint(0, VOCAB, (3, 33), generator=torch.Generator().manual_seed(1))


def _loss_with_weights(tp: int, path: str):
    """Loss and per-layer activations of the same full weights loaded at TP size `tp`."""
    from sparsity_scaling.model import ActivationRecorder, MiniCPM
    from sparsity_scaling.parallel import full_state_dict, init_parallel, load_full_state_dict

    init_parallel(tp)
    torch.manual_seed(0)
    model = MiniCPM(CFG, VOCAB)
    reference = torch.load(path)
    load_full_state_dict(model, reference)
    tokens = _tokens()
    with model.probing(ActivationRecorder()) as recorder:
        loss = model.token_losses(tokens[:, :-1], tokens[:, 1:]).mean().item()
    assert torch.equal(full_state_dict(model)["embed.weight"], reference["embed.weight"])
    return loss, recorder.activations, [f.neuron_offset for f in model.ffns]


def _save_reference(path):
    from sparsity_scaling.model import MiniCPM
    from sparsity_scaling.parallel import full_state_dict, init_parallel

    init_parallel(1)
    torch.manual_seed(123)
    model = MiniCPM(CFG, VOCAB)
    state = full_state_dict(model)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}  # not the init weights
    torch.save(state, path)


def test_same_weights_same_loss_at_tp1_and_tp2(tmp_path):
    path = str(tmp_path / "weights.pt")
    run_ranks(1, _save_reference, path)
    (loss1, acts1, _), = run_ranks(1, _loss_with_weights, 1, path)
    (loss2a, acts2a, off_a), (loss2b, acts2b, off_b) = run_ranks(2, _loss_with_weights, 2, path)
    assert abs(loss1 - loss2a) < 1e-5 and loss2a == loss2b
    assert off_a == [0, 0] and off_b == [80, 80]
    for layer in acts1:  # each rank holds its half of the neurons
        joined = torch.cat([acts2a[layer], acts2b[layer]], dim=-1)
        assert torch.allclose(joined, acts1[layer], atol=1e-5)


def _probe_checks():
    from sparsity_scaling.model import ActivationRecorder, MaskNeurons, MiniCPM, Probe, ThresholdNeurons
    from sparsity_scaling.parallel import init_parallel

    init_parallel(1)
    torch.manual_seed(0)
    model = MiniCPM(CFG, VOCAB)
    tokens = _tokens()
    dense = model(tokens)

    class Check(Probe):
        def on_activation(self, ffn, trace):
            ffn_in = trace.input
            assert torch.allclose(trace.gate, torch.nn.functional.silu(ffn_in @ ffn.gate.weight.t()), atol=1e-6)
            assert torch.allclose(trace.up, ffn_in @ ffn.up.weight.t(), atol=1e-6)
            assert torch.equal(trace.activation, trace.gate * trace.up)
            self.seen = getattr(self, "seen", 0) + 1

    with model.probing(Check()) as check:
        assert torch.equal(model(tokens), dense)  # observing changes nothing
    assert check.seen == CFG.n_layers
    assert all(f.probe is None for f in model.ffns)  # probes are removed afterwards

    norms = model.ffns[0].output_weight_norms()
    assert torch.allclose(norms, model.ffns[0].down.weight.norm(dim=0))

    keep_all = {i: torch.ones(CFG.d_ff, dtype=torch.bool) for i in range(CFG.n_layers)}
    with model.probing(MaskNeurons(keep_all)):
        assert torch.equal(model(tokens), dense)
    with model.probing(ThresholdNeurons({i: torch.zeros(CFG.d_ff) for i in range(CFG.n_layers)})):
        assert torch.equal(model(tokens), dense)

    # masking every neuron of every layer equals a model whose FFNs output zero
    drop_all = {i: torch.zeros(CFG.d_ff, dtype=torch.bool) for i in range(CFG.n_layers)}
    with model.probing(MaskNeurons(drop_all)):
        masked = model(tokens)
    for ffn in model.ffns:
        ffn.down.weight.data.zero_()
    assert torch.allclose(masked, model(tokens), atol=1e-6)
    assert not torch.allclose(masked, dense)

    # a threshold removes exactly the small activations
    with model.probing(ActivationRecorder()) as rec:
        model(tokens)
    a = rec.activations[1]
    threshold = a.abs().median()
    seen = {}

    class Chain(ThresholdNeurons):
        def on_activation(self, ffn, trace):
            out = super().on_activation(ffn, trace)
            seen[trace.layer] = out if out is not None else trace.activation
            return out

    with model.probing(Chain({1: torch.full((CFG.d_ff,), threshold.item())})):
        model(tokens)
    kept = seen[1] != 0
    assert torch.equal(kept, a.abs() >= threshold)
    return True


def test_probe_observes_and_masks_neurons():
    assert run_ranks(1, _probe_checks) == [True]


def _gradients(recompute: bool, path: str):
    from sparsity_scaling.model import MiniCPM
    from sparsity_scaling.parallel import init_parallel, load_full_state_dict

    init_parallel(1)
    model = MiniCPM(CFG, VOCAB)
    load_full_state_dict(model, torch.load(path))
    model.checkpoint_blocks = recompute
    tokens = _tokens()
    loss = model.token_losses(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    path = str(tmp_path / "weights.pt")
    run_ranks(1, _save_reference, path)
    (plain_loss, plain), = run_ranks(1, _gradients, False, path)
    (loss, recomputed), = run_ranks(1, _gradients, True, path)
    assert loss == plain_loss
    for name, grad in plain.items():
        assert torch.allclose(recomputed[name], grad, rtol=1e-5, atol=1e-7), name
