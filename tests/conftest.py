"""Shared fixtures: one data cache for the whole session, the trained micro run, one Ray
instance, and the slow commands that run in the background (helpers are in helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from helpers import BACKGROUND, GRID, MICRO, BackgroundCommand, in_background, run_cli, server_outlived


# Ray in the tests: one node on the loopback interface, no token handshake between the
# test's `ray start` and the CLI processes it starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenizers and datasets are cached by content: build them once per test session."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SPARSITY_SCALING_CACHE"] = str(cache)
    return cache


@pytest.fixture
def world_of_one():
    """megatron's process groups for a world of one, in the test's process, ended after the
    test (processes it starts later must not take themselves for its ranks)."""
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel

    init_parallel(1)
    yield
    shutdown_parallel()


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """One uninterrupted single-process run of the micro config, shared by the tests."""
    out = tmp_path_factory.mktemp("micro") / "run"
    result = run_cli("train", str(MICRO), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def start_own_ray(temp: Path, env: dict) -> dict:
    """A local Ray instance of 2 CPUs whose files are under `temp`: {"address": GCS address,
    "port": its port, "dashboard": the dashboard's URL, for Ray Jobs}. Jobs it runs find
    this environment's Python first on their PATH."""
    from sparsity_scaling.parallel import free_port

    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp}",
                    # not Ray's fixed defaults (52365, 10001): another Ray instance on the machine
                    # holding them leaves this one without a job agent ("No available agent")
                    f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
                   check=True, capture_output=True, timeout=180, env=env)
    return {"address": f"127.0.0.1:{port}", "port": port, "dashboard": f"http://127.0.0.1:{dashboard}"}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> dict:
    """One local Ray instance for every test that needs one (a start costs 10-30 s), with its
    dashboard for Ray Jobs: {"address": GCS address, "dashboard": its URL}."""
    temp = tmp_path_factory.mktemp("ray")
    ray = start_own_ray(temp, dict(os.environ))
    yield ray
    stop_own_ray(temp, ray["port"])


def stop_own_ray(temp: Path, port: int) -> None:
    """End the Ray instance started with `temp` and GCS `port`, and every process under it:
    its own processes name the one or the other on their command line. (`ray stop` would end
    every Ray instance of the machine, another session's too.)"""
    own = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
           and any(str(temp) in arg or arg.endswith(f":{port}") for arg in p.info["cmdline"] or [])]
    processes = {p.pid: p for p in own}
    for process in own:
        try:
            processes.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for process in processes.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(processes.values()), timeout=30)


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    return ray_cluster["address"]


class Background:
    """The collected tests' background commands, one after another on a Ray instance of their
    own (the shared instance's CPUs stay the other tests'), in a thread. Each runs in the
    session's environment at its start: a RANK that a test sets later must not reach them."""

    def __init__(self, commands: list[BackgroundCommand], temp: Path):
        import concurrent.futures

        self.commands, self.temp, self.env, self.ray, self.stopping = commands, temp, dict(os.environ), {}, False
        self.results = {c.fixture: concurrent.futures.Future() for c in commands}
        self.thread = threading.Thread(target=self._run, name="background commands", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.ray.update(start_own_ray(self.temp / "ray", self.env))
            for command in self.commands:
                if self.stopping:
                    raise RuntimeError("the test session ended first")
                place = self.temp / command.fixture
                place.mkdir()
                try:
                    args = command.args(place, self.ray["address"])
                    self.results[command.fixture].set_result((run_cli(*args, timeout=900, env=self.env), place))
                except BaseException as error:
                    self.results[command.fixture].set_exception(error)
        except BaseException as error:  # no Ray instance: every command fails with its reason
            for result in self.results.values():
                if not result.done():
                    result.set_exception(error)
        finally:
            self.stop()

    def result(self, fixture: str) -> tuple[subprocess.CompletedProcess, Path]:
        return self.results[fixture].result(timeout=900 * len(self.commands) + 180)

    def stop(self) -> None:
        """End the Ray instance and what runs on it (a command cut off goes with it)."""
        self.stopping = True
        if "port" in self.ray:
            stop_own_ray(self.temp / "ray", self.ray["port"])


in_background("grid_run", lambda place, address: ["grid", "submit", str(GRID), "--address", address,
                                                   "--workdir", str(place / "work")])


@pytest.fixture(scope="session", autouse=True)
def background(request, data_cache, tmp_path_factory):
    """The background commands of the collected tests, started with the session."""
    wanted = {name for item in request.session.items for name in item.fixturenames}
    commands = [command for command in BACKGROUND if command.fixture in wanted]
    runner = Background(commands, tmp_path_factory.mktemp("bg")) if commands else None
    yield runner
    if runner is not None:
        runner.stop()
        runner.thread.join(timeout=60)


@pytest.fixture(scope="session")
def grid_run(background):
    """The cpu_test grid, submitted once, in the background: its workdir. Its MLflow
    server is kept running for the session (a start costs seconds): the commands and
    tests that read it find it running, as a user's would."""
    from launcher.tracking import start_local_server, stop_local_server
    from launcher.workdir import Workdir

    result, place = background.result("grid_run")
    workdir = place / "work"
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    (workdir / "submit.log").write_text(result.stdout)
    (workdir / "submit.err").write_text(result.stderr)
    (workdir / "mlflow_after_submit").write_text("running" if server_outlived(Workdir(workdir)) else "stopped")
    start_local_server(Workdir(workdir))
    yield workdir
    stop_local_server(Workdir(workdir))
