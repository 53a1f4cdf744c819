"""Helpers the tests share: paths, running the command line, reading MLflow back, and
registering a slow command to run in the background. Fixtures live in conftest.py; tests
import these from here, never from conftest."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "models" / "micro.yaml"
GRID = REPO / "configs" / "grids" / "cpu_test.yaml"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `sparsity-scaling ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "sparsity_scaling.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


def run_here(*args: str) -> subprocess.CompletedProcess:
    """`sparsity-scaling ARGS` in this process, for commands that start nothing: as `run_cli`
    sees it (exit status, what it printed), without an interpreter's start and the imports
    (5-10 s on 2 cores). An uncaught exception fails the test, as a traceback would. A
    command that joined a Ray instance leaves it when it ends, as its process would."""
    import contextlib
    import io

    from sparsity_scaling.cli import main

    def joined() -> bool:  # a command that never imported Ray joined none
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    joined_before = joined()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # the parser's refusal of a flag
            code = exit.code
        finally:
            if joined() and not joined_before:
                sys.modules["ray"].shutdown()
    return subprocess.CompletedProcess(["sparsity-scaling", *args], code, out.getvalue(), err.getvalue())


def mlflow_history(workdir: Path, experiment: str) -> dict:
    """Every run's tags and metric histories, read back through the grid's MLflow server."""
    from mlflow.tracking import MlflowClient

    from launcher.tracking import tracking
    from launcher.workdir import Workdir

    with tracking(Workdir(workdir)) as uri:
        mlflow = MlflowClient(uri)
        exp = mlflow.get_experiment_by_name(experiment)
        out = {}
        for run in mlflow.search_runs([exp.experiment_id]):
            metrics = {
                key: [(m.step, m.value) for m in sorted(mlflow.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
                for key in run.data.metrics
            }
            out[run.info.run_name] = {"tags": run.data.tags, "metrics": metrics, "id": run.info.run_id,
                                      "status": run.info.status}
    return out


def mlflow_run_dir(tmp_path: Path):
    """An MLflow run in a SQLite store, and a run directory that points at it (as a grid's does)."""
    from launcher.tracking import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = client(uri)
    run_id = mlflow.create_run(mlflow.create_experiment("x", artifact_location=str(tmp_path / "art"))).info.run_id
    run_dir = tmp_path / "grid-run"
    run_dir.mkdir()
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return mlflow, run_id, run_dir


def trajectory(run_dir: Path) -> list[tuple]:
    """A run's training and validation points, all but the wall-clock throughput."""
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(p["kind"], p["step"], p["loss"], p.get("lr")) for p in points]


def server_outlived(workdir) -> bool:
    """Whether any process of the workdir's last MLflow server (its process group: the
    server, its uvicorn workers, which name no workdir on their command line) still runs,
    or anything still listens on its port."""
    import socket
    import urllib.parse

    server = json.loads(workdir.mlflow_server.read_text())
    group = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == server["pid"]:
                group.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    uri = urllib.parse.urlsplit(server["uri"])
    with socket.socket() as probe:
        listening = probe.connect_ex((uri.hostname, uri.port)) == 0
    return bool(group) or listening


@dataclasses.dataclass(frozen=True)
class BackgroundCommand:
    """A slow command (a grid: minutes) that tests check: run before them, beside the tests
    that come first. On 2 cores most tests leave one idle; these commands run there."""

    fixture: str  # the fixture its tests take; it runs where one of them is collected
    args: Callable[[Path, str], list[str]]  # (a directory of its own, a Ray address) -> its CLI arguments


BACKGROUND: list[BackgroundCommand] = []  # in the order they run


def in_background(fixture: str, args: Callable[[Path, str], list[str]]) -> None:
    """Run `sparsity-scaling ARGS` in the background for the tests that take `fixture`,
    whose value is `background.result(fixture)`: (the command's result, its directory)."""
    BACKGROUND.append(BackgroundCommand(fixture, args))

