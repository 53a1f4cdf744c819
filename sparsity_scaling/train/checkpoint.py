"""Saving a training checkpoint: DeepSpeed's engine state for exact resume, plus the
unsharded weights that any tensor-parallel size can load (layout: `rundir`). Only the
newest `checkpoint.keep_engine` checkpoints keep their engine state."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..parallel import full_state_dict
from ..rundir import Checkpoint, RunDir, read_checkpoint

FORMAT = 1


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

    def manifest(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


def save_checkpoint(engine, config: RunConfig, run: RunDir, state: CheckpointState) -> Checkpoint:
    """All ranks write DeepSpeed shards into one temporary directory; rank 0 seals it."""
    is_main = dist.get_rank() == 0
    weights = full_state_dict(engine.module)  # collective: every rank takes part
    tmp = run.partial_checkpoint(state.tokens)
    if is_main:
        run.start_checkpoint(state.tokens)
    dist.barrier()
    try:
        engine.save_checkpoint(str(tmp), tag=Checkpoint.ENGINE_TAG, save_latest=False)
        dist.barrier()
        if is_main:
            torch.save(weights, tmp / Checkpoint.WEIGHTS)
            (tmp / Checkpoint.CONFIG).write_text(config.to_yaml())
            run.finish_checkpoint(tmp, state.manifest())
            run.drop_engine_states(config.checkpoint.keep_engine)  # only once the new one is whole
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return read_checkpoint(run.checkpoint_dir(state.tokens))
