"""Run a function on N gloo ranks (spawned processes) and collect every rank's result."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch.multiprocessing as mp


def _entry(rank, world, port, fn, args, outdir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    from sparsity_scaling.parallel import shutdown_parallel

    try:
        result = fn(*args)
    finally:
        shutdown_parallel()
    Path(outdir, f"{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(world: int, fn, *args) -> list:
    """fn(*args) on each of `world` ranks; returns the list of per-rank return values."""
    from sparsity_scaling.parallel import free_port

    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(
            _entry, args=(world, free_port(), fn, args, outdir), nprocs=world, start_method="spawn"
        )
        return [pickle.loads(Path(outdir, f"{r}.pkl").read_bytes()) for r in range(world)]
