"""Shared fixtures: one data cache for the whole session, helpers to run ranks and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray in the tests: one node on the loopback interface, no token handshake between the
# test's `ray start` and the CLI processes it starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
MICRO = REPO / "configs" / "models" / "micro.yaml"


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenizers and datasets are cached by content: build them once per test session."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SPARSITY_SCALING_CACHE"] = str(cache)
    return cache


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `sparsity-scaling ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "sparsity_scaling.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """One uninterrupted single-process run of the micro config, shared by the tests."""
    out = tmp_path_factory.mktemp("micro") / "run"
    result = run_cli("train", str(MICRO), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray instance for every test that needs one (a start costs 10-30 s)."""
    from sparsity_scaling.parallel import free_port

    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp}"], check=True, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}"
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
