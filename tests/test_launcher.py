"""The launcher on a real local Ray instance and a real MLflow server on SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import GRID, REPO, mlflow_history, run_cli, run_here
from sparsity_scaling.parallel import free_port
from sparsity_scaling.rundir import RunDir


def _same_points(logged, expected) -> None:
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_submit_prints_its_own_progress_lines_not_tunes_table(grid_run):
    log = (grid_run / "submit.log").read_text()
    assert "Trial Status" not in log and "RUNNING" not in log  # Tune's periodic table is gone
    assert "Configuration for experiment" not in log + (grid_run / "submit.err").read_text()  # and its banner
    assert "| loss " not in log  # the workers' step lines are in the runs' logs
    assert "| loss " in RunDir(grid_run / "runs" / "relu").train_log(0).read_text()
    for name in ("relu", "silu"):
        lines = [line for line in log.splitlines() if line.startswith(f"[grid cpu_test] {name}: ")]
        assert lines and lines[-1].startswith(f"[grid cpu_test] {name}: done, 16.4K/16.4K tokens, activation ratio ")
    assert "checkpoints measured " in log  # the evaluation phase is visible


def test_progress_names_a_running_search_and_a_failure_with_its_log(grid_run, tmp_path):
    """What `grid status` and the progress lines say of an evaluation job mid-search (retried
    once) and of a failed run."""
    import shutil

    from launcher.grid import load_grid
    from launcher.status import progress_line, run_state
    from sparsity_scaling.files import write_json_atomic

    (spec,) = [s for s in load_grid(GRID).runs if s.name == "relu"]
    run = RunDir(tmp_path / "relu")
    shutil.copytree(grid_run / "runs" / "relu", run.path)
    run.sparsity.unlink()
    write_json_atomic(run.job_status("stabilised"), {"job": "stabilised", "node_id": "n", "ip": "127.0.0.1",
                                                     "attempt": 2, "search_step": 3, "cett": 0.21, "ppl_ratio": 1.0132})
    line = progress_line(run_state(run, spec))
    assert line.startswith("relu: evaluating, 16.4K/16.4K tokens, ")
    assert line.endswith("stabilising CETT (search step 3: CETT 0.2100, PPL ratio 1.0132; attempt 2)")
    write_json_atomic(run.failure, {"error": "ValueError: boom", "log": str(run.evaluation_log)})
    assert progress_line(run_state(run, spec)) == f"relu: failed: ValueError: boom (log: {run.evaluation_log})"


def test_training_keeps_priority_over_evaluation(grid_run):
    """The cluster holds one training at a time (1.5 CPUs of 2 each): no evaluation job
    starts before the last run has its training resources, so none delays a training."""
    runs = [RunDir(grid_run / "runs" / name) for name in ("relu", "silu")]
    last_training_began = max(run.nodes()[0]["since"] for run in runs)  # its first worker, on its node
    jobs = [record["evaluated_on"] for run in runs for record in [*run.evaluations(), run.sparsity_record()]]
    assert len(jobs) == 2 * 5 and all(job["attempt"] == 1 for job in jobs)  # 4 checkpoints and the stabilising
    assert min(job["started"] for job in jobs) > last_training_began


def test_grid_trains_evaluates_and_mirrors_everything_in_mlflow(grid_run):
    runs = mlflow_history(grid_run, "cpu_test")
    parent = runs.pop("cpu_test")
    assert set(runs) == {"relu", "silu"}
    for name, run in runs.items():
        assert run["tags"]["mlflow.parentRunId"] == parent["id"]
        assert run["tags"]["activation"] == name and run["tags"]["grid"] == "cpu_test"
        run_dir = grid_run / "runs" / name
        stabilised = json.loads((run_dir / "sparsity.json").read_text())
        expected = [(p["tokens"], p["activation_ratio"]) for p in stabilised["checkpoints"]]
        _same_points(run["metrics"]["activation_ratio"], expected)
        assert [s for s, _ in expected] == [c.tokens for c in RunDir(run_dir).checkpoints()]
        per_checkpoint = sorted(json.loads(f.read_text())["activation_ratio"] for f in (run_dir / "evaluations").glob("*.json"))
        assert sorted(v for _, v in run["metrics"]["activation_ratio_checkpoint"]) == pytest.approx(per_checkpoint)
        converged = sorted(float(json.loads(f.read_text())["converged"]) for f in (run_dir / "evaluations").glob("*.json"))
        assert sorted(v for _, v in run["metrics"]["converged_checkpoint"]) == converged  # each search's outcome
        _same_points(run["metrics"]["converged"], [(t, float(stabilised["converged"])) for t, _ in expected])
        train = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
        _same_points(run["metrics"]["train_loss"], [(p["tokens"], p["loss"]) for p in train])
        for key in ("lr", "tokens_per_s", "grad_norm"):
            _same_points(run["metrics"][key], [(p["tokens"], p[key]) for p in train])
        _same_points(run["metrics"]["cett"], [(t, stabilised["cett"]) for t, _ in expected])
        layers = len(stabilised["checkpoints"][0]["layer_activation_ratios"])
        assert layers == 2 and f"layer_activation_ratio/{layers}" not in run["metrics"]  # the micro model's
        for i in range(layers):
            _same_points(run["metrics"][f"layer_activation_ratio/{i}"],
                         [(p["tokens"], p["layer_activation_ratios"][i]) for p in stabilised["checkpoints"]])
    status = run_here("grid", "status", str(GRID), "--workdir", str(grid_run))
    assert status.returncode == 0 and status.stdout.count(" done ") == 2
    assert (grid_run / "mlflow_after_submit").read_text() == "stopped"  # see grid_run


def test_curves_and_laws_read_the_grid_from_mlflow(grid_run, tmp_path):
    out = tmp_path / "curves.csv"
    result = subprocess.run([sys.executable, "tools/curves.py", "--experiment", "cpu_test", "--workdir", str(grid_run),
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = out.read_text().splitlines()
    stabilised = json.loads((grid_run / "runs" / "relu" / "sparsity.json").read_text())["checkpoints"]
    relu_rows = [r.split(",") for r in rows[1:] if r.startswith("relu,")]
    assert [(int(r[1]), float(r[2])) for r in relu_rows] == [(p["tokens"], pytest.approx(p["activation_ratio"])) for p in stabilised]
    png = tmp_path / "curves.png"
    assert subprocess.run([sys.executable, "tools/curves.py", "--experiment", "cpu_test", "--workdir", str(grid_run),
                           "--out", str(png)], capture_output=True, cwd=REPO, timeout=300).returncode == 0
    assert png.stat().st_size > 10_000


def test_fit_laws_and_predict_tokens_read_curves_from_mlflow(grid_run, tmp_path, capsys):
    """The README's MLflow path (`--experiment NAME --workdir DIR`) on the grid's MLflow store:
    the laws fitted on the curves MLflow holds are those fitted on the same curves in memory,
    and the budgets predicted from the experiment are those of that fit. (The grid's own
    curves are too short for a law: two runs of 14 checkpoints are logged beside them.)"""
    import numpy as np
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from launcher.tracking import tracking
    from launcher.workdir import Workdir
    from sparsity_scaling.cli.laws import fit_main, predict_main
    from sparsity_scaling.laws.curvefit import DEFAULT_WINDOW, fit_curves
    from sparsity_scaling.laws.fitted import read_fit_file
    from sparsity_scaling.laws.io import Curve
    from sparsity_scaling.laws.predict import predict_tokens

    tokens = [int(t) for t in np.geomspace(2.5e5, 3e6, 14)]
    D, noise = np.asarray(tokens) / 1e9, np.random.default_rng(0).normal(0, 0.001, 14)
    curves = {"relu": Curve("relu", tokens, np.exp(-60 * D**0.5 - 1) + 0.05 + noise, activation="relu"),
              "silu": Curve("silu", tokens, -0.002 / D**0.5 + 0.3 + noise, activation="silu")}
    source = ["--experiment", "laws_test", "--workdir", str(grid_run)]
    fit = tmp_path / "fit.json"
    with tracking(Workdir(grid_run)) as uri:  # one MLflow server, which each command below finds running
        mlflow = MlflowClient(uri)
        experiment = mlflow.create_experiment("laws_test")
        for name, curve in curves.items():
            run = mlflow.create_run(experiment, run_name=name, tags={"activation": name, "run": name}).info.run_id
            mlflow.log_batch(run, metrics=[Metric("activation_ratio", float(a), 0, int(t))
                                           for t, a in zip(curve.tokens, curve.activation_ratio)])
        fitted_code = fit_main([*source, "--json", str(fit), "--bootstrap", "8"])
        fit_err = capsys.readouterr().err
        predicted_code = predict_main([*source, "--target", "0.06", "--json"])
        predicted = capsys.readouterr().out
        unknown_code = predict_main([*source, "--target", "0.06", "--model", "gelu"])
        unknown_err = capsys.readouterr().err
        # a shared server by its URI, the runs chosen by an MLflow filter
        filtered_code = predict_main(["--experiment", "laws_test", "--tracking-uri", uri, "--filter",
                                      "tags.activation = 'relu'", "--target", "0.06", "--json"])
        filtered = capsys.readouterr().out
    assert fitted_code == 0 and predicted_code == 0, fit_err
    expected = fit_curves(curves, DEFAULT_WINDOW, n_bootstrap=8)
    fitted = json.loads(fit.read_text())["models"]
    assert set(fitted) == {"relu", "silu"}
    for name, result in expected.items():
        assert fitted[name]["points_used"] == 13
        for coefficient in result.fitted.law.coefficients:
            assert fitted[name][coefficient] == pytest.approx(result.fitted.coefficient(coefficient), rel=1e-6)
    predicted = json.loads(predicted)["models"]
    assert set(predicted) == {"relu", "silu"}
    assert filtered_code == 0 and json.loads(filtered)["models"] == {"relu": predicted["relu"]}
    for name, law in read_fit_file(fit).items():
        expected = predict_tokens(law, 0.06)
        assert predicted[name]["reachable"] == expected.reachable
        if expected.reachable:
            assert predicted[name]["tokens"] == pytest.approx(expected.tokens, rel=1e-6)
    # the experiment is named where the models were looked for
    assert unknown_code == 2 and unknown_err.count("\n") == 1, unknown_err
    assert unknown_err.startswith("predict_tokens.py: error: experiment laws_test: no model 'gelu' (models: ")


def test_the_shortened_demo_reports_what_mlflow_holds(grid_run):
    """`grid submit` ends with the report: its tables are MLflow's numbers, its laws and
    findings follow from them, and it is logged on the grid's parent run."""
    from mlflow.tracking import MlflowClient

    from launcher.tracking import tracking
    from launcher.workdir import Workdir

    runs = mlflow_history(grid_run, "cpu_test")
    parent = runs.pop("cpu_test")
    data = json.loads((grid_run / "report.json").read_text())
    markdown = (grid_run / "report.md").read_text()
    assert set(data["runs"]) == set(runs) and data["parent_run_id"] == parent["id"]
    with tracking(Workdir(grid_run)) as uri:
        mlflow = MlflowClient(uri)
        pareto = {name: json.loads(Path(mlflow.download_artifacts(run["id"], "pareto.json", str(grid_run / f".{name}"))).read_text())
                  for name, run in runs.items()}
        logged = {Path(a.path).name for a in mlflow.list_artifacts(parent["id"], "report")}
    assert logged == {"report.md", "report.html", "report.json"}
    for name, run in runs.items():
        reported = data["runs"][name]
        for key in ("activation_ratio", "activation_ratio_checkpoint", "train_loss", "val_loss"):
            assert [tuple(p) for p in reported["metrics"][key]] == run["metrics"][key]
        for tokens, value in run["metrics"]["activation_ratio"]:
            row = next(line for line in markdown.splitlines() if line.startswith(f"| {tokens:,} |"))
            assert f"{value:.4f}" in row
        assert reported["pareto"] == pareto[name]
        methods = {row["method"] for row in pareto[name]["points"]}
        assert methods == ({"ppl-p", "topk", "fat", "top-p", "relu"} - ({"relu"} if name == "silu" else set()))
        for row in pareto[name]["points"]:
            assert f"| {row['activation_ratio']:.4f} | {row['ppl_ratio']:.4f} |" in markdown
        # 4 checkpoints: fewer than either law needs (two more than its coefficients: ReLU's
        # exp(-c D^alpha + b) + A0 has 4, SiLU's -c / D^alpha + A0 has 3), said, not hidden. The
        # fitted branch is test_report's, on curves long enough with known coefficients.
        assert len(run["metrics"]["activation_ratio"]) == 4
        error = reported["fit"]["error"]
        assert f"needs at least {6 if name == 'relu' else 5}" in error and f"No law fitted: {error}" in markdown
    relu, silu = (runs[n]["metrics"]["activation_ratio"][-1][1] for n in ("relu", "silu"))
    verdict = "reproduced" if relu < silu else "not reproduced"
    assert data["findings"][0]["verdict"] == verdict
    assert f"**{verdict}**: ReLU models are sparser" in markdown
    html = (grid_run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3

    written = {name: (grid_run / name).read_bytes() for name in ("report.json", "report.md", "report.html")}
    try:
        again = run_here("grid", "report", str(GRID), "--workdir", str(grid_run), "--target", "0.5", "--target", "0.2")
        assert again.returncode == 0, again.stderr[-2000:]
        assert json.loads((grid_run / "report.json").read_text())["targets"] == [0.5, 0.2]
        bad = run_here("grid", "report", str(GRID), "--workdir", str(grid_run), "--target", "1.5")
        assert bad.returncode == 2 and "--target 1.5" in bad.stderr and bad.stderr.count("\n") == 1
        assert json.loads((grid_run / "report.json").read_text())["targets"] == [0.5, 0.2]  # nothing lost
    finally:  # the shared grid's report as the submit wrote it, for the tests after this one
        for name, content in written.items():
            (grid_run / name).write_bytes(content)


def test_resubmitting_as_a_ray_job_is_a_no_op(grid_run, ray_cluster):
    """`ray job submit --working-dir . -- sparsity-scaling grid submit ...`, as Ray users
    submit to a remote cluster: the driver runs on the cluster, joins it through the
    RAY_ADDRESS Ray gives it, finds every run finished, and changes nothing in MLflow."""
    before = mlflow_history(grid_run, "cpu_test")
    report = grid_run / "report.json"
    written = report.stat().st_mtime
    ray = str(Path(sys.executable).with_name("ray"))
    for _ in range(4):  # a loaded head's dashboard agent can register a while after the dashboard answers
        result = subprocess.run(
            [ray, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(REPO), "--",
             "sparsity-scaling", "grid", "submit", str(GRID.relative_to(REPO)), "--workdir", str(grid_run)],
            capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent to submit job" not in result.stdout + result.stderr:
            break
        time.sleep(10)
    assert result.returncode == 0 and "succeeded" in result.stdout, (result.stdout[-3000:], result.stderr[-3000:])
    assert "[grid cpu_test] relu: done" in result.stdout and "ETA" not in result.stdout  # nothing trained again
    assert report.stat().st_mtime > written  # the job's driver wrote the report
    after = mlflow_history(grid_run, "cpu_test")
    assert {k: v["metrics"] for k, v in after.items()} == {k: v["metrics"] for k, v in before.items()}


@pytest.mark.parametrize(
    "grid_text, message",
    [
        ("name: g\nbase: ../models/micro.yaml\naxes: [{product: {model.activaton: [relu]}}]\n", "model.activaton"),
        ("name: g\nbase: ../models/micro.yaml\naxes: [{list: [{train.lr: 0.1}, {train.lr: 0.1}]}]\n", "share the output directory"),
        ("name: g\nbase: ../models/micro.yaml\naxes: [{triangle: {train.lr: [1]}}]\n", "unknown axis kind"),
        ("name: g\nbase: ../models/micro.yaml\nevaluation: {tp: 3}\n", "evaluation.tp 3 does not divide model.n_heads 4"),
    ],
)
def test_invalid_grids_are_refused_before_anything_runs(tmp_path, grid_text, message):
    grid = tmp_path / "g.yaml"  # not beside the shipped grids: nothing is written into the source tree
    grid.write_text(grid_text.replace("../models/micro.yaml", str(REPO / "configs" / "models" / "micro.yaml")))
    result = run_here("grid", "plan", str(grid))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_data_paths_in_a_grid_file_are_relative_to_it():
    """The decay demo's grid names its corpora relative to itself, as `base`: each run gets
    them absolute (Ray workers do not share the driver's working directory)."""
    from launcher.grid import load_grid

    corpora = (REPO / "runs" / "corpora").resolve()
    runs = {spec.name: spec.config for spec in load_grid(REPO / "configs" / "grids" / "decay.yaml").runs}
    assert set(runs) == {"code_only", "prose_decay"}
    for config in runs.values():
        assert config.data.tokenizer == str(corpora / "code.model")
        assert [part.prefix for part in config.data.blend] == [str(corpora / "code")]
        assert config.data.corpus == "stdlib"  # the built-in corpus' name is not a path
    assert runs["code_only"].train.decay_data is None
    assert [part.prefix for part in runs["prose_decay"].train.decay_data] == [str(corpora / "prose")]


def test_evaluation_resources_no_node_has_are_refused_before_anything_runs(tmp_path, ray_address):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: g\nbase: {REPO / 'configs' / 'models' / 'micro.yaml'}\nevaluation: {{gpus: 1}}\n")
    result = run_here("grid", "submit", str(grid), "--address", ray_address, "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluation.gpus 1: no node has that many GPUs (the most on one node: 0)" in result.stderr
    assert not (tmp_path / "w").exists()
    assert "evaluation jobs: 1 CPU, 1 GPU" in run_here("grid", "plan", str(grid)).stdout


def test_an_evaluation_job_across_two_tensor_parallel_ranks_matches_one_rank(micro_run, tmp_path, ray_address):
    """The grid's evaluation job (a placement group of `evaluation.tp` Ray workers forming
    one process group) gives the activation ratio of a single-rank job."""
    import shutil

    import ray

    from launcher.eval_queue import _checkpoint_job, run_job
    from launcher.grid import Evaluation

    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    checkpoint = str(RunDir(run).checkpoints()[-1].path)
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        one_rank = Evaluation(eval_tokens=4096, cpus=1)
        one = run_job(one_rank, 60, RunDir(run).evaluation_log, "one", _checkpoint_job, checkpoint, one_rank)
        two_ranks = Evaluation(eval_tokens=4096, cpus=1, tp=2)
        two = run_job(two_ranks, 60, RunDir(run).evaluation_log, "two", _checkpoint_job, checkpoint, two_ranks)
    finally:
        ray.shutdown()
    assert two["activation_ratio"] == pytest.approx(one["activation_ratio"], abs=2e-3)
    assert two["cett"] == pytest.approx(one["cett"], rel=1e-2)
    assert two["dense_ppl"] == pytest.approx(one["dense_ppl"], rel=1e-5)
    written = json.loads((RunDir(run).evaluation_of(Path(checkpoint))).read_text())
    assert written.pop("evaluated_on")["attempt"] == 1
    assert written == two  # rank 0 wrote it, once
    assert not RunDir(run).running_jobs()  # the job's status went with its result
    assert "Traceback" not in RunDir(run).evaluation_log.read_text()  # the ranks' output


def test_a_series_measured_as_cluster_jobs_is_the_grids_own_trajectory(grid_run, ray_address, tmp_path, capsys):
    """`evaluate-series --address`: the CETT search, then one job per model at once, gives
    the stabilised trajectory the grid computed for the run in one job."""
    import ray

    from sparsity_scaling.cli import main

    run = RunDir(grid_run / "runs" / "relu")
    out = tmp_path / "series.json"
    checkpoints = [str(c.path) for c in run.checkpoints()]
    try:
        status = main(["evaluate-series", *checkpoints, "--address", ray_address, "--cpus", "0.5", "--out", str(out),
                       "--last", "3", "--eval-tokens", "2048", "--calibration-tokens", "1024"])
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert status == 0, printed
    series, grid = json.loads(out.read_text()), run.sparsity_record()
    assert series["cett"] == grid["cett"] and series["last"] == grid["last"] == 3
    assert series["token_passed"] == [p["tokens"] for p in grid["checkpoints"]]
    assert series["activation_ratio"] == pytest.approx([p["activation_ratio"] for p in grid["checkpoints"]],
                                                       rel=1e-9)
    assert f"[{len(checkpoints)}/{len(checkpoints)}]" in printed  # a line per finished job
    assert f"{Path(checkpoints[-1]).name}: activation ratio" in (tmp_path / "series.json.log").read_text()


def test_a_checkpoint_too_large_for_one_device_is_refused_with_the_tp_it_needs(micro_run):
    from sparsity_scaling.errors import SettingError
    from sparsity_scaling.evaluation.jobs import check_fits

    checkpoint = RunDir(micro_run).checkpoints()[-1]
    size = checkpoint.weights.stat().st_size
    check_fits(checkpoint, tp=1, free_bytes=2 * size)
    with pytest.raises(SettingError, match="do not fit one device .* it needs tp of at least 3"):
        check_fits(checkpoint, tp=2, free_bytes=size // 2)
    check_fits(checkpoint, tp=3, free_bytes=size // 2)


def test_unreachable_ray_and_mlflow_are_clear_errors(tmp_path, ray_address):
    dead = f"127.0.0.1:{free_port()}"
    result = run_cli("grid", "submit", str(GRID), "--address", dead, "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2 and "no Ray cluster reachable" in result.stderr
    env_uri = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "sparsity_scaling.cli", "grid", "submit", str(GRID), "--address", ray_address,
         "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": env_uri}, timeout=300,
    )
    assert result.returncode == 2 and "cannot be opened" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "runs").exists()


def test_points_logged_while_the_server_is_down_arrive_later(grid_run, tmp_path):
    from launcher.tracking import start_local_server, sync_run
    from launcher.workdir import Workdir

    run_dir = tmp_path / "run"
    source = grid_run / "runs" / "relu"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text((source / "metrics.jsonl").read_text())
    workdir = tmp_path / "work"
    uri = start_local_server(Workdir(workdir))
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(uri)
    run_id = mlflow.create_run(mlflow.create_experiment("outage")).info.run_id
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    pid = json.loads((workdir / "mlflow" / "server.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    time.sleep(1)
    assert sync_run(run_dir, wait=True) is False  # postponed, not lost
    cursor = run_dir / "mlflow_cursor.json"
    assert not cursor.exists() or json.loads(cursor.read_text())["delivered"] == {}
    assert start_local_server(Workdir(workdir)) == uri  # the server returns on its port
    assert sync_run(run_dir, wait=True) is True and sync_run(run_dir, wait=True) is True
    train = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    history = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    _same_points(sorted((m.step, m.value) for m in history), [(p["tokens"], p["loss"]) for p in train])
    os.killpg(json.loads((workdir / "mlflow" / "server.json").read_text())["pid"], signal.SIGKILL)
