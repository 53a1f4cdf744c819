"""The grid report built from run results (as `collect` reads them from MLflow), without
training: findings, fitted laws, budgets, tables and embedded pictures."""

from __future__ import annotations

import re

import numpy as np
import pytest

from helpers import REPO
from launcher.grid import load_grid
from launcher.report import RunResult, build_report, findings, sparsity_buys
from launcher.workdir import Workdir

TOKENS = [int(t) for t in np.geomspace(2.5e5, 3e6, 14)]


def _relu(D, noise):
    return np.exp(-60 * D**0.5 - 1) + 0.05 + noise


def _silu(D, noise):
    return -0.002 / D**0.5 + 0.3 + noise


# the laws written out for scipy, and the generating coefficients as its fixed start
INDEPENDENT = {
    "relu": (lambda D, alpha, b, c, A0: np.exp(-c * D**alpha + b) + A0, ("alpha", "b", "c", "A0"), (0.5, -1, 60, 0.05)),
    "silu": (lambda D, alpha, c, A0: -c / D**alpha + A0, ("alpha", "c", "A0"), (0.5, 0.002, 0.3)),
}


def _run(name, activation, law, seed=0):
    D = np.asarray(TOKENS) / 1e9
    ratios = law(D, np.random.default_rng(seed).normal(0, 0.001, len(D)))
    metrics = {
        "activation_ratio": list(zip(TOKENS, ratios.tolist())),
        "activation_ratio_checkpoint": list(zip(TOKENS, (ratios * 1.1).tolist())),
        "cett": [(t, 0.09) for t in TOKENS],
        "train_loss": [(t, 5.0 / (1 + i)) for i, t in enumerate(TOKENS)],
        "val_loss": [(t, 5.2 / (1 + i)) for i, t in enumerate(TOKENS)],
    }
    pareto = {"train_tokens": TOKENS[-1], "dense_ppl": 20.0, "points": [
        {"method": "ppl-p", "param": p, "activation_ratio": 0.05 * p, "ppl_ratio": 1 + p / 100, "cett": 0.05 * p}
        for p in (0.5, 1.0, 2.0)] + [
        {"method": "topk", "param": k, "activation_ratio": k / 320, "ppl_ratio": 1 + 0.5 / k} for k in (16, 64, 256)]}
    tags = {"activation": activation, "scale": "tiny", "params": "800000", "width_depth_ratio": "32.0", "run": name}
    return RunResult(name, f"id-{name}", tags, metrics, pareto)


SAME_BUT_ACTIVATION = {"relu": "same", "silu": "same"}  # the two runs' configs differ in the activation alone


def _report(tmp_path, results, targets=(0.06, 0.25)):
    grid = load_grid(REPO / "configs" / "grids" / "demo.yaml")
    return build_report(grid, "http://127.0.0.1:1", Workdir(tmp_path), list(targets), "1", "parent", results)


@pytest.fixture(scope="module")
def results():
    return {"relu": _run("relu", "relu", _relu), "silu": _run("silu", "silu", _silu)}


SPEEDUP = {"checkpoint": "tokens_000000003000000", "device": "cpu", "threads": 2, "batch": 1, "points": [
    {"activation_ratio": r, "ffn_flop_fraction": f, "flop_bound": 1 / f, "ffn_speedup": s, "model_speedup": m}
    for r, f, s, m in ((0.3, 0.53, 1.5, 1.2), (0.06, 0.37, 2.1, 1.4))]}


DOWNSTREAM = {"checkpoint": "tokens_000000003000000", "train_tokens": 3_000_000, "tasks": ["sparsity_smoke"],
              "limit": 100, "setting": {"metric": "cett", "cett": 0.11}, "rows": [
                  {"task": "sparsity_smoke_prose", "metric": "acc", "dense": 0.31, "dense_stderr": 0.046,
                   "sparse": 0.29, "sparse_stderr": 0.0456, "difference": -0.02, "activation_ratio": 0.0543}]}


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    """(document, numbers) of the two runs: the laws are fitted once for these tests. The
    ReLU run has a measured decoding speedup (RUN/speedup.json) and downstream scores
    (RUN/downstream.json), the SiLU run neither."""
    from sparsity_scaling.files import write_json_atomic
    from sparsity_scaling.rundir import RunDir

    workdir = tmp_path_factory.mktemp("report")
    write_json_atomic(RunDir(workdir / "runs" / "relu").speedup, SPEEDUP)
    write_json_atomic(RunDir(workdir / "runs" / "relu").downstream, DOWNSTREAM)
    return _report(workdir, results)


def test_report_shows_downstream_scores_where_measured(report):
    doc, data = report
    text = doc.markdown("report_files")
    assert "## Downstream tasks at the measured sparsity" in text
    assert "**relu** at 3,000,000 tokens, CETT 0.11, 100 examples per task:" in text
    assert re.search(r"^sparsity_smoke_prose +acc +0\.3100 ± 0\.0460 +0\.2900 ± 0\.0456 +-0\.0200 +0\.0543$",
                     text, re.M)
    assert data["runs"]["relu"]["downstream"] == DOWNSTREAM and data["runs"]["silu"]["downstream"] is None


def test_report_says_what_the_sparsity_buys(report, results):
    doc, data = report
    text = doc.markdown("report_files")
    relu, silu = results["relu"].last("activation_ratio"), results["silu"].last("activation_ratio")
    relu_line = data["runs"]["relu"]["sparsity_buys"]
    assert f"at activation ratio {relu:.4f} the sparse FFNs do at least {(1 + 2 * relu) / 3:.2f}" in relu_line
    assert "activation ratio 0.0600: FFN blocks 2.10x (bound 2.70x: 78% of it), whole model 1.40x per token" in relu_line
    assert "too small" not in relu_line
    silu_line = data["runs"]["silu"]["sparsity_buys"]
    assert f"exactly {(2 + silu) / 3:.2f} of the dense FFN FLOPs: at most {3 / (2 + silu):.2f}x" in silu_line
    assert "not measured" in silu_line
    assert f"**relu**: {relu_line}" in text and f"**silu**: {silu_line}" in text
    assert re.search(r"^\| relu \| 0\.06 \| falls below 0\.06 \| .* \| 2\.68x \|$", text, re.M)


def test_a_model_too_small_to_gain_is_said_to_be():
    """The demo's tiny ReLU run: sparse FFN blocks slower than dense ones."""
    point = {"activation_ratio": 0.051, "ffn_speedup": 0.46, "flop_bound": 2.19, "model_speedup": 0.79}
    record = {"device": "cpu", "threads": 1, "batch": 1, "checkpoint": "checkpoint-3000000", "points": [point]}
    line = sparsity_buys(0.05, "relu", record)
    assert "FFN blocks 0.46x (bound 2.19x: 21% of it), whole model 0.79x per token; too small to gain" in line


def test_report_states_the_findings_the_numbers_support(report):
    doc, data = report
    verdicts = {f["claim"].split()[0] + (" falls" if "falls" in f["claim"] else " rises" if "rises" in f["claim"] else ""):
                f["verdict"] for f in data["findings"]}
    assert verdicts == {"ReLU": "reproduced", "ReLU falls": "reproduced", "SiLU rises": "reproduced",
                        "PPL-1%": "reproduced"}
    # Top-k reaches +1% perplexity between k = 16 and k = 64, linearly in PPL ratio
    (p16, a16), (p64, a64) = (1 + 0.5 / 16, 16 / 320), (1 + 0.5 / 64, 64 / 320)
    top_k = a64 + (a16 - a64) * (1.01 - p64) / (p16 - p64)
    assert f"Top-k {top_k:.4f}" in data["findings"][3]["evidence"]
    text = doc.markdown("report_files")
    assert "**reproduced**: ReLU models are sparser" in text
    # swap the laws: every finding now contradicts the paper, and the report says so
    swapped = {"relu": _run("relu", "relu", _silu), "silu": _run("silu", "silu", _relu)}
    assert [f[1] for f in findings(swapped, SAME_BUT_ACTIVATION)][:3] == ["not reproduced", "not reproduced", "not reproduced"]
    for run in swapped.values():  # Top-k now keeps fewer neurons than PPL-1% at +1% perplexity
        run.pareto["points"] = [r for r in run.pareto["points"] if r["method"] == "ppl-p"] + [
            {"method": "topk", "param": 2, "activation_ratio": 0.001, "ppl_ratio": 1.005},
            {"method": "topk", "param": 3, "activation_ratio": 0.002, "ppl_ratio": 1.02}]
    assert findings(swapped, SAME_BUT_ACTIVATION)[3][1] == "not reproduced"


def test_report_fits_the_laws_and_predicts_budgets_from_the_curves(report, results):
    from launcher.queries import law_curve
    from sparsity_scaling.laws.curvefit import fit_curve
    from sparsity_scaling.laws.predict import predict_tokens

    from scipy.optimize import curve_fit

    doc, data = report
    text = doc.markdown("report_files")
    for name, run in results.items():
        refit = fit_curve(law_curve(name, *run.curve(), run.tags))
        fitted = data["runs"][name]["fit"]
        assert "error" not in fitted and fitted["points_used"] == 13  # the default window drops 1 of 14
        # an independent least-squares fit (scipy, from the generating coefficients) on the same points
        tokens, ratios = map(np.asarray, zip(*run.metrics["activation_ratio"]))
        kept = tokens >= 0.1 * tokens[-1]
        law, names, start = INDEPENDENT[name]
        optimum, _ = curve_fit(law, tokens[kept] / 1e9, ratios[kept], p0=start, maxfev=20000)
        for coefficient, value in zip(names, optimum):
            assert fitted[coefficient] == pytest.approx(value, rel=1e-4), (name, coefficient)
        for coefficient in refit.fitted.law.coefficients:
            assert fitted[coefficient] == pytest.approx(refit.fitted.coefficient(coefficient))
        A0 = refit.fitted.coefficient("A0")
        assert A0 == pytest.approx(0.05 if name == "relu" else 0.3, abs=0.01)
        row = next(l for l in text.splitlines() if l.startswith(f"| {name} | {name} |") and "[" in l)
        assert f"{A0:.2e}".replace("e-0", "e-") in row  # the coefficient table shows the fit
        for target, predicted in zip((0.06, 0.25), data["runs"][name]["predictions"]):
            expected = predict_tokens(refit.fitted, target)
            assert (predicted["tokens"] is None) == (not expected.reachable)
            last = run.curve()[1][-1]
            if (last >= target) if name == "silu" else (last <= target):
                assert f"already reached (last checkpoint: {last:.4f})" in text
            elif expected.reachable:
                assert predicted["tokens"] == pytest.approx(expected.tokens)
                assert f"{expected.tokens:.3g} [" in text
    # every measured value in the tables is the run's value, as MLflow held it
    for tokens, value in results["silu"].metrics["activation_ratio"]:
        assert re.search(rf"^\| {tokens:,} \| [0-9.]+ \| {value:.4f} \|$", text, re.M)
    for row in results["relu"].pareto["points"]:
        assert f"| {row['activation_ratio']:.4f} | {row['ppl_ratio']:.4f} |" in text


def test_report_writes_markdown_with_pictures_and_self_contained_html(report, tmp_path):
    doc, _ = report
    doc.write(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\((report_files/[a-z_]+\.png)\)", markdown)
    assert pictures == ["report_files/activation.png", "report_files/loss.png", "report_files/pareto.png"]
    for picture in pictures:
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3 and "report_files" not in html
    # no local store in this workdir: the report links the grid's tracking server
    assert "open http://127.0.0.1:1/#/experiments/1/runs/parent" in html and "mlflow ui" not in html


def test_the_mlflow_command_opens_a_local_store_on_its_files(tmp_path):
    from launcher.report import _ui_command

    workdir = Workdir(tmp_path)
    workdir.mlflow_db.parent.mkdir(parents=True)
    workdir.mlflow_db.write_bytes(b"")
    command = _ui_command("http://127.0.0.1:5001", workdir, "1", "parent")
    assert command.startswith(f"mlflow ui --backend-store-uri sqlite:///{workdir.mlflow_db} "
                              f"--artifacts-destination {workdir.mlflow_artifacts} --port 5000\n")
    assert command.endswith("open http://127.0.0.1:5000/#/experiments/1/runs/parent")


def test_a_curve_too_short_for_a_law_is_reported_not_hidden(tmp_path):
    short = _run("relu", "relu", _relu)
    short.metrics["activation_ratio"] = short.metrics["activation_ratio"][-4:]
    doc, data = _report(tmp_path, {"relu": short, "silu": _run("silu", "silu", _silu)})
    assert "needs at least" in data["runs"]["relu"]["fit"]["error"]
    text = doc.markdown("report_files")
    assert f"No law fitted: {data['runs']['relu']['fit']['error']}" in text
    assert data["runs"]["relu"]["predictions"] == [] and len(data["runs"]["silu"]["predictions"]) == 2


def test_the_activation_figure_marks_where_the_decay_starts_and_whose_data_switches():
    from launcher.report import decay_marks
    from sparsity_scaling.train.schedule import decay_start_tokens

    decay = load_grid(REPO / "configs" / "grids" / "decay.yaml")
    start = decay_start_tokens(decay.runs[0].config)
    assert 0.7 * 2e6 < start < 0.8 * 2e6  # the last quarter
    assert decay_marks(decay, {"code_only", "prose_decay"}) == {"decay: prose_decay switch data": start}
    assert decay_marks(decay, {"code_only"}) == {"decay": start}
    demo = load_grid(REPO / "configs" / "grids" / "demo.yaml")
    assert decay_marks(demo, {"relu", "silu"}) == {"decay": decay_start_tokens(demo.runs[0].config)}


def test_relu_and_silu_runs_pair_by_their_configs_not_their_tags(tmp_path):
    """A grid with a learning-rate axis: every run has the same shape tags, yet each ReLU
    run is compared with the SiLU run at its own learning rate only."""
    (tmp_path / "lr.yaml").write_text(f"""name: lr
base: {REPO / "configs" / "models" / "tiny.yaml"}
axes:
  - product:
      model.activation: [relu, silu]
      train.lr: [0.01, 0.005]
overrides: {{train.tokens: 3e6, train.batch_tokens: 4096, checkpoint.first_tokens: 2.5e5}}
""")
    grid = load_grid(tmp_path / "lr.yaml")
    ratio = {("relu", 0.01): 0.05, ("silu", 0.01): 0.3, ("relu", 0.005): 0.4, ("silu", 0.005): 0.5}
    results = {}
    for spec in grid.runs:
        value = ratio[spec.config.model.activation, spec.config.train.lr]
        results[spec.name] = RunResult(spec.name, spec.name, spec.tags(grid.name),
                                       {"activation_ratio": [(t, value) for t in TOKENS]}, None)
    claim, verdict, evidence = findings(results, {spec.name: spec.pair_key for spec in grid.runs})[0]
    assert verdict == "reproduced"  # tags alone would also set ReLU at 0.005 (0.4) against SiLU at 0.01 (0.3)
    assert evidence.count(" vs ") == 2 and "0.4000 vs " in evidence
    for spec in grid.runs:
        if spec.config.model.activation == "relu":
            [partner] = [s for s in grid.runs if s.name != spec.name and s.pair_key == spec.pair_key]
            assert partner.config.model.activation == "silu" and partner.config.train.lr == spec.config.train.lr
