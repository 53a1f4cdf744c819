"""`sparsity-scaling train`."""

from __future__ import annotations

import argparse

from .common import ErrorLine, positive_int


def _train(args) -> None:
    from ..config import load_config
    from ..train.start import run_training

    overrides = list(args.set)
    if args.tp is not None:
        overrides.append(f"parallel.tp={args.tp}")
    run_training(load_config(args.config, overrides), args.out, args.nproc, report_error=ErrorLine())


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="pretrain one model, writing checkpoints")
    train.add_argument("config", help="run config YAML (e.g. configs/models/tiny.yaml)")
    train.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.tokens=2e6")
    train.add_argument("--tp", type=positive_int, help="tensor-parallel size (overrides parallel.tp)")
    train.add_argument("--nproc", type=positive_int, default=1,
                       help="ranks to start on this machine (gloo on CPU, NCCL on GPU)")
    # the `deepspeed` launcher appends --local_rank; LOCAL_RANK in the environment is what we use
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    train.set_defaults(run=_train)
