"""Where training starts on every rank, whoever started the ranks: `sparsity-scaling
train` (in this process or spawned), torchrun, deepspeed or a Ray Train worker."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from ..config import RunConfig
from ..data.pipeline import PreparedData, prepare_data, prepare_decay_data
from ..errors import SettingError, UserError
from ..files import LockHeld
from ..parallel import init_parallel
from ..ranks import launched_externally, on_ranks
from ..rundir import Checkpoint, RunDir
from .callbacks import Callback, ConsoleProgress
from .loop import train


def _prepared_on_rank_zero(config: RunConfig, run: RunDir) -> PreparedData:
    """Rank 0 prepares the data (tokenizer, indexed datasets; cached), refuses a budget of
    more than data.max_epochs, and claims the run directory; every rank receives the
    prepared data's paths (so none starts before)."""
    box: list[PreparedData | None] = [None]
    if dist.get_rank() == 0:
        data = prepare_data(config.data, budget=config.train.tokens)
        record = data.record
        if config.train.decay_data:
            decay = prepare_decay_data(config.data, config.train.decay_data,
                                       round(config.train.tokens * config.train.decay_fraction))
            data, record = replace(data, decay=decay), {**record, "decay": decay.record}
        run.claim(config)
        run.remove_partial_checkpoints()
        run.record_data(data.tokenizer, record)
        box[0] = data
    dist.broadcast_object_list(box, src=0)
    return box[0]


# How long a new trainer waits for a live one on this machine to end (a Ray Train retry may
# start while the rank it replaces is still being killed) before it refuses.
TRAINER_WAIT_S = 30.0


def _lost(holder) -> None:
    """The trainer stalled so long that another one took the run over: stop before writing more."""
    who = holder.describe() if holder is not None else "nobody (its lock file is gone)"
    print(f"error: the run's trainer lock is now held by {who}; this trainer stops", file=sys.stderr, flush=True)
    os._exit(3)


@contextmanager
def _only_trainer(run: RunDir):
    """Rank 0 holds the run's trainer lock while the ranks train (every rank waits for it, and
    every rank raises the refusal, so none waits for a rank 0 that gave up)."""
    lock, box = None, [None]
    if dist.get_rank() == 0:
        lock = run.trainer(on_lost=_lost)
        try:
            lock.acquire(TRAINER_WAIT_S, waiting=lambda h: print(f"waiting for {h.describe()} to stop training "
                                                                 f"{run.path}", file=sys.stderr, flush=True))
        except LockHeld as held:
            box[0] = UserError(f"{run.path}: trained now by {held.holder.describe()}; one trainer at a time")
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def train_on_rank(config: RunConfig, run_dir: str | Path, callbacks: Sequence[Callback] = ()) -> Checkpoint:
    """Join the run's process groups, take the run (one trainer at a time), get its data,
    and train it; on every rank."""
    init_parallel(config.parallel.tp)
    run = RunDir(run_dir)
    with _only_trainer(run):
        return train(config, run, _prepared_on_rank_zero(config, run), callbacks)


def run_training(config: RunConfig, run_dir: str | Path, nproc: int = 1, report_error=None) -> None:
    """Train on `nproc` ranks of this machine (or on the ranks torchrun started)."""
    if not launched_externally() and nproc % config.parallel.tp:
        raise SettingError("nproc", nproc, f"is not a multiple of the tensor-parallel size {config.parallel.tp}")
    on_ranks(nproc, train_on_rank, config, str(run_dir), [ConsoleProgress()], report_error=report_error)
