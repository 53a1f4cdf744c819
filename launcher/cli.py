"""`sparsity-scaling grid plan|submit|status|report`."""

from __future__ import annotations

import os
from pathlib import Path

from sparsity_scaling.errors import UserError


def _plan(args) -> None:
    from .grid import load_grid, plan_table

    print(plan_table(load_grid(args.grid)))


def _submit(args) -> None:
    from .grid import load_grid
    from .status import status_table
    from .submit import submit

    workdir = submit(args.grid, args.address, args.workdir)
    print(status_table(load_grid(args.grid), workdir))


def _status(args) -> None:
    from .grid import load_grid
    from .status import status_table

    grid = load_grid(args.grid)
    print(status_table(grid, Path(args.workdir or Path("runs") / grid.name)))


def _report(args) -> None:
    from .grid import load_grid
    from .report import write_report
    from .tracking import tracking

    grid = load_grid(args.grid)
    workdir = Path(args.workdir or Path("runs") / grid.name).resolve()
    if not (workdir / "mlflow").is_dir() and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError(f"--workdir {workdir}: no MLflow store there; submit the grid first")
    with tracking(workdir) as uri:
        write_report(grid, uri, workdir, args.target)


def add_arguments(commands) -> None:
    grid = commands.add_parser("grid", help="plan, submit and follow a grid of runs on Ray")
    sub = grid.add_subparsers(dest="grid_command", required=True)
    plan = sub.add_parser("plan", help="print the expanded runs, their sizes and token budgets")
    plan.add_argument("grid")
    plan.set_defaults(run=_plan)
    submit = sub.add_parser("submit", help="train and evaluate every run (resumes; skips what is done)")
    submit.add_argument("grid")
    submit.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    submit.add_argument("--workdir", help="where runs, Ray storage and the local MLflow live (default: runs/GRID)")
    submit.set_defaults(run=_submit)
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
