"""Numerical trouble and full disks fail loudly: a diverging run stops at its first
non-finite step (or skips a few, counted), a model that cannot be measured is refused, a
checkpoint that cannot be written leaves the run resumable, and no JSON file holds NaN."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MICRO, REPO, in_background, mlflow_history, run_cli, run_here

from sparsity_scaling.errors import UserError
from sparsity_scaling.rundir import RunDir
from sparsity_scaling.train.health import Health

DIVERGING = ["--set", "train.lr=1e6", "--set", "train.log_every=1", "--set", "checkpoint.first_tokens=1024"]


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def _nulls(value, where: str = "") -> list[str]:
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [n for key, v in value.items() for n in _nulls(v, f"{where}.{key}" if where else key)]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _nulls(v, f"{where}[{i}]")]
    return []


def assert_strict_json(root: Path) -> dict[str, list[str]]:
    """Every .json and .jsonl file the suite wrote under `root` parses with a strict parser
    (no NaN or Infinity; a grid workdir's ray/ is Ray Tune's). For each file read (its path
    under `root`), where it holds null: the writers write a value that is not finite as null,
    so a test says where nulls may be, and a NaN nulled anywhere else fails it. A .jsonl
    file's places are "LINE:key" (lines from 1)."""
    nulls = {}
    for path in sorted(root.rglob("*.json*")):
        if path.suffix not in (".json", ".jsonl") or not path.is_file() or path.relative_to(root).parts[0] == "ray":
            continue
        text = path.read_text()
        if path.suffix == ".jsonl":
            documents = [(f"{i}:", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            documents = [("", text)]
        nulls[str(path.relative_to(root))] = [prefix + n for prefix, document in documents
                                              for n in _nulls(json.loads(document, parse_constant=_refuse))]
    return nulls


_TRAINING_FILES = ("run.json", "data.json", "metrics.jsonl", "manifest.json")


def test_a_healthy_run_logs_its_gradient_norm_and_writes_only_strict_json(micro_run):
    """The shared micro run: every training point has a finite gradient norm and counts
    (no spike, no skipped step), and every JSON file of the run is strict, with no null in
    what training wrote (nothing there was not finite)."""
    train = [p for p in RunDir(micro_run).metric_points() if p["kind"] == "train"]
    assert train and all(math.isfinite(p["grad_norm"]) and p["grad_norm"] > 0 for p in train)
    assert all(math.isfinite(p["loss"]) and math.isfinite(p["lr"]) and p["tokens_per_s"] > 0 for p in train)
    assert all(p["skipped_steps"] == 0 and p["loss_spikes"] == 0 and "skipped" not in p for p in train)
    assert RunDir(micro_run).checkpoints()[-1].manifest["health"]["skipped_steps"] == 0
    files = assert_strict_json(micro_run)
    training = {name: nulls for name, nulls in files.items() if Path(name).name in _TRAINING_FILES}
    assert len(training) >= 7 and not any(training.values()), training  # run.json, data.json, metrics, manifests


def test_the_json_writers_write_what_is_not_finite_as_null_and_nothing_else():
    """The documented rule (README: a value that is not finite is null, NaN never appears),
    against the text a strict writer gives by hand; numpy's scalars are plain numbers."""
    import numpy as np

    from sparsity_scaling.files import json_line, json_text

    record = {"loss": float("nan"), "norms": [1.5, float("inf"), -float("inf"), np.float32("nan"), np.float64(0.25)],
              "nested": {"ppl": np.float64("inf"), "n": np.int64(3), "ok": np.bool_(True), "pair": (2.0, float("nan"))},
              "name": "NaN"}
    expected = {"loss": None, "norms": [1.5, None, None, None, 0.25],
                "nested": {"ppl": None, "n": 3, "ok": True, "pair": [2.0, None]}, "name": "NaN"}
    assert json_line(record) == json.dumps(expected)
    assert json.loads(json_text(record), parse_constant=_refuse) == expected
    assert '"norms": [1.5, null, null, null, 0.25]' in json_text(record)  # a list of plain values stays on one line
    assert json.loads(json_text({"x": 1e308 * 10}), parse_constant=_refuse) == {"x": None}


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
    Then a NaN put into that checkpoint's weights makes `evaluate` refuse it, writing nothing."""
    out = tmp_path / "run"
    result = run_cli("train", str(MICRO), "--out", str(out), *DIVERGING, "--set", "train.skip_nonfinite_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsity-scaling: error: training diverged at step 4 (tokens 4,096): loss nan"), last
    assert "1 earlier non-finite step(s) skipped" in last
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
    progress = _progress(result.stdout)
    assert sorted(progress) == [1, 2, 3] and all(f"| grad norm {points[s]['grad_norm']:.3g} |" in progress[s] for s in (1, 2))
    assert "| loss nan | grad norm nan |" in progress[3] and progress[3].endswith("| skipped steps 1"), progress[3]
    files = assert_strict_json(out)  # null only where the step was not finite (line 4: step 3)
    assert {name: nulls for name, nulls in files.items() if nulls} == {
        "failed.json": ["log"], "metrics.jsonl": ["4:loss", "4:grad_norm"]}
    assert len(files) >= 5

    weights = torch.load(checkpoint.weights, weights_only=True)
    next(iter(weights.values())).view(-1)[0] = float("nan")
    torch.save(weights, checkpoint.weights)
    json_out = tmp_path / "eval.json"
    result = run_here("evaluate", "--checkpoint", str(checkpoint.path), "--json", str(json_out),
                     "--eval-tokens", "1024")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert "holds NaN or infinite values" in line and str(checkpoint.weights) in line
    assert not json_out.exists() and "activation_ratio" not in result.stdout


# Losses changed on purpose, to make a step non-finite or a spike where a test needs one: a
# diverging learning rate leaves weights that give a non-finite loss ever after, so no step
# after a skipped one could be compared with the one before it. SPARSITY_TEST_TRAIN_LOSS_TIMES
# ("3:nan,12:3") multiplies the token losses of those (1-based) steps, and so every gradient,
# by those factors; SPARSITY_TEST_VALIDATION_LOSS_TIMES the validation after those steps.
# Everything that decides (the norm, the verdict, the skip, the spike rule, the save) runs
# as it is.
_SCALED_LOSSES = """
import os, sys
from sparsity_scaling.model import MiniCPM
from sparsity_scaling.train import loop
def factors(name):
    pairs = (item.split(":") for item in os.environ.get(name, "").split(",") if item)
    return {int(step): float(factor) for step, factor in pairs}
train, validation = factors("SPARSITY_TEST_TRAIN_LOSS_TIMES"), factors("SPARSITY_TEST_VALIDATION_LOSS_TIMES")
now = {"factor": None, "step": 0}
real_losses, real_step, real_validate = MiniCPM.token_losses, loop.Trainer.step, loop.Trainer.validate
def token_losses(self, tokens, targets):
    losses = real_losses(self, tokens, targets)
    return losses if now["factor"] is None else losses * now["factor"]
def step(self, index):
    now["step"] = index + 1
    now["factor"] = train.get(now["step"])
    try:
        return real_step(self, index)
    finally:
        now["factor"] = None
def validate(self):
    now["factor"] = validation.get(now["step"])  # validated after that step
    try:
        return real_validate(self)
    finally:
        now["factor"] = None
MiniCPM.token_losses, loop.Trainer.step, loop.Trainer.validate = token_losses, step, validate
from sparsity_scaling.cli.program import main
sys.exit(main(sys.argv[1:]))
"""


def _train_scaled(out: Path, train: str, validation: str = "", *settings: str) -> subprocess.CompletedProcess:
    """`train` of the micro config with the losses of some steps scaled (see above)."""
    env = {**os.environ, "SPARSITY_TEST_TRAIN_LOSS_TIMES": train, "SPARSITY_TEST_VALIDATION_LOSS_TIMES": validation}
    return subprocess.run([sys.executable, "-c", _SCALED_LOSSES, "train", str(MICRO), "--out", str(out),
                           "--set", "train.log_every=1", *settings],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=False, env=env)


def _engine_state(checkpoint) -> tuple[dict, dict]:
    """(the model's weights, the optimizer's state per parameter: AdamW's step, exp_avg and
    exp_avg_sq) in a checkpoint's DeepSpeed engine state."""
    (states,) = checkpoint.engine.glob("mp_rank_*_model_states.pt")
    state = torch.load(states, weights_only=False)
    return state["module"], state["optimizer"]["state"]


def _same_tensors(a: dict, b: dict) -> bool:
    """Whether two (nested) dicts of tensors hold equal tensors, bit for bit."""
    assert a.keys() == b.keys() and a
    return all(_same_tensors(a[k], b[k]) if isinstance(a[k], dict)
               else a[k] is b[k] is None or torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def _progress(stdout: str) -> dict[int, str]:
    """The progress lines of `train`'s output, by step."""
    return {int(line.split()[1].split("/")[0]): line for line in stdout.splitlines() if line.startswith("step ")}


def test_a_skipped_step_changes_nothing_and_a_stopped_run_resumes_with_skips_allowed(tmp_path):
    """16 steps of 1,024 tokens; checkpoints after steps 13 to 16, each keeping its engine
    state. Step 12's loss (and so its gradient) is made 3 times what it is: a loss spike
    (11 finite losses before it), in the progress line with every step's gradient norm.
    Step 14's loss is nan: without skips the run stops there. The same command with
    `train.skip_nonfinite_steps=1` (not part of the run's hash) resumes from step 13 with
    the spike counted, skips step 14 (warned, counted in metrics.jsonl, the progress line
    and the manifest): the checkpoint after it holds the same weights and AdamW state as the
    one before it. Step 15 trains; step 16's validation loss is nan: the run stops before
    that checkpoint, and failed.json says why. Nulls in JSON only where a value was nan."""
    out = tmp_path / "run"
    steps = ["--set", "train.tokens=16384", "--set", "checkpoint.first_tokens=16384", "--set", "checkpoint.count=1",
             "--set", "checkpoint.final_count=4", "--set", "checkpoint.final_fraction=0.25",
             "--set", "checkpoint.keep_engine=4"]
    first = _train_scaled(out, "12:3,14:nan", "", *steps)
    assert first.returncode == 2, first.stderr[-3000:]
    assert first.stderr.strip().splitlines()[-1].startswith(
        "sparsity-scaling: error: training diverged at step 14 (tokens 14,336): loss nan, grad_norm nan (not finite)")
    run = RunDir(out)
    assert [c.step for c in run.checkpoints()] == [13]
    assert "step 14" in run.failed()["error"]
    points = {p["step"]: p for p in run.metric_points() if p["kind"] == "train"}
    progress = _progress(first.stdout)
    assert sorted(points) == sorted(progress) == list(range(1, 14))
    assert points[12]["loss"] > 2.5 * points[11]["loss"] and points[12]["grad_norm"] > 2 * points[11]["grad_norm"]
    for step, point in points.items():
        assert f"| grad norm {point['grad_norm']:.3g} |" in progress[step], progress[step]
    assert [points[s]["loss_spikes"] for s in range(1, 14)] == [0] * 11 + [1, 1]
    assert not any("loss spikes" in progress[s] for s in range(1, 12)) and progress[12].endswith("| loss spikes 1")
    assert run.checkpoints()[-1].manifest["health"] == {**run.checkpoints()[-1].manifest["health"],
                                                         "loss_spikes": 1, "skipped_steps": 0}

    again = _train_scaled(out, "12:3,14:nan", "16:nan", *steps, "--set", "train.skip_nonfinite_steps=1")
    assert again.returncode == 2, again.stderr[-3000:]
    assert "resuming from tokens_000000000013312" in again.stdout
    assert "warning: step 14 (tokens 14,336): loss nan, grad_norm nan: not finite, update skipped (1 of " \
           "train.skip_nonfinite_steps 1)" in again.stdout
    progress = _progress(again.stdout)
    assert sorted(progress) == [14, 15, 16]
    assert all(progress[s].endswith("| loss spikes 1 | skipped steps 1") for s in progress), progress
    assert "| loss nan | grad norm nan |" in progress[14]
    (last,) = [line for line in again.stderr.splitlines() if "error" in line]
    assert last == ("sparsity-scaling: error: training diverged at step 16 (tokens 16,384): validation loss nan (not "
                    "finite); no checkpoint written after the last finite one"), last
    assert "validation loss nan" in run.failed()["error"]
    assert [c.step for c in run.checkpoints()] == [13, 14, 15] and not list(run.checkpoints_dir.glob(".tmp-*"))
    assert [c.manifest["health"]["skipped_steps"] for c in run.checkpoints()] == [0, 1, 1]

    weights = [torch.load(c.weights, weights_only=True) for c in run.checkpoints()]
    assert _same_tensors(weights[0], weights[1])  # the skipped step changed no weight
    assert not _same_tensors(weights[1], weights[2])  # (a step that trained did)
    (module_13, adam_13), (module_14, adam_14), (_, adam_15) = (_engine_state(c) for c in run.checkpoints())
    assert _same_tensors(module_13, module_14) and _same_tensors(adam_13, adam_14)  # nor the optimizer's state
    assert not _same_tensors(adam_14, adam_15)
    points = {p["step"]: p for p in run.metric_points() if p["kind"] == "train"}
    assert sorted(points) == list(range(1, 17))
    assert points[14]["loss"] is None and points[14]["grad_norm"] is None and points[14]["skipped"]
    assert points[15]["skipped_steps"] == 1 and math.isfinite(points[15]["loss"]) and "skipped" not in points[15]
    files = assert_strict_json(out)  # null only where the step was not finite (line 15: step 14)
    assert {name: nulls for name, nulls in files.items() if nulls} == {
        "failed.json": ["log"], "metrics.jsonl": ["15:loss", "15:grad_norm"],
        "checkpoints/tokens_000000000014336/manifest.json": ["train_loss"]}


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
                          timeout=600, check=False)
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
    assert not any(assert_strict_json(out).values())


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


def test_the_first_checkpoints_space_estimate_is_its_weights_and_engine_state(micro_run, tmp_path):
    """README "Full disks": before the first checkpoint, the expected size is 4 bytes per
    parameter (model.pt) plus the engine's 12 (fp32: weights, Adam's two moments) or 14
    (bf16); the micro run's newest checkpoint, engine state included, is that size to within
    5%. Once one is written, the estimate is the newest such checkpoint's size."""
    from sparsity_scaling.train.checkpoint import expected_bytes

    newest = RunDir(micro_run).checkpoints()[-1]
    assert newest.has_engine
    weights = torch.load(newest.weights, weights_only=True)
    params = sum(t.numel() for t in weights.values())
    before_any = RunDir(tmp_path / "run")
    assert expected_bytes(before_any, weights, bf16=False) == 16 * params
    assert expected_bytes(before_any, weights, bf16=True) == 18 * params
    written = sum(f.stat().st_size for f in newest.path.rglob("*") if f.is_file())
    assert 0.95 * written <= 16 * params <= 1.05 * written, (16 * params, written)
    assert expected_bytes(RunDir(micro_run), weights, bf16=False) == written


_HEALTH_GRID = """name: health_test
base: {micro}
axes:
  - zipped: {{label: [diverging, sane], train.lr: [1.0e6, 0.01], checkpoint.first_tokens: [1024, 8192],
              checkpoint.count: [2, 1]}}
overrides:
  train.tokens: 8192
  train.log_every: 1
  checkpoint.final_count: 0
resources: {{tp: 1, dp: 1, cpus_per_worker: 1}}
evaluation: {{p: 1.0, eval_tokens: 1024, last: 1, calibration_tokens: 512, pareto: false}}
max_failures: 2
"""


def _train_points(run: RunDir) -> list[dict]:
    return [p for p in run.metric_points() if p["kind"] == "train"]


def _status_rows(stdout: str) -> dict[str, list[str]]:
    """`grid status`'s table, a run's cells by its name (the header and notes left out)."""
    return {cells[0]: cells[1:] for cells in (line.split() for line in stdout.splitlines()[1:])
            if len(cells) == 9 and not cells[0].endswith(":")}


def _health_grid(place: Path, address: str) -> list[str]:
    grid = place / "health_test.yaml"
    grid.write_text(_HEALTH_GRID.format(micro=MICRO))
    return ["grid", "submit", str(grid), "--address", address, "--workdir", str(place / "work")]


in_background("health_grid", _health_grid)


@pytest.fixture
def health_grid(background):
    """The health grid's submit (in the background): (its result, its directory)."""
    return background.result("health_grid")


def test_a_diverging_grid_run_fails_once_with_its_reason_while_the_others_finish(health_grid):
    """README "Failed runs": run `diverging` (lr 1e6, a checkpoint after step 1, a non-finite
    step 3) is not retried (max_failures 2); the grid says why in one line, and `sane`
    still trains and is measured. The run directory, `grid status` and MLflow (FAILED,
    tag `failure`; `sane` FINISHED, the parent FAILED) hold it, with each run's gradient
    norms as metrics.jsonl has them."""
    result, place = health_grid
    grid, workdir = place / "health_test.yaml", place / "work"
    assert result.returncode == 2, (result.stdout[-3000:], result.stderr[-3000:])
    (line,) = [x for x in result.stderr.splitlines() if "error" in x]
    assert "run diverging: training diverged at step 3 (tokens 3,072): loss nan" in line, line
    assert line.endswith("; 1 of 2 runs finished, see the report"), line
    assert "Traceback" not in result.stderr
    diverging, sane = (RunDir(workdir / "runs" / name) for name in ("diverging", "sane"))
    assert diverging.train_log(0).read_text().count("--- ") == 1  # one attempt: not retried
    assert [c.tokens for c in diverging.checkpoints()] == [1024] and "step 3" in diverging.failed()["error"]
    assert sane.failed() is None and [c.tokens for c in sane.checkpoints()] == [8192]
    (measured,) = sane.evaluations()
    assert measured["train_tokens"] == 8192 and 0 < measured["activation_ratio"] <= 1
    assert [p["tokens"] for p in sane.sparsity_record()["checkpoints"]] == [8192]
    assert "**diverging**: training diverged at step 3" in workdir.joinpath("report.md").read_text()
    status = run_here("grid", "status", str(grid), "--workdir", str(workdir))
    assert "diverging: failed: training diverged at step 3" in status.stdout
    rows = _status_rows(status.stdout)
    for run, state, tokens in ((diverging, "failed", 2048), (sane, "done", 8192)):
        last = _train_points(run)[-1]
        assert last["tokens"] == tokens and rows[run.name][:3] == [state, f"{tokens:,}", "8,192"], rows
        assert rows[run.name][3:6] == [f"{last['loss']:.4f}", f"{last['grad_norm']:.3g}", str(last["loss_spikes"])]
    history = mlflow_history(workdir, "health_test")
    assert "step 3" in history["diverging"]["tags"]["failure"] and history["diverging"]["status"] == "FAILED"
    assert history["sane"]["status"] == "FINISHED" and "failure" not in history["sane"]["tags"]
    assert history["health_test"]["status"] == "FAILED"  # the grid's parent run: a run failed
    assert history["sane"]["metrics"]["activation_ratio_checkpoint"] == [(8192, measured["activation_ratio"])]
    for run in (diverging, sane):  # logged up to the failure, as training logged them
        logged, expected = history[run.name]["metrics"]["grad_norm"], _train_points(run)
        assert [s for s, _ in logged] == [p["tokens"] for p in expected]
        assert [v for _, v in logged] == pytest.approx([p["grad_norm"] for p in expected], rel=1e-6)
    assert [s for s, _ in history["diverging"]["metrics"]["grad_norm"]] == [1024, 2048]
    assert_strict_json(workdir)


def test_a_failed_run_that_finishes_on_a_resubmit_is_finished_in_mlflow_without_its_reason(tmp_path):
    """README "Failed runs": the trial that ends a run sets its MLflow status (`mark_outcome`);
    a run that failed (FAILED, tag `failure`) and then finishes when the grid is resubmitted
    is FINISHED, and the reason of the failed attempt no longer stands. (That a resubmit
    resumes a run from its newest checkpoint is the node-loss tests' and test_train's.)"""
    from helpers import mlflow_run_dir

    from launcher.tracking import mark_outcome

    mlflow, run_id, run_dir = mlflow_run_dir(tmp_path)
    mark_outcome(run_dir, "training diverged at step 3 (tokens 3,072): loss nan")
    failed = mlflow.get_run(run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["failure"].startswith("training diverged at step 3")
    mark_outcome(run_dir, None)
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED" and "failure" not in finished.data.tags


def test_gradient_norms_spikes_and_skipped_steps_show_in_grid_status_and_mlflow(tmp_path, capsys):
    """README "Gradient norm and loss spikes": a run whose metrics.jsonl says (by hand)
    gradient norms 2.5, 1.25, - (a skipped step), 0.8137 and loss spikes 0, 1, 1, 2, with one
    checkpoint that could not be measured: `grid status` shows the newest norm and spike
    count in its columns and notes the skipped step and the checkpoint; MLflow gets every
    point's `grad_norm` (none for the skipped step), `loss_spikes` and `skipped_steps`."""
    from helpers import mlflow_run_dir

    from launcher.tracking import sync_run
    from sparsity_scaling.cli.program import main
    from sparsity_scaling.files import write_json_atomic

    grid = tmp_path / "spikes.yaml"
    grid.write_text(f"name: spikes\nbase: {MICRO}\naxes:\n  - zipped: {{label: [spiky, quiet]}}\n"
                    "overrides: {train.tokens: 8192}\n")
    run = RunDir(tmp_path / "work" / "runs" / "spiky")
    run.path.mkdir(parents=True)
    train = {"kind": "train", "lr": 0.01, "tokens_per_s": 512.0}
    points = [{**train, "step": 1, "tokens": 1024, "loss": 6.0, "grad_norm": 2.5, "loss_spikes": 0, "skipped_steps": 0},
              {**train, "step": 2, "tokens": 2048, "loss": 7.9, "grad_norm": 1.25, "loss_spikes": 1, "skipped_steps": 0},
              {**train, "step": 3, "tokens": 3072, "loss": None, "grad_norm": None, "loss_spikes": 1, "skipped_steps": 1,
               "skipped": True},
              {"kind": "val", "step": 3, "tokens": 3072, "loss": 5.5},
              {**train, "step": 4, "tokens": 4096, "loss": 5.25, "grad_norm": 0.8137, "loss_spikes": 2, "skipped_steps": 1}]
    run.metrics.write_text("".join(json.dumps(p) + "\n" for p in points))
    write_json_atomic(run.evaluation_failure_of(run.checkpoint_dir(2048)),
                      {"checkpoint": "tokens_000000000002048", "train_tokens": 2048, "error": "weights hold NaN"})

    assert main(["grid", "status", str(grid), "--workdir", str(tmp_path / "work")]) in (0, None)
    out = capsys.readouterr().out
    rows = _status_rows(out)
    assert rows == {"spiky": ["training", "4,096", "8,192", "5.2500", "0.814", "2", "-", "0/0"],
                    "quiet": ["pending", "0", "8,192", "-", "-", "0", "-", "0/0"]}, out
    (note,) = [line for line in out.splitlines() if line.startswith("spiky:")]
    assert "2 loss spikes, 1 non-finite steps skipped, 1 checkpoints not measurable (non-finite)" in note, note

    mlflow, run_id, grid_run = mlflow_run_dir(tmp_path)
    shutil.copy(grid_run / "mlflow_run.json", run.mlflow_run)
    assert sync_run(run.path, wait=True)
    logged = {key: sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))
              for key in ("grad_norm", "loss_spikes", "skipped_steps", "train_loss")}
    assert logged == {"grad_norm": [(1024, 2.5), (2048, 1.25), (4096, 0.8137)],
                      "loss_spikes": [(1024, 0), (2048, 1), (3072, 1), (4096, 2)],
                      "skipped_steps": [(1024, 0), (2048, 0), (3072, 1), (4096, 1)],
                      "train_loss": [(1024, 6.0), (2048, 7.9), (4096, 5.25)]}


def test_a_grid_records_a_checkpoint_it_cannot_measure_in_evaluations_failed(micro_run, tmp_path, monkeypatch,
                                                                              world_of_one):
    """README "Failed runs": the grid's evaluation job of a checkpoint holding a NaN weight
    (its manifest rewritten, a complete checkpoint) writes no result but RUN/evaluations/
    failed/CHECKPOINT.json naming it and why, and leaves no job status behind."""
    from launcher import eval_queue
    from launcher.grid import Evaluation
    from sparsity_scaling.files import sha256_file

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("evaluations"))
    checkpoint = RunDir(run).checkpoints()[-1]
    weights = torch.load(checkpoint.weights, weights_only=True)
    next(iter(weights.values())).view(-1)[0] = float("nan")
    torch.save(weights, checkpoint.weights)
    manifest = {**checkpoint.manifest, "files": {**checkpoint.manifest["files"], "model.pt": sha256_file(checkpoint.weights)}}
    (checkpoint.path / "manifest.json").write_text(json.dumps(manifest))
    RunDir(run).checkpoints()[-1].verify()

    # world_of_one made this process rank 0 of a world of one, the rank that writes (as on Ray);
    # its end removes that environment (a RANK left behind would pass to later commands)
    monkeypatch.setattr(eval_queue, "this_node", lambda: ("node-1", "127.0.0.1"))
    evaluation = Evaluation(eval_tokens=1024, calibration_tokens=512)
    assert eval_queue._checkpoint_job(str(checkpoint.path), evaluation) is None
    failed = json.loads((run / "evaluations" / "failed" / f"{checkpoint.name}.json").read_text(), parse_constant=_refuse)
    assert failed["checkpoint"] == checkpoint.name and failed["train_tokens"] == checkpoint.tokens
    assert "NaN or infinite" in failed["error"], failed
    assert RunDir(run).evaluations() == [] and not RunDir(run).running_jobs()
    assert [f["checkpoint"] for f in RunDir(run).evaluation_failures()] == [checkpoint.name]


def test_the_report_names_failed_runs_and_checkpoints_left_out(tmp_path, monkeypatch):
    """A grid whose silu run failed and one of whose relu checkpoints could not be measured:
    the report covers relu, and names both. (The laws are not fitted here: test_report does.)"""
    from test_report import _relu, _report, _run

    from launcher import report
    from sparsity_scaling.files import write_json_atomic

    monkeypatch.setattr(report, "fit_runs", lambda results: {name: "not fitted in this test" for name in results})

    work = tmp_path / "work"
    RunDir(work / "runs" / "silu").mark_failed("training diverged at step 7 (tokens 7,168): loss nan")
    relu = RunDir(work / "runs" / "relu")
    write_json_atomic(relu.evaluation_failure_of(relu.checkpoint_dir(4096)),
                      {"checkpoint": "tokens_000000000004096", "train_tokens": 4096, "error": "weights hold NaN"})
    doc, data = _report(work, {"relu": _run("relu", "relu", _relu)})
    assert list(data["runs"]) == ["relu"]
    assert data["failed_runs"] == {"silu": "training diverged at step 7 (tokens 7,168): loss nan"}
    assert data["checkpoints_left_out"]["relu"] == [{"checkpoint": "tokens_000000000004096", "error": "weights hold NaN"}]
    text = doc.markdown("report_files")
    assert "## Failed runs" in text and "**silu**: training diverged at step 7" in text
    assert "## Checkpoints left out" in text and "tokens_000000000004096: weights hold NaN" in text
    write_json_atomic(tmp_path / "report.json", data)
    assert_strict_json(tmp_path)


def test_a_model_whose_dense_perplexity_is_not_finite_is_refused(micro_run, tmp_path):
    """A copy of the micro run's final checkpoint whose final norm is scaled by 1e30: every
    weight is finite (the loading check passes), the logits are finite, but the loss is
    about 1e30, so the dense perplexity is inf. `evaluate` refuses it in one line naming
    the checkpoint, exit status 2, no traceback, and writes no result file."""
    from sparsity_scaling.files import sha256_file

    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("evaluations"))
    checkpoint = RunDir(run).checkpoints()[-1]
    weights = torch.load(checkpoint.weights, weights_only=True)
    weights["final_norm.weight"] *= 1e30
    assert all(torch.isfinite(t).all() for t in weights.values())
    torch.save(weights, checkpoint.weights)
    manifest = {**checkpoint.manifest, "files": {**checkpoint.manifest["files"], "model.pt": sha256_file(checkpoint.weights)}}
    (checkpoint.path / "manifest.json").write_text(json.dumps(manifest))
    RunDir(run).checkpoints()[-1].verify()  # a complete checkpoint, as training writes one

    results = tmp_path / "results"
    results.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_here("evaluate", "--checkpoint", str(checkpoint.path), "--json", str(results / "eval.json"),
                     "--eval-tokens", "1024")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "error" in x]
    assert line == (f"sparsity-scaling: error: {checkpoint.path}: dense perplexity inf on the validation data is not "
                    "finite; the model cannot be measured"), line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no result, no thresholds
    assert "activation_ratio" not in result.stdout


def test_a_result_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    from sparsity_scaling import files

    target = tmp_path / "evaluations" / "tokens_1.json"
    files.write_json_atomic(target, {"activation_ratio": 0.1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(UserError, match=f"^{target}: cannot write: No space left on device \\(errno 28\\)$"):
        files.write_json_atomic(target, {"activation_ratio": float("nan")})
    assert json.loads(target.read_text()) == {"activation_ratio": 0.1} and os.listdir(target.parent) == [target.name]
