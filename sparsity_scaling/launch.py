"""Start the ranks of a job: in this process, as spawned children, or under torchrun /
deepspeed (which set RANK, WORLD_SIZE and MASTER_ADDR themselves)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import RunConfig
from .data import prepare_data
from .errors import UserError
from .parallel import free_port, init_parallel, shutdown_parallel
from .train.checkpoint import claim_run_dir
from .train.loop import train


def launched_externally() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank_entry(rank: int, world: int, port: int, fn: Callable, args: tuple):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        fn(*args)
    except UserError as error:
        if rank == 0:
            print(f"sparsity-scaling: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown_parallel()


def on_ranks(nproc: int, fn: Callable, *args) -> None:
    """Run fn(*args) on `nproc` ranks: this process if one (or if launched externally)."""
    if nproc == 1 or launched_externally():
        try:
            fn(*args)
        finally:
            shutdown_parallel()
        return
    try:
        mp.start_processes(
            _rank_entry, args=(nproc, free_port(), fn, args), nprocs=nproc, start_method="spawn"
        )
    except mp.ProcessExitedException as error:
        if error.exit_code == 2:  # a user error, already reported by rank 0
            raise SystemExit(2) from None
        raise


def _train_on_rank(config: RunConfig, out: str, data) -> None:
    init_parallel(config.parallel.tp)
    if data is None:  # launched by torchrun: rank 0 prepares, the others receive
        box = [prepare_data(config.data) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        data = box[0]
    train(config, out, data)


def run_training(config: RunConfig, out: str, nproc: int = 1) -> None:
    if launched_externally():
        on_ranks(1, _train_on_rank, config, out, None)
        return
    if nproc % config.parallel.tp:
        raise UserError(f"--nproc {nproc} is not a multiple of --tp {config.parallel.tp}")
    data = prepare_data(config.data)
    claim_run_dir(out, config.hash(), config.to_yaml())  # refuse a foreign --out before spawning
    on_ranks(nproc, _train_on_rank, config, out, data)
