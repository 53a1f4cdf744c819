"""One driver per grid workdir, one trainer per run; `grid submit` interrupted; the grid's
parent MLflow run ends with its driver."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import GRID, MICRO, REPO
from launcher.tracking import client, tracking
from launcher.workdir import Workdir
from sparsity_scaling.errors import UserError
from sparsity_scaling.files import LockHeld, OwnerLock, write_json_atomic
from sparsity_scaling.rundir import RunDir

HOST = socket.gethostname()


def _record(path: Path, **fields) -> None:
    """A lock file as another holder would have written it."""
    record = {"what": "grid submit", "host": HOST, "machine": "", "pid": 1, "started": "", "since": 0.0,
              "heartbeat": 0.0, "token": "theirs", **fields}
    write_json_atomic(path, record)


# ---------------------------------------------------------------- the lock, without Ray


def test_a_live_holder_is_refused_by_name_and_the_lock_is_free_once_released(tmp_path):
    path = tmp_path / "driver.lock"
    first = OwnerLock(path, "grid submit")
    first.acquire()
    try:
        with pytest.raises(LockHeld) as refused:
            OwnerLock(path, "grid submit").acquire()
        assert re.search(rf"held by grid submit on host {re.escape(HOST)} \(pid {os.getpid()}, since "
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)$", str(refused.value)), str(refused.value)
    finally:
        first.release()
    assert not path.exists()
    with OwnerLock(path, "grid submit") as second:
        assert second.holder().token == second.mine.token


def test_a_holder_whose_process_ended_or_whose_pid_was_reused_is_taken_over(tmp_path):
    path = tmp_path / "driver.lock"
    here = OwnerLock(path, "x")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for pid, started in ((ended.pid, "1"), (os.getpid(), "1")):  # (a pid is not reused at once)
        _record(path, machine=_machine(), pid=pid, started=started)
        here.acquire()
        assert here.holder().pid == os.getpid() and here.holder().token == here.mine.token
        here.release()


def _machine() -> str:
    from sparsity_scaling.files import _this_machine

    return _this_machine()[1]


def test_a_holder_on_another_host_counts_as_gone_only_once_its_heartbeat_stops(tmp_path):
    """Its pid means nothing here: while its heartbeat changes it holds the lock; once the
    heartbeat stays still for stale_s it is taken over."""
    path = tmp_path / "run.lock"
    stop = threading.Event()

    def beat():
        n = 0
        while not stop.wait(0.05):
            n += 1
            _record(path, host="elsewhere", pid=os.getpid(), since=1.0, heartbeat=float(n))

    _record(path, host="elsewhere", pid=os.getpid(), since=1.0)
    beating = threading.Thread(target=beat)
    beating.start()
    try:
        lock = OwnerLock(path, "trainer", heartbeat_s=0.1, stale_s=1.0)
        with pytest.raises(LockHeld, match="held by grid submit on host elsewhere"):
            lock.acquire()
    finally:
        stop.set()
        beating.join()
    lock.acquire()  # the same record for stale_s: its host is down
    assert lock.holder().host == HOST
    lock.release()


def test_a_holder_that_stalled_and_lost_its_lock_is_told(tmp_path):
    path = tmp_path / "run.lock"
    told = threading.Event()
    lock = OwnerLock(path, "trainer", heartbeat_s=0.05, on_lost=lambda holder: told.set())
    lock.acquire()
    _record(path, host="elsewhere")  # taken over while it stalled
    assert told.wait(10)
    lock.release()
    assert path.exists()  # not its lock to remove


def test_a_second_trainer_of_a_run_is_refused_before_writing(tmp_path, world_of_one, monkeypatch):
    """Two trainers of one run directory (two `train --out DIR`, two clusters, a retried Ray
    job): the one that finds the run held by a live trainer refuses, naming it."""
    from sparsity_scaling.config import load_config
    from sparsity_scaling.train import start

    monkeypatch.setattr(start, "TRAINER_WAIT_S", 0.0)
    run = RunDir(tmp_path / "run")
    with run.trainer():
        with pytest.raises(UserError, match=rf"trained now by trainer on host {re.escape(HOST)} \(pid {os.getpid()}, "):
            start.train_on_rank(load_config(MICRO), run.path)
        assert sorted(p.name for p in run.path.iterdir()) == ["trainer.lock"]


# ---------------------------------------------------------------- grid submit


def _parent(mlflow, experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    (parent,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.`sparsity_scaling.role` = 'parent'")
    return parent


def test_a_finished_grid_ends_its_parent_run_finished(grid_run):
    with tracking(Workdir(grid_run)) as uri:  # the session's server, running
        assert _parent(client(uri), "cpu_test").info.status == "FINISHED"


def _ends(pid: int, within: float = 60) -> bool:
    from sparsity_scaling.files import _process_started

    deadline = time.time() + within
    while _process_started(pid) is not None and time.time() < deadline:
        time.sleep(0.2)
    return _process_started(pid) is None


def _submit(grid: Path, address: str, workdir: Path) -> subprocess.Popen:
    """`grid submit` as a terminal starts it: SIGINT at its default, even where this test
    session inherited it ignored (a shell's background job), or Ctrl-C would never reach it."""
    return subprocess.Popen(
        [sys.executable, "-m", "sparsity_scaling.cli", "grid", "submit", str(grid), "--address", address,
         "--workdir", str(workdir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_a_second_submit_is_refused_and_an_interrupted_one_ends_at_once_killed(ray_address, tmp_path):
    """Two `grid submit` of one grid and workdir: the second is refused in one line naming the
    first, writing nothing. Ctrl-C to the first mid-run: exit 130 with how to resume (not the
    report), the parent run KILLED, nothing trained twice, every MLflow point once."""
    grid = tmp_path / "driver_test.yaml"
    grid.write_text(GRID.read_text().replace("name: cpu_test", "name: driver_test").replace(
        "../models/micro.yaml", str(MICRO)).replace("[relu, silu]", "[relu]"))
    workdir = tmp_path / "work"
    first, second = _submit(grid, ray_address, workdir), None
    relu = RunDir(workdir / "runs" / "relu")
    try:
        deadline = time.time() + 600
        while first.poll() is None and time.time() < deadline and not (workdir / "driver.lock").is_file():
            time.sleep(0.05)
        second = _submit(grid, ray_address, workdir)  # while the first starts its Ray trials
        while first.poll() is None and time.time() < deadline and not relu.trainer_lock.is_file():
            time.sleep(0.05)  # its training rank 0 has taken the run
        trainer = relu.trainer().holder()
        assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
        refused = second.communicate(timeout=120)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
    assert second.returncode == 2 and refused[0] == "" and refused[1].count("\n") == 1, refused
    assert re.fullmatch(rf"sparsity-scaling: error: workdir {re.escape(str(workdir.resolve()))}: in use by grid "
                        rf"submit on host {re.escape(HOST)} \(pid {first.pid}, since [-\d: ]+\); one grid submit "
                        r"per workdir: .*\n", refused[1]), refused[1]

    assert first.returncode == 130, (stdout[-2000:], stderr[-3000:])
    assert stderr.splitlines()[-1] == "sparsity-scaling: interrupted; rerun the same command to resume", stderr[-3000:]
    assert "stabilised" not in stderr and "Traceback" not in stderr
    assert not (workdir / "driver.lock").exists()
    assert trainer is None or _ends(trainer.pid), trainer  # the run's trainer ended with it
    # read from its store (a server would take longer to start than the reading)
    mlflow = client(f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    assert _parent(mlflow, "driver_test").info.status == "KILLED"
    steps = [(p["kind"], p["step"]) for p in relu.metric_points()]
    assert len(steps) == len(set(steps)), steps  # one trainer: each step once
    (child,) = mlflow.search_runs([mlflow.get_experiment_by_name("driver_test").experiment_id],
                                  filter_string="tags.`sparsity_scaling.run` = 'relu'")
    for key in child.data.metrics:
        points = [m.step for m in mlflow.get_metric_history(child.info.run_id, key)]
        assert len(set(points)) == len(points), key
