"""Collectives the evaluator needs, over megatron's tensor- and data-parallel groups.

Under tensor parallelism each rank holds a slice of every layer's neurons; under data
parallelism each rank holds a share of the validation batches. Every reduction here makes
all ranks hold the same value, so every rank takes the same search decisions. A tensor is
reduced on its own device: a CPU sum through a group with a CPU backend (`parallel.group_for`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..parallel import all_reduce, group_for


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def sum_tp(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over tensor-parallel ranks (partial d_h-sized outputs, neuron counts)."""
    if tp_size() > 1:
        all_reduce(tensor, "tp")
    return tensor


def max_tp(tensor: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        all_reduce(tensor, "tp", op=dist.ReduceOp.MAX)
    return tensor


def sum_dp(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks (loss sums, token counts, CETT sums)."""
    if ps.get_data_parallel_world_size() > 1:
        all_reduce(tensor, "dp")
    return tensor


def gather_neurons(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the last (neuron) dimension across tensor-parallel ranks."""
    if tp_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp_size())]
    dist.all_gather(parts, tensor.contiguous(), group=group_for("tp", tensor))
    return torch.cat(parts, dim=-1)


def local_slice(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's share of a tensor whose last dimension spans all neurons."""
    if tp_size() == 1:
        return tensor
    return tensor.chunk(tp_size(), dim=-1)[ps.get_tensor_model_parallel_rank()]


def max_all(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over every rank (tensor and data parallel)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce(tensor, "world", op=dist.ReduceOp.MAX)
    return tensor


def min_all(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum over every rank (tensor and data parallel)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce(tensor, "world", op=dist.ReduceOp.MIN)
    return tensor
