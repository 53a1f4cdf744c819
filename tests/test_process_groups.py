"""Process groups as a GPU cluster makes them: CPU sums whoever created the default group,
the device of a rank that Ray gave no GPU, and DeepSpeed's precision under bf16."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import MICRO
from distributed import run_ranks

from sparsity_scaling.config import TrainConfig
from sparsity_scaling.errors import UserError

VOCAB, SEQ = 97, 8


class _LanguageModel(torch.nn.Module):
    """Stands in for MiniCPM on a GPU: its own collectives would run there on CUDA tensors
    (NCCL), which a CPU-only test cannot do; this one has none, so only the sums under test
    meet the group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def token_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embed(inputs))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")


def _validation():
    from sparsity_scaling.data.sampler import WindowSampler

    tokens = np.random.default_rng(0).integers(0, VOCAB, size=SEQ * 6 + 1).astype(np.int32)
    return WindowSampler(tokens, SEQ, seed=0, shuffle=False)


def _cpu_sums_under_a_group_made_like_ray_trains() -> dict:
    """The default group created first, as Ray Train does on GPUs ("nccl" is "cuda:nccl": no
    CPU backend); here "cuda:gloo", which has no CPU backend either and runs on a CPU-only
    torch. Then the code under test joins it and reduces CPU tensors as training and the
    evaluator do."""
    import torch.distributed as dist

    from sparsity_scaling.metrics import comm
    from sparsity_scaling.parallel import broadcast_from_rank_zero, init_parallel
    from sparsity_scaling.train.checkpoint import _everyone_ok
    from sparsity_scaling.train.loop import validation_loss

    rank = int(os.environ["RANK"])
    dist.init_process_group("cuda:gloo")
    assert dist.get_backend_config() == "cuda:gloo"
    out = {}
    init_parallel(1)  # two data-parallel ranks
    out["val_loss"] = validation_loss(_LanguageModel(), _validation(), 6, micro=2)
    out["sum_dp"] = comm.sum_dp(torch.tensor([rank + 1.0], dtype=torch.float64)).item()
    out["max_all"] = comm.max_all(torch.tensor([10.0 * rank])).item()
    out["everyone_ok"] = _everyone_ok(rank == 0)
    out["broadcast"] = broadcast_from_rank_zero(f"from {rank}")
    init_parallel(2)  # one tensor-parallel pair
    out["sum_tp"] = comm.sum_tp(torch.tensor([[rank + 1.0, 2.0]], dtype=torch.float64)).tolist()
    out["gather"] = comm.gather_neurons(torch.tensor([[float(rank)]])).tolist()
    return out


def test_cpu_sums_do_not_depend_on_who_created_the_default_group():
    """Ray Train creates an NCCL-only default group on GPUs; the validation loss, the
    evaluator's sums and the checkpoint's agreement are CPU tensors and must still reduce
    (on today's code: "No backend type associated with device type cpu")."""
    results = run_ranks(2, _cpu_sums_under_a_group_made_like_ray_trains)
    model, sampler = _LanguageModel(), _validation()
    with torch.no_grad():
        batch = sampler.samples(0, 6)
        expected_loss = model.token_losses(batch[:, :-1], batch[:, 1:]).double().mean().item()
    for out in results:
        assert out["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert out["sum_dp"] == 3.0
        assert out["max_all"] == 10.0
        assert out["everyone_ok"] is False  # rank 1 said no
        assert out["broadcast"] == "from 0"
        assert out["sum_tp"] == [[3.0, 4.0]]
        assert out["gather"] == [[0.0, 1.0]]


@pytest.mark.parametrize("backends, has_cpu", [
    ("cuda:nccl", False),  # Ray Train's default with GPUs ("nccl")
    ("cpu:gloo,cuda:nccl", True),  # what init_parallel creates, and grid submit asks Ray for
    ("cpu:gloo,cuda:gloo", True),  # "gloo"
    ("gloo", True),
    ("cuda:gloo", False),
])
def test_a_default_group_without_a_cpu_backend_is_recognised(backends, has_cpu):
    from sparsity_scaling.parallel import reduces_cpu

    assert reduces_cpu(backends) is has_cpu


def test_a_rank_given_no_gpu_hides_cuda_and_runs_on_the_cpu():
    """Ray leaves every GPU of the node visible to an evaluation rank given none: it must
    not take GPU 0 (a training rank's); a rank given GPUs sees only its own."""
    from launcher.eval_queue import gpu_environment
    from sparsity_scaling.parallel import rank_device

    assert gpu_environment([]) == {"CUDA_VISIBLE_DEVICES": ""}
    assert gpu_environment([5]) == {}  # Ray set CUDA_VISIBLE_DEVICES=5: visible device 0
    assert rank_device(0, 0) == torch.device("cpu")
    assert rank_device(1, 0) == torch.device("cuda", 0)
    assert rank_device(8, 3) == torch.device("cuda", 3)
    with pytest.raises(UserError, match="LOCAL_RANK 2 names no GPU"):
        rank_device(1, 2)


def _deepspeed(train: TrainConfig, bf16: bool) -> dict:
    from sparsity_scaling.config import load_config
    from sparsity_scaling.train.loop import Layout, _deepspeed_config

    config = load_config(MICRO).model_copy(update={"train": train})
    return _deepspeed_config(config, Layout(8, 2, 2, 2, 0), bf16=bf16, clips_itself=False)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_accumulates_gradients_in_fp32(zero):
    """DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 only with
    data_types.grad_accum_dtype fp32 under ZeRO >= 1 (at 0 it picks FP16_UnfusedOptimizer
    over bf16 gradients, and refuses fp32 accumulation)."""
    train = TrainConfig(tokens=1024, batch_tokens=64, zero_stage=zero)
    bf16 = _deepspeed(train, bf16=True)
    assert bf16["zero_optimization"]["stage"] == max(zero, 1)
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = _deepspeed(train, bf16=False)
    assert fp32["zero_optimization"]["stage"] == zero
    assert "data_types" not in fp32


def test_deepspeed_trains_bf16_with_its_fp32_accumulating_optimizer(world_of_one):
    """The config the loop builds for bf16 at the default ZeRO 0 makes DeepSpeed choose its
    BF16_Optimizer with fp32 gradients, not FP16_UnfusedOptimizer over bf16 ones."""
    import deepspeed

    from sparsity_scaling.parallel import DeepSpeedMPU

    config = _deepspeed(TrainConfig(tokens=1024, batch_tokens=64), bf16=True)
    config.update(train_batch_size=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as the loop does
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      mpu=DeepSpeedMPU())
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    assert engine.optimizer.grad_acc_dtype == torch.float32
