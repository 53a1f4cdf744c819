"""The `sparsity-scaling` command line."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _train(args) -> None:
    from .config import load_config
    from .launch import run_training

    overrides = list(args.set)
    if args.tp is not None:
        overrides.append(f"parallel.tp={args.tp}")
    config = load_config(args.config, overrides)
    if args.nproc < 1:
        raise UserError("--nproc must be at least 1")
    run_training(config, args.out, args.nproc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsity-scaling", description="Measure and predict activation sparsity in LLMs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain one model, writing checkpoints")
    train.add_argument("config", help="run config YAML (e.g. configs/models/tiny.yaml)")
    train.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.tokens=2e6")
    train.add_argument("--tp", type=int, help="tensor-parallel size (overrides parallel.tp)")
    train.add_argument("--nproc", type=int, default=1,
                       help="ranks to start on this machine (gloo on CPU, NCCL on GPU)")
    # the `deepspeed` launcher appends --local_rank; LOCAL_RANK in the environment is what we use
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    train.set_defaults(run=_train)

    from .evaluate import add_arguments

    add_arguments(commands)
    from .analysis.cli import add_arguments as add_analysis_arguments

    add_analysis_arguments(commands)
    from launcher.cli import add_arguments as add_grid_arguments

    add_grid_arguments(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        print(f"sparsity-scaling: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsity-scaling: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
