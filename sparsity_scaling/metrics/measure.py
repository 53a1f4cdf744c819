"""Forward passes over validation data: the dense pass (once per model) and sparse passes.

The dense pass gives the dense perplexity and keeps a subsample of every layer's FFN
activations for threshold calibration, within a memory budget; every later search step
reuses it instead of running the dense model again.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ContextManager, Iterator

import numpy as np
import torch
from megatron.core import parallel_state as ps

from ..errors import UserError
from ..model.probe import Probe
from .comm import sum_dp, sum_tp
from .rules import SparsifyingProbe
from .target import SparsityTarget


@dataclass
class EvalData:
    """Validation sequences [n, length]; each rank evaluates its data-parallel share."""

    sequences: torch.Tensor
    batch_size: int = 8

    def __post_init__(self):
        if self.sequences.ndim != 2 or self.sequences.shape[1] < 2 or self.sequences.shape[0] < 1:
            raise UserError(
                f"validation tokens: expected an int array (sequences, length >= 2), got shape "
                f"{tuple(self.sequences.shape)}"
            )
        self.sequences = self.sequences.long()

    @property
    def tokens(self) -> int:
        """Predicted tokens over all ranks."""
        return self.sequences.shape[0] * (self.sequences.shape[1] - 1)

    def my_batches(self):
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = self.sequences[rank::dp]
        for i in range(0, mine.shape[0], self.batch_size):
            yield mine[i : i + self.batch_size]

    def my_tokens(self) -> int:
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        return self.sequences[rank::dp].shape[0] * (self.sequences.shape[1] - 1)

    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.sequences.numpy()).tobytes()).hexdigest()[:16]


def check_vocab(data: EvalData, target: SparsityTarget) -> None:
    top = int(data.sequences.max())
    if top >= target.vocab_size or int(data.sequences.min()) < 0:
        raise UserError(
            f"validation tokens: ids up to {top} do not fit the model's vocabulary of "
            f"{target.vocab_size}; the tokenizer does not match the model"
        )


@contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """CUDA fp32 matrix products with TF32 allowed or not, restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def pass_precision(device: torch.device) -> ContextManager[None]:
    """Forward passes on a CUDA device multiply in TF32 (fp32 inputs and sums, a 10-bit
    mantissa in the products: several times fp32's rate on tensor cores); the perplexity is
    summed in fp64 all the same. The CETT sums and thresholds run outside it, in full fp32
    (`full_precision`). On the CPU nothing changes."""
    return _tf32(True) if device.type == "cuda" else nullcontext()


def full_precision() -> ContextManager[None]:
    """fp32 matrix products in full precision (no TF32), whatever the caller set."""
    return _tf32(False)


@torch.no_grad()
def loss_pass(target: SparsityTarget, data: EvalData, probe: Probe | None = None) -> float:
    """Mean token loss over all ranks' data, with `probe` set on every FFN if given."""
    total = torch.zeros(2, dtype=torch.float64)
    device = next(target.parameters()).device

    def run():
        for batch in data.my_batches():
            batch = batch.to(device)
            losses = target.token_losses(batch[:, :-1], batch[:, 1:])
            total[0] += losses.double().sum().item()
            total[1] += losses.numel()

    with pass_precision(device):
        if probe is None:
            run()
        else:
            with target.probing(probe):
                run()
    sum_dp(total)
    return (total[0] / total[1]).item()


class CalibrationRecorder(Probe):
    """Keeps every `stride`-th token's activations per layer (local neurons, fp32) on the
    model's device, where the threshold searches run: no copy to the host inside the pass."""

    def __init__(self, stride: int):
        self.stride = stride
        self.parts: dict[int, list[torch.Tensor]] = {}

    def on_activation(self, ffn, trace):
        a = trace.activation.detach().float().reshape(-1, trace.activation.shape[-1])
        self.parts.setdefault(trace.layer, []).append(a[:: self.stride].clone())
        return None

    def activations(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(parts) for layer, parts in self.parts.items()}


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a float (a diverged model's loss of 1e30 is
    finite, its perplexity is not: it is refused as such, not as a crash)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class DensePass:
    loss: float
    calibration: dict[int, torch.Tensor]  # layer -> [calibration tokens, local neurons]

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


def dense_pass(target: SparsityTarget, data: EvalData, calibration_tokens: int = 8192,
               calibration_bytes: int = 512 << 20) -> DensePass:
    """One dense forward over the data: perplexity plus a calibration subsample.

    The subsample keeps at most `calibration_tokens` tokens per rank and at most
    `calibration_bytes` of activations, so memory does not grow with the validation set.
    """
    neurons = sum(ffn.local_neurons for ffn in target.ffns)
    budget = min(calibration_tokens, max(1, calibration_bytes // (4 * neurons)))
    stride = max(1, math.ceil(data.my_tokens() / budget))
    recorder = CalibrationRecorder(stride)
    loss = loss_pass(target, data, recorder)
    return DensePass(loss, recorder.activations())


@dataclass
class SparsePass:
    loss: float
    active: dict[int, int]  # layer -> active (token, neuron) entries over all ranks
    total: dict[int, int]
    tokens: dict[int, int] = field(default_factory=dict)  # layer -> tokens it saw (an MoE expert: routed ones)

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    @property
    def activation_ratio(self) -> float:
        return sum(self.active.values()) / max(1, sum(self.total.values()))

    def layer_ratios(self) -> list[float]:
        return [self.active[k] / max(1, self.total[k]) for k in sorted(self.active)]


def sparse_pass(target: SparsityTarget, data: EvalData, rule) -> SparsePass:
    """Perplexity and activation counts with `rule` applied in every FFN."""
    probe = SparsifyingProbe(rule)
    loss = loss_pass(target, data, probe)
    layers = [ffn.layer for ffn in target.ffns]  # every FFN, also an MoE expert no token was routed to
    kept = probe.active
    counts = torch.tensor([[kept.get(k, 0), probe.total.get(k, 0)] for k in layers], dtype=torch.float64)
    tokens = torch.tensor([probe.seen.get(k, 0) for k in layers], dtype=torch.float64)
    if rule.site != "input":  # neurons are split across TP ranks; input features are not
        sum_tp(counts)
    sum_dp(counts)
    sum_dp(tokens)
    active = {k: int(counts[i, 0]) for i, k in enumerate(layers)}
    total = {k: int(counts[i, 1]) for i, k in enumerate(layers)}
    return SparsePass(loss, active, total, {k: int(tokens[i]) for i, k in enumerate(layers)})


def matmul_params(target) -> int:
    """Weights a forward pass multiplies by, per token (2-D parameters, counted once)."""
    return sum(p.numel() for p in target.parameters() if p.dim() == 2)
