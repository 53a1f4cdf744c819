"""Start the ranks of a job: in this process, as spawned children, or under torchrun /
deepspeed (which set RANK, WORLD_SIZE and MASTER_ADDR themselves)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.multiprocessing as mp

from .errors import UserError
from .parallel import free_port, shutdown_parallel


def launched_externally() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank_entry(rank: int, world: int, port: int, report_error: Callable[[UserError], str] | None,
                fn: Callable, args: tuple):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        fn(*args)
    except UserError as error:
        if rank == 0:
            print(report_error(error) if report_error else f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown_parallel()


def on_ranks(nproc: int, fn: Callable, *args, report_error: Callable[[UserError], str] | None = None) -> None:
    """Run fn(*args) on `nproc` ranks: this process if one (or if launched externally).

    A UserError in spawned ranks is printed once, by rank 0, as `report_error` words it
    (the command line names its flags there), and ends the job with SystemExit(2).
    """
    if nproc == 1 or launched_externally():
        try:
            fn(*args)
        finally:
            shutdown_parallel()
        return
    try:
        mp.start_processes(
            _rank_entry, args=(nproc, free_port(), report_error, fn, args), nprocs=nproc, start_method="spawn"
        )
    except mp.ProcessExitedException as error:
        if error.exit_code == 2:  # a user error, already reported by rank 0
            raise SystemExit(2) from None
        raise
