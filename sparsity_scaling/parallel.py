"""Process groups: torch.distributed + megatron-core's parallel_state, and the adapters
DeepSpeed and checkpoints need on top of them.

Every collective picks its group by where its tensor lives (`group_for`, `all_reduce`): a
GPU tensor through megatron's groups, a CPU tensor through groups with a CPU backend (the
same groups where the default group has one, gloo twins where it is NCCL alone).

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


def rank_device(visible_gpus: int, local_rank: int) -> torch.device:
    """The device of a rank that sees `visible_gpus` GPUs: the CPU if it sees none (an
    evaluation rank given no GPU has CUDA hidden from it), else GPU `local_rank` of those
    it sees (the launcher's GPUs, or under Ray its own, index 0 for a rank given one)."""
    if visible_gpus == 0:
        return torch.device("cpu")
    if local_rank >= visible_gpus:
        raise UserError(f"LOCAL_RANK {local_rank} names no GPU: this process sees {visible_gpus} "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", local_rank)


def device() -> torch.device:
    return rank_device(torch.cuda.device_count() if torch.cuda.is_available() else 0,
                       int(os.environ.get("LOCAL_RANK", 0)))


_WORLD_OF_ONE: dict[str, str] = {}  # the environment init_parallel set for a world of one


def init_parallel(tp: int) -> None:
    """Join (or create, for a single process) the default group, then the megatron groups
    and the groups CPU sums go through (`group_for`): whoever created the default group,
    Ray Train on GPUs among them, the CPU tensors of the loss and the evaluator's sums reduce."""
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
        if ps.get_tensor_model_parallel_world_size() == tp and _CPU_GROUPS:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    _CPU_GROUPS.clear()
    _CPU_GROUPS.update(_cpu_groups(dist.get_backend_config()))


# Groups that reduce CPU tensors ("world", "tp", "dp"); None is the default group.
_CPU_GROUPS: dict[str, dist.ProcessGroup | None] = {}


def reduces_cpu(backend_config: str) -> bool:
    """Whether a group with this backend map (`dist.get_backend_config()`, such as
    "cpu:gloo,cuda:nccl") has a backend for CPU tensors. Ray Train creates its default group
    on GPUs as plain "nccl" ("cuda:nccl"), which has none."""
    items = [item.strip() for item in backend_config.split(",")]
    return any(item.split(":")[0] == "cpu" if ":" in item else item in ("gloo", "mpi") for item in items)


def _cpu_groups(backend_config: str) -> dict[str, dist.ProcessGroup | None]:
    """The groups CPU sums go through: megatron's own if the default group has a CPU
    backend (whoever created it), else gloo twins of them, created here on every rank."""
    if reduces_cpu(backend_config):
        return {"world": None, "tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group()}
    world = dist.new_group(backend="gloo")
    return {"world": world, "tp": _gloo_twin(ps.get_tensor_model_parallel_group(), world),
            "dp": ps.get_data_parallel_group_gloo()}


def _gloo_twin(group: dist.ProcessGroup, world_gloo: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group of the same ranks as `group` (one of a partition of the world, as
    megatron's groups are): every rank creates every such group, in the same order."""
    mine = dist.get_process_group_ranks(group)
    everyones: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyones, mine, group=world_gloo)
    twin = None
    for ranks in sorted({tuple(r) for r in everyones}):
        created = dist.new_group(list(ranks), backend="gloo")
        if list(ranks) == mine:
            twin = created
    return twin


def group_for(kind: str, tensor: torch.Tensor) -> dist.ProcessGroup | None:
    """The group ("world", "tp" or "dp") that reduces `tensor`: megatron's (or the default
    group) for a GPU tensor, one with a CPU backend for a CPU tensor, whoever created the
    default group."""
    if tensor.device.type != "cpu":
        return {"world": None, "tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group()}[kind]
    return cpu_group(kind)


def cpu_group(kind: str) -> dist.ProcessGroup | None:
    """The group ("world", "tp" or "dp") with a CPU backend (None: the default group has one)."""
    if not _CPU_GROUPS:
        raise RuntimeError("CPU collectives need init_parallel first")
    return _CPU_GROUPS[kind]


def all_reduce(tensor: torch.Tensor, kind: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `tensor` in place over the ranks of `kind` ("world", "tp", "dp"), on its own device."""
    dist.all_reduce(tensor, op=op, group=group_for(kind, tensor))
    return tensor


def broadcast_from_rank_zero(value):
    """Rank 0's `value` on every rank (a small picklable object, sent through the CPU)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=cpu_group("world"))
    return box[0]


def gather_to_all(value) -> list:
    """Every rank's `value` (a small picklable object), in rank order, on every rank."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=cpu_group("world"))
    return out


def shutdown_parallel() -> None:
    _CPU_GROUPS.clear()
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
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if tp > 1 and is_sharded(param):
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=group_for("tp", tensor))
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
