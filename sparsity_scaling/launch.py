"""Start the ranks of a training run: in this process, as spawned children, or under
torchrun / deepspeed (which set RANK, WORLD_SIZE and MASTER_ADDR themselves)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import RunConfig
from .data import PreparedData, prepare_data
from .errors import UserError
from .parallel import free_port, init_parallel, shutdown_parallel
from .train.checkpoint import claim_run_dir
from .train.loop import train


def _worker(rank: int, world: int, port: int, config: RunConfig, out: str, data: PreparedData):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        train(config, out, data)
    except UserError as error:
        if rank == 0:
            print(f"sparsity-scaling: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown_parallel()


def launched_externally() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_training(config: RunConfig, out: str, nproc: int = 1) -> None:
    if launched_externally():
        init_parallel(config.parallel.tp)
        box = [prepare_data(config.data) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        try:
            train(config, out, box[0])
        finally:
            shutdown_parallel()
        return
    if nproc % config.parallel.tp:
        raise UserError(f"--nproc {nproc} is not a multiple of --tp {config.parallel.tp}")
    data = prepare_data(config.data)
    claim_run_dir(out, config.hash(), config.to_yaml())  # refuse a foreign --out before spawning
    if nproc == 1:
        try:
            train(config, out, data)
        finally:
            shutdown_parallel()
        return
    try:
        mp.start_processes(
            _worker, args=(nproc, free_port(), config, out, data), nprocs=nproc, start_method="spawn"
        )
    except mp.ProcessExitedException as error:
        if error.exit_code == 2:
            raise SystemExit(2) from None
        raise
