"""`sparsity-scaling grid plan|submit|status|report`."""

from __future__ import annotations

import argparse

from ..costs import DEFAULT_GPU_MEMORY_GB, DEFAULT_MFU, GB, H100_BF16_PEAK_TFLOPS
from .common import positive_int


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def _positive_number(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _grid_and_workdir(args):
    from launcher.grid import load_grid
    from launcher.workdir import Workdir

    grid = load_grid(args.grid)
    workdir = Workdir(args.workdir) if getattr(args, "workdir", None) else Workdir.default(grid.name)
    return grid, Workdir(workdir.path.resolve())


def _plan(args) -> None:
    from launcher.grid import load_grid, plan_table
    from launcher.preflight import ClusterFacts, check_grid, refusal

    grid = load_grid(args.grid)
    cluster = ClusterFacts.target(args.nodes, args.gpus_per_node, args.gpu_memory * GB, args.cpus_per_node)
    problems = check_grid(grid, cluster)
    print(plan_table(grid, args.mfu, args.peak_tflops, problems), flush=True)
    if problems:
        raise refusal(grid, cluster, problems)
    print(f"preflight: {cluster.describe()} can run this grid")


def _submit(args) -> None:
    from launcher.status import status_table
    from launcher.submit import submit

    grid, workdir = _grid_and_workdir(args)
    submit(grid, workdir, args.address, None if args.gpu_memory is None else args.gpu_memory * GB)
    print(status_table(grid, workdir))


def _rehearse(args) -> None:
    from launcher.rehearsal import rehearse

    grid, workdir = _grid_and_workdir(args)
    rehearse(grid, workdir, args.address, None if args.gpu_memory is None else args.gpu_memory * GB, args.steps)


def _status(args) -> None:
    from launcher.status import status_table

    print(status_table(*_grid_and_workdir(args)))


def _report(args) -> None:
    from launcher.report import write_report
    from launcher.tracking import tracking

    grid, workdir = _grid_and_workdir(args)
    with tracking(workdir, create=False) as uri:
        write_report(grid, uri, workdir, args.target)


def add_commands(commands) -> None:
    grid = commands.add_parser("grid", help="plan, submit and follow a grid of runs on Ray")
    sub = grid.add_subparsers(dest="grid_command", required=True)
    plan = sub.add_parser("plan", help="print the expanded runs, their sizes, budgets, costs, memory and corpora; refuse a grid the target cluster cannot run")
    plan.add_argument("grid")
    plan.add_argument("--mfu", type=_fraction, default=DEFAULT_MFU,
                      help=f"model FLOPs utilisation the GPU-hours assume (default {DEFAULT_MFU})")
    plan.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                      help=f"peak TFLOP/s of one GPU (default {H100_BF16_PEAK_TFLOPS:g}: H100 SXM, dense bf16)")
    plan.add_argument("--nodes", type=positive_int, default=1, help="nodes of the cluster to check against (default 1)")
    plan.add_argument("--gpus-per-node", type=_non_negative_int, default=8, help="GPUs of each node (default 8)")
    plan.add_argument("--gpu-memory", type=_positive_number, default=DEFAULT_GPU_MEMORY_GB,
                      help=f"memory of one GPU, GB (default {DEFAULT_GPU_MEMORY_GB}: an H100); a run's estimated "
                           "peak per rank must fit it")
    plan.add_argument("--cpus-per-node", type=_positive_number, metavar="CPUS",
                      help="logical CPUs of each node (default: not checked)")
    plan.set_defaults(run=_plan)
    submit = sub.add_parser("submit", help="train and evaluate every run (resumes; skips what is done)")
    submit.add_argument("grid")
    submit.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    submit.add_argument("--workdir", help="where runs, Ray storage and the local MLflow live (default: runs/GRID)")
    submit.add_argument("--gpu-memory", type=_positive_number,
                        help=f"memory of one GPU, GB, where Ray's accelerator type does not tell it "
                             f"(default {DEFAULT_GPU_MEMORY_GB})")
    submit.set_defaults(run=_submit)
    rehearse = sub.add_parser("rehearse", help="every run for a few steps on the cluster, through a checkpoint, "
                              "an evaluation job and an MLflow delivery; one line per run, then removed")
    rehearse.add_argument("grid")
    rehearse.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    rehearse.add_argument("--workdir", help="the grid's workdir; the rehearsal runs in WORKDIR/rehearsal (default: "
                                            "runs/GRID)")
    rehearse.add_argument("--gpu-memory", type=_positive_number, help="as for submit")
    rehearse.add_argument("--steps", type=positive_int, default=4, help="optimizer steps of each run (default 4)")
    rehearse.set_defaults(run=_rehearse)
    status = sub.add_parser("status", help="each run's state, tokens, loss and activation ratio")
    status.add_argument("grid")
    status.add_argument("--workdir")
    status.set_defaults(run=_status)
    report = sub.add_parser("report", help="write report.md and report.html from the grid's MLflow runs")
    report.add_argument("grid")
    report.add_argument("--workdir")
    report.add_argument("--target", type=float, action="append",
                        help="activation ratio to predict a token budget for (repeatable; default: the grid's)")
    report.set_defaults(run=_report)
