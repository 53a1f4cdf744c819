"""Numerical trouble and full disks fail loudly: a diverging run stops at its first
non-finite step (or skips a few, counted), a model that cannot be measured is refused, a
checkpoint that cannot be written leaves the run resumable, and no JSON file holds NaN."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GRID, MICRO, REPO, mlflow_history, run_cli

from sparsity_scaling.errors import UserError
from sparsity_scaling.rundir import RunDir
from sparsity_scaling.train.health import Health

DIVERGING = ["--set", "train.lr=1e6", "--set", "train.log_every=1", "--set", "checkpoint.first_tokens=1024"]


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def assert_strict_json(root: Path) -> int:
    """Every .json and .jsonl file under `root` parses with a strict parser (no NaN or
    Infinity); the number of files read."""
    count = 0
    for path in sorted(root.rglob("*.json*")):
        if path.suffix not in (".json", ".jsonl") or not path.is_file():
            continue
        text = path.read_text()
        documents = text.splitlines() if path.suffix == ".jsonl" else [text]
        for document in documents:
            if document.strip():
                json.loads(document, parse_constant=_refuse)
        count += 1
    return count


def test_loss_spikes_follow_the_documented_rule():
    health = Health()
    for loss in [5.0] * 9 + [9.0]:  # fewer than 10 losses known: no verdict yet
        health.finite_step(loss)
    assert health.loss_spikes == 0
    health.finite_step(5.0 * 1.25)  # the median is 5.0: at 1.25 x, not above
    health.finite_step(5.0 * 1.26)
    assert health.loss_spikes == 1
    falling = Health()
    for loss in [6.0 - 0.05 * i for i in range(100)]:  # a falling loss is never a spike
        falling.finite_step(loss)
    assert falling.loss_spikes == 0 and len(falling.recent_losses) == 50


def test_a_diverging_run_stops_at_its_first_nonfinite_step_beyond_the_allowed_skips(tmp_path):
    """lr 1e6: steps 1 and 2 are finite (a checkpoint at step 1), step 3's loss is nan and is
    skipped (train.skip_nonfinite_steps 1, counted), step 4's stops the run: one line naming
    the step, its tokens and the value; status 2; no checkpoint after the last finite one.
    Evaluating a copy of that checkpoint with a NaN in its weights is refused, and writes nothing."""
    out = tmp_path / "run"
    result = run_cli("train", str(MICRO), "--out", str(out), *DIVERGING, "--set", "train.skip_nonfinite_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsity-scaling: error: training diverged at step 4 (tokens 4,096): loss nan"), last
    assert "1 such steps skipped before" in last
    assert "warning: step 3 (tokens 3,072): loss nan, grad_norm nan: not finite, update skipped" in result.stdout
    assert "skipped steps 1" in result.stdout  # the progress line counts it
    run = RunDir(out)
    assert [c.tokens for c in run.checkpoints()] == [1024]
    assert not list(run.checkpoints_dir.glob(".tmp-*"))
    (checkpoint,) = run.checkpoints()
    assert all(torch.isfinite(t).all() for t in torch.load(checkpoint.weights, weights_only=True).values())
    assert math.isfinite(checkpoint.manifest["val_loss"])
    assert "step 4 (tokens 4,096)" in run.failed()["error"]
    points = {p["step"]: p for p in run.metric_points() if p["kind"] == "train"}
    assert sorted(points) == [1, 2, 3]
    assert points[3]["loss"] is None and points[3]["skipped"] and points[3]["skipped_steps"] == 1
    assert all(math.isfinite(points[s]["grad_norm"]) for s in (1, 2))
    assert assert_strict_json(out) >= 5

    weights = torch.load(checkpoint.weights, weights_only=True)
    next(iter(weights.values())).view(-1)[0] = float("nan")
    torch.save(weights, checkpoint.weights)
    json_out = tmp_path / "eval.json"
    result = run_cli("evaluate", "--checkpoint", str(checkpoint.path), "--json", str(json_out),
                     "--eval-tokens", "1024")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert "holds NaN or infinite values" in line and str(checkpoint.weights) in line
    assert not json_out.exists() and "activation_ratio" not in result.stdout


_FULL_DISK = """
import errno, sys, torch
real = torch.save
def save(obj, path, *args, **kwargs):
    if ".tmp-tokens_000000000002048" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(obj, path, *args, **kwargs)
torch.save = save
from sparsity_scaling.cli.program import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_write_on_a_full_disk_stops_cleanly_and_the_run_resumes(tmp_path):
    """ENOSPC while the second checkpoint is written (injected into torch.save, the layer
    under DeepSpeed's and our writes): one line naming the path and the error, status 2, no
    temporary directory, the first checkpoint intact; once there is room, the same command
    resumes from it and finishes."""
    out = tmp_path / "run"
    args = ["train", str(MICRO), "--out", str(out), "--set", "train.tokens=4096", "--set", "checkpoint.first_tokens=1024",
            "--set", "checkpoint.count=3", "--set", "checkpoint.final_count=0"]
    full = subprocess.run([sys.executable, "-c", _FULL_DISK, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert full.returncode == 2, full.stderr[-3000:]
    (line,) = [x for x in full.stderr.splitlines() if "error" in x]
    assert ".tmp-tokens_000000000002048" in line and "No space left on device (errno 28)" in line, line
    assert "earlier checkpoints intact" in line and "Traceback" not in full.stderr
    run = RunDir(out)
    assert [c.tokens for c in run.checkpoints()] == [1024]
    assert not list(run.checkpoints_dir.glob(".tmp-*"))
    run.checkpoints()[0].verify()

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from tokens_000000000001024" in again.stdout
    assert [c.tokens for c in run.checkpoints()] == [1024, 2048, 4096]
    assert run.failed() is None
    assert_strict_json(out)


def test_free_space_is_checked_before_a_checkpoint(tmp_path, monkeypatch):
    from sparsity_scaling.train import checkpoint

    run = RunDir(tmp_path)
    run.checkpoints_dir.mkdir()
    free = {"bytes": 10 * 10**9}
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("U", (), {"free": free["bytes"]}))
    assert checkpoint.check_room(run, 10**9) is None
    assert "room for 2 more checkpoint(s)" in checkpoint.check_room(run, 4 * 10**9)
    with pytest.raises(UserError, match="the next checkpoint needs about 20 GB; nothing written"):
        checkpoint.check_room(run, 20 * 10**9)


def test_a_grid_finishes_its_healthy_run_and_reports_the_diverging_one_without_retrying(ray_address, tmp_path):
    grid = tmp_path / "health_test.yaml"
    grid.write_text(f"""name: health_test
base: {MICRO}
axes:
  - zipped: {{label: [healthy, diverging], train.lr: [0.01, 1.0e6]}}
overrides:
  train.tokens: 4096
  checkpoint.first_tokens: 1024
  checkpoint.count: 2
  checkpoint.final_count: 0
resources: {{tp: 1, dp: 1, cpus_per_worker: 1}}
evaluation: {{p: 1.0, eval_tokens: 1024, last: 2, calibration_tokens: 512, pareto: false}}
max_failures: 2
""")
    workdir = tmp_path / "work"
    result = run_cli("grid", "submit", str(grid), "--address", ray_address, "--workdir", str(workdir), timeout=900)
    assert result.returncode == 2, (result.stdout[-3000:], result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert "run diverging: training diverged at step 3 (tokens 3,072): loss nan" in last, last
    assert "1 of 2 runs finished, see the report" in last
    diverging = RunDir(workdir / "runs" / "diverging")
    # not retried: one attempt in its log, and its checkpoints end before the non-finite step
    assert diverging.train_log(0).read_text().count("--- ") == 1
    assert [c.tokens for c in diverging.checkpoints()] == [1024]
    report = json.loads((workdir / "report.json").read_text())
    assert list(report["runs"]) == ["healthy"] and "step 3" in report["failed_runs"]["diverging"]
    assert "training diverged at step 3" in (workdir / "report.md").read_text()
    history = mlflow_history(workdir, "health_test")
    assert "step 3" in history["diverging"]["tags"]["failure"]
    assert len(history["healthy"]["metrics"]["grad_norm"]) >= 1
    status = run_cli("grid", "status", str(grid), "--workdir", str(workdir))
    assert "diverging: failed: training diverged at step 3" in status.stdout
    assert_strict_json(workdir)
