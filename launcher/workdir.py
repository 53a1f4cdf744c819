"""A grid's working directory: the one place that knows where its parts live.

    WORKDIR/driver.lock      the `grid submit` that drives the grid now (one at a time)
    WORKDIR/runs/<run>/      each run's directory (layout: `sparsity_scaling.rundir`)
    WORKDIR/mlflow/          the local MLflow store: mlflow.db (SQLite), artifacts/,
                             server.json (the running server's URI and pid), server.log
    WORKDIR/ray/             Ray Tune's and Ray Train's storage
    WORKDIR/report.md, report_files/, report.html, report.json   the grid's report
"""

from __future__ import annotations

from pathlib import Path

from sparsity_scaling.files import OwnerLock
from sparsity_scaling.rundir import RunDir

REPORT = "report"


class Workdir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def default(cls, grid_name: str) -> "Workdir":
        """runs/GRID, relative to where the command runs."""
        return cls(Path("runs") / grid_name)

    @classmethod
    def of_run(cls, run: RunDir) -> "Workdir":
        """The grid workdir a run directory sits in (WORKDIR/runs/RUN)."""
        return cls(run.path.resolve().parent.parent)

    @property
    def driver_lock(self) -> Path:
        return self.path / "driver.lock"

    def driver(self, on_lost=None) -> OwnerLock:
        """The lock of the one `grid submit` that drives this workdir's grid at a time."""
        return OwnerLock(self.driver_lock, "grid submit", on_lost=on_lost)

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / "runs" / name)

    @property
    def mlflow(self) -> Path:
        return self.path / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def mlflow_server(self) -> Path:
        return self.mlflow / "server.json"

    @property
    def mlflow_log(self) -> Path:
        return self.mlflow / "server.log"

    def has_mlflow_store(self) -> bool:
        return self.mlflow_db.is_file()

    @property
    def ray(self) -> Path:
        return self.path / "ray"

    def report(self, suffix: str) -> Path:
        """report.md, report.html, report.json."""
        return self.path / f"{REPORT}.{suffix}"
