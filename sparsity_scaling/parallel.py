"""Process groups: torch.distributed + megatron-core's parallel_state, and the adapters
DeepSpeed and checkpoints need on top of them.

Ranks are laid out tensor-parallel first (megatron's default order), so ranks 0..tp-1 hold
the shards of one model replica and data parallelism runs across replicas.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .errors import SettingError, UserError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


_WORLD_OF_ONE: dict[str, str] = {}  # the environment init_parallel set for a world of one


def init_parallel(tp: int) -> None:
    """Join (or create, for a single process) the default group, then the megatron groups."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`/console script: a world of one
            _WORLD_OF_ONE.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            os.environ.update(_WORLD_OF_ONE)
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
            # Model tensors go through NCCL; the loss and measurement sums that the training
            # loop and the evaluator keep on the CPU (in float64) go through gloo.
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend)
    world = dist.get_world_size()
    if world % tp:
        raise SettingError("tp", tp, f"does not divide the number of processes {world}")
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() == tp:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)


def shutdown_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    # A world of one made up here must not outlive its group: processes started later
    # from this one would take themselves for ranks of a launched job.
    for key, value in _WORLD_OF_ONE.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    _WORLD_OF_ONE.clear()


class DeepSpeedMPU:
    """megatron's parallel_state under the names DeepSpeed's `mpu` argument looks up."""

    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights (gathered across the tensor-parallel group) on the CPU, fp32."""
    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if tp > 1 and is_sharded(param):
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        out[name] = tensor.float().cpu().clone()
    return out


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy unsharded weights into a model of any tensor-parallel size (re-sharding)."""
    tp = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise UserError(f"weights do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            tensor = state[name]
            if tp > 1 and is_sharded(param):
                tensor = tensor.chunk(tp, dim=param.partition_dim)[rank]
            if tensor.shape != param.shape:
                raise UserError(
                    f"weights do not fit this model: {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            param.copy_(tensor)
