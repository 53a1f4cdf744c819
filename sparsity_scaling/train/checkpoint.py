"""Saving a training checkpoint: DeepSpeed's engine state for exact resume, plus the
unsharded weights that any tensor-parallel size can load (layout: `rundir`). Only the
newest `checkpoint.keep_engine` checkpoints keep their engine state.

A write that fails (a full disk) stops the run in one line naming the path and the error,
removes the checkpoint's temporary directory and leaves every earlier checkpoint intact:
rerunning the same command resumes once there is room. Before writing, the free space is
checked against the checkpoint's expected size (that of the newest one, engine included)."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..costs import engine_bytes_per_param
from ..errors import UserError, WriteFailed
from ..parallel import all_reduce, full_state_dict
from ..rundir import Checkpoint, RunDir, read_checkpoint

FORMAT = 1
ROOM_WARNING = 3  # warn while the disk holds fewer than this many more checkpoints


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint's manifest records about the run at that point."""

    tokens: int
    step: int
    consumed_samples: int
    config_hash: str
    tp: int
    dp: int
    vocab_size: int
    activation: str
    train_loss: float
    val_loss: float
    health: dict  # skipped non-finite steps, loss spikes (`train.health.Health`)

    def manifest(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


def expected_bytes(run: RunDir, weights: dict[str, torch.Tensor], bf16: bool) -> int:
    """What the next checkpoint will take: the newest one that keeps its engine state, or
    before the first, its fp32 weights plus the engine state `costs` estimates."""
    with_engine = [c for c in run.checkpoints() if c.has_engine]
    if with_engine:
        return sum(f.stat().st_size for f in with_engine[-1].path.rglob("*") if f.is_file())
    params = sum(t.numel() for t in weights.values())
    return params * (4 + engine_bytes_per_param(bf16))


def check_room(run: RunDir, expected: int) -> str | None:
    """Refuse a checkpoint the disk cannot hold; a warning while it holds only a few more."""
    free = shutil.disk_usage(run.checkpoints_dir).free
    room = free / max(expected, 1)
    if room < 1:
        raise UserError(f"{run.checkpoints_dir}: {free / 1e9:.3g} GB free, the next checkpoint needs about "
                        f"{expected / 1e9:.3g} GB; nothing written, earlier checkpoints intact; free space and "
                        "rerun the same command to resume")
    if room < ROOM_WARNING:
        return (f"warning: {run.checkpoints_dir}: {free / 1e9:.3g} GB free, room for {int(room)} more "
                f"checkpoint(s) of about {expected / 1e9:.3g} GB")
    return None


def _write_failure(error: BaseException, where: Path) -> UserError | None:
    """A failed write, as one line naming the path and saying what is left; None for other
    errors. torch.save reports a full disk as a RuntimeError of its zip writer."""
    if isinstance(error, WriteFailed):
        what = str(error)
    elif isinstance(error, OSError):
        what = str(WriteFailed(error.filename or where, error))
    elif isinstance(error, RuntimeError) and "PytorchStreamWriter" in str(error):
        what = f"{where}: cannot write: {str(error).splitlines()[0]}"
    else:
        return None
    name = where.name.removeprefix(".tmp-")
    return UserError(f"{what}; checkpoint {name} not written, earlier checkpoints intact; free space and rerun "
                     "the same command to resume")


def _everyone_ok(ok: bool) -> bool:
    """Whether every rank succeeded (a collective, in place of a barrier)."""
    flag = all_reduce(torch.tensor([1 if ok else 0]), "world", op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_checkpoint(engine, config: RunConfig, run: RunDir, state: CheckpointState) -> Checkpoint:
    """All ranks write DeepSpeed shards into one temporary directory; rank 0 seals it.
    After each stage the ranks agree that every one of them succeeded (in place of a
    barrier), so a write that fails on one rank stops them all with its line."""
    is_main = dist.get_rank() == 0
    weights = full_state_dict(engine.module)  # collective: every rank takes part
    tmp = run.partial_checkpoint(state.tokens)

    def attempt(stage) -> None:
        problem = None
        try:
            stage()
        except Exception as error:
            problem = _write_failure(error, tmp) or (error if isinstance(error, UserError) else None)
            if problem is None:
                raise
        if not _everyone_ok(problem is None):
            raise problem or UserError(f"{tmp}: not written (another rank could not write)")

    def start() -> None:
        if is_main:
            run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            warning = check_room(run, expected_bytes(run, weights, engine.bfloat16_enabled()))
            if warning:
                print(warning, flush=True)
            run.start_checkpoint(state.tokens)

    def seal() -> None:
        if is_main:
            torch.save(weights, tmp / Checkpoint.WEIGHTS)
            (tmp / Checkpoint.CONFIG).write_text(config.to_yaml())
            run.finish_checkpoint(tmp, state.manifest())
            run.drop_engine_states(config.checkpoint.keep_engine)  # only once the new one is whole

    try:
        attempt(start)
        attempt(lambda: engine.save_checkpoint(str(tmp), tag=Checkpoint.ENGINE_TAG, save_latest=False))
        attempt(seal)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_checkpoint(run.checkpoint_dir(state.tokens))
