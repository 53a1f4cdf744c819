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
from ..parallel import broadcast_from_rank_zero, gather_to_all, init_parallel
from ..ranks import launched_externally, on_ranks
from ..rundir import Checkpoint, RunDir
from .callbacks import Callback, ConsoleProgress
from .loop import train


def _not_seen_here(data: PreparedData) -> str | None:
    """A path of rank 0's prepared data that this rank cannot see, if any."""
    parts = [data] + ([data.decay] if data.decay else [])
    paths = [Path(p.tokenizer) for p in parts] + [Path(f).parent for p in parts for f in p.train + p.valid]
    return next((str(path) for path in paths if not path.exists()), None)


def _prepared_on_rank_zero(config: RunConfig, run: RunDir) -> PreparedData:
    """Rank 0 prepares the data (tokenizer, indexed datasets; cached), refuses a budget of
    more than data.max_epochs, and claims the run directory; every rank receives the
    prepared data's paths (so none starts before) and checks that it sees them: a cache on
    one node's own disk (data.cache_dir's default) is not there on another node."""
    data = None
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
    data = broadcast_from_rank_zero(data)
    unseen = [(rank, path) for rank, path in enumerate(gather_to_all(_not_seen_here(data))) if path]
    if unseen:
        rank, path = unseen[0]
        raise UserError(f"data.cache_dir: rank {rank} cannot see {path}, which rank 0 prepared; put data.cache_dir "
                        "(default: each node's own ~/.cache/sparsity-scaling or $SPARSITY_SCALING_CACHE) and the "
                        "corpora on storage every node sees")
    return data


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
    lock, refusal, created = None, None, not run.path.exists()
    if dist.get_rank() == 0:
        lock = run.trainer(on_lost=_lost)
        try:
            lock.acquire(TRAINER_WAIT_S, waiting=lambda h: print(f"waiting for {h.describe()} to stop training "
                                                                 f"{run.path}", file=sys.stderr, flush=True))
        except LockHeld as held:
            refusal = UserError(f"{run.path}: trained now by {held.holder.describe()}; one trainer at a time")
    refusal = broadcast_from_rank_zero(refusal)
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            if created and not any(run.path.iterdir()):  # refused before writing: no directory left either
                run.path.rmdir()


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
