"""`grid report`: a grid's results as report.md and report.html in its workdir.

Every measured number comes back out of the grid's MLflow experiment (curves, losses and
the Pareto points of each child run), so the report shows what MLflow holds. The laws are
fitted and inverted here, and the findings are computed from those numbers, never written
in advance.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsity_scaling.costs import ffn_flop_fraction
from sparsity_scaling.errors import SettingError, UserError
from sparsity_scaling.figures import figure_bytes
from sparsity_scaling.files import write_json_atomic
from sparsity_scaling.formatting import sci
from sparsity_scaling.rundir import RunDir

from .document import Document
from .grid import Grid
from .workdir import REPORT, Workdir

REPORTED_METRICS = ("activation_ratio", "activation_ratio_checkpoint", "cett", "train_loss", "val_loss",
                    "grad_norm", "loss_spikes", "skipped_steps")


@dataclass
class RunResult:
    """One child run as MLflow holds it."""

    name: str
    run_id: str
    tags: dict
    metrics: dict[str, list[tuple[int, float]]]  # key -> [(tokens, value)] sorted by tokens
    pareto: dict | None  # the pareto.json artifact

    def curve(self, key: str = "activation_ratio") -> tuple[list[int], list[float]]:
        points = self.metrics.get(key, [])
        return [s for s, _ in points], [v for _, v in points]

    def last(self, key: str) -> float | None:
        points = self.metrics.get(key)
        return points[-1][1] if points else None


def collect(uri: str, grid: Grid, failed: frozenset[str] = frozenset()) -> tuple[str, str, dict[str, RunResult]]:
    """(experiment id, parent run id, {run name: RunResult}) for the grid's runs in MLflow,
    but the `failed` ones (the report names them and their reasons)."""
    import json

    from .tracking import client

    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(grid.name)
    if experiment is None:
        raise UserError(f"{grid.path}: no MLflow experiment {grid.name!r} at {uri}; submit the grid first")
    runs = mlflow.search_runs([experiment.experiment_id], max_results=10000,
                              filter_string=f"tags.`sparsity_scaling.grid` = '{grid.name}'")
    parent = next((r.info.run_id for r in runs if r.data.tags.get("sparsity_scaling.role") == "parent"), None)
    by_name = {r.data.tags.get("run"): r for r in runs if r.data.tags.get("sparsity_scaling.role") != "parent"}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for spec in grid.runs:
            if spec.name in failed:
                continue
            run = by_name.get(spec.name)
            if run is None or "activation_ratio" not in run.data.metrics:
                raise UserError(f"{grid.path}: run {spec.name} has no stabilised activation curve in MLflow yet; "
                                "its evaluation has not finished")
            run_id = run.info.run_id
            metrics = {key: sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))
                       for key in REPORTED_METRICS if key in run.data.metrics}
            names = {a.path for a in mlflow.list_artifacts(run_id)}
            pareto = None
            if RunDir.PARETO in names:
                pareto = json.loads(Path(mlflow.download_artifacts(run_id, RunDir.PARETO, scratch)).read_text())
            tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
            results[spec.name] = RunResult(spec.name, run_id, tags, metrics, pareto)
    return experiment.experiment_id, parent, results


# ---------------------------------------------------------------- laws and findings


def fit_runs(results: dict[str, RunResult]) -> dict[str, object]:
    """{run: CurveFit, or the LawError message saying why its law cannot be fitted}."""
    from sparsity_scaling.laws.curvefit import fit_curve
    from sparsity_scaling.laws.errors import LawError

    from .queries import law_curve

    fits = {}
    for name, run in results.items():
        tokens, ratios = run.curve()
        try:
            fits[name] = fit_curve(law_curve(name, tokens, ratios, run.tags))
        except LawError as error:
            fits[name] = str(error)
    return fits


def _trend(tokens, ratios) -> tuple[float, int, int] | None:
    """Spearman correlation of the ratio with tokens over the fit window, and the window."""
    from scipy.stats import spearmanr

    from sparsity_scaling.laws.curvefit import DEFAULT_WINDOW

    first = DEFAULT_WINDOW.first_kept(np.asarray(tokens, float))
    if len(tokens) - first < 3:
        return None
    return float(spearmanr(tokens[first:], ratios[first:]).statistic), first, len(tokens) - 1


def _direction_finding(claim: str, runs: list[RunResult], sign: int) -> tuple[str, str, str]:
    """sign -1: the ratio should fall with data; +1: rise."""
    if not runs:
        return claim, "not tested", f"the grid has no {'ReLU' if sign < 0 else 'SiLU'} run"
    verdicts, evidence = [], []
    for run in runs:
        tokens, ratios = run.curve()
        trend = _trend(tokens, ratios)
        if trend is None:
            verdicts.append("inconclusive")
            evidence.append(f"{run.name}: only {len(tokens)} checkpoints")
            continue
        rho, first, last = trend
        change = ratios[last] - ratios[first]
        if sign * rho >= 0.5 and sign * change > 0:
            verdicts.append("reproduced")
        elif sign * rho <= -0.5 and sign * change < 0:
            verdicts.append("not reproduced")
        else:
            verdicts.append("inconclusive")
        evidence.append(f"{run.name}: {ratios[first]:.4f} at {tokens[first]:,} tokens -> {ratios[last]:.4f} at "
                        f"{tokens[last]:,} ({change / ratios[first]:+.0%}), Spearman rho {rho:+.2f} over "
                        f"{last - first + 1} checkpoints")
    verdict = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
    return claim, verdict, "; ".join(evidence)


def findings(results: dict[str, RunResult], pair_keys: dict[str, str]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each of the paper's findings the grid can test.
    `pair_keys` (run name -> `RunSpec.pair_key`) pair a ReLU and a SiLU run whose configs
    differ in nothing else: not their MLflow tags, which an axis on the learning rate or the
    data would leave equal across pairs."""
    relu = [r for r in results.values() if r.tags.get("activation") == "relu"]
    silu = [r for r in results.values() if r.tags.get("activation") == "silu"]
    pairs = [(r, s) for r in relu for s in silu if pair_keys[r.name] == pair_keys[s.name]]
    claim = "ReLU models are sparser (lower activation ratio) than SiLU models of the same shape"
    if not pairs:
        out = [(claim, "not tested", "the grid has no ReLU/SiLU pair that differs in the activation alone")]
    else:
        evidence = [f"{r.name} {r.last('activation_ratio'):.4f} vs {s.name} {s.last('activation_ratio'):.4f} "
                    f"(ratio {r.last('activation_ratio') / s.last('activation_ratio'):.2f})" for r, s in pairs]
        sparser = [r.last("activation_ratio") < s.last("activation_ratio") for r, s in pairs]
        verdict = "reproduced" if all(sparser) else "not reproduced" if not any(sparser) else "mixed"
        out = [(claim, verdict, "; ".join(evidence) + " at the last checkpoint")]
    out.append(_direction_finding("ReLU activation ratio falls with training data", relu, -1))
    out.append(_direction_finding("SiLU activation ratio rises with training data", silu, +1))
    out.append(_pareto_finding(results))
    return out


def activation_at(rows: list[dict], method: str, ppl_ratio: float) -> float | None:
    """A method's activation ratio where its Pareto curve reaches ppl_ratio (linear between
    the two settings around it), or None if its sweep does not reach across it."""
    points = sorted((r["ppl_ratio"], r["activation_ratio"]) for r in rows if r["method"] == method)
    for (p0, a0), (p1, a1) in zip(points, points[1:]):
        if p0 <= ppl_ratio <= p1:
            return a0 if p1 == p0 else a0 + (a1 - a0) * (ppl_ratio - p0) / (p1 - p0)
    return None


def _pareto_finding(results: dict[str, RunResult]) -> tuple[str, str, str]:
    claim = "PPL-1% (CETT) keeps fewer neurons active than Top-k, FAT-eps and top-p at the same +1% perplexity"
    verdicts, evidence = [], []
    for name, run in results.items():
        if not run.pareto:
            continue
        rows = run.pareto["points"]
        ours = next((r for r in rows if r["method"] == "ppl-p" and r["param"] == 1.0), None)
        if ours is None:
            continue
        others = {m: activation_at(rows, m, ours["ppl_ratio"]) for m in ("topk", "fat", "top-p")}
        compared = {m: a for m, a in others.items() if a is not None}
        if compared:
            verdicts.append("reproduced" if all(ours["activation_ratio"] < a for a in compared.values())
                            else "not reproduced")
        evidence.append(f"{name}: PPL-1% {ours['activation_ratio']:.4f}, " + ", ".join(
            f"{METHOD_NAMES[m]} {'-' if a is None else f'{a:.4f}'}" for m, a in others.items()))
    if not verdicts:
        return claim, "not tested", "no run has Pareto points at PPL-1%"
    verdict = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
    return claim, verdict, "; ".join(evidence) + " (activation ratio at the same PPL ratio, at the last checkpoint)"


METHOD_NAMES = {"topk": "Top-k", "fat": "FAT-eps", "top-p": "top-p"}


# ---------------------------------------------------------------- figures


def decay_marks(grid: Grid, names) -> dict[str, int]:
    """{label: training tokens} where the runs' WSD decay starts, naming the runs whose data
    switches there (train.decay_data): one dashed line per distinct start."""
    from sparsity_scaling.train.schedule import decay_start_tokens

    starts: dict[int, list[str]] = {}
    for spec in grid.runs:
        if spec.name in names:
            starts.setdefault(decay_start_tokens(spec.config), []).extend(
                [spec.name] if spec.config.train.decay_data else [])
    return {"decay" + (f": {', '.join(switched)} switch data" if switched else ""): tokens
            for tokens, switched in starts.items()}


def activation_figure(results: dict[str, RunResult], fits: dict, marks: dict[str, int] | None = None) -> bytes:
    """The activation curves, fitted laws and bands; a dashed line at each of `marks`."""
    from matplotlib.figure import Figure

    from sparsity_scaling.laws.forms import TOKENS_PER_UNIT
    from sparsity_scaling.laws.plots import law_band

    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.add_subplot()
    for index, (name, run) in enumerate(results.items()):
        colour = f"C{index}"
        tokens, ratios = run.curve()
        singles = run.curve("activation_ratio_checkpoint")
        if singles[0]:
            ax.plot(*singles, "x", color=colour, alpha=0.5, label=f"{name}: per-checkpoint PPL-1%")
        fit = fits[name]
        ax.plot(tokens, ratios, "o" if not isinstance(fit, str) else "o-", color=colour,
                label=f"{name}: stabilised PPL-1%")
        if not isinstance(fit, str):
            grid = np.geomspace(fit.fit.D.min(), fit.fit.D.max(), 200)
            low, high = law_band(fit, grid)
            ax.fill_between(grid * TOKENS_PER_UNIT, low, high, color=colour, alpha=0.2)
            ax.plot(grid * TOKENS_PER_UNIT, fit.fit.law.evaluate(grid, fit.fit.params), color=colour,
                    label=f"{name}: {fit.fit.law.name} law, {fit.fitted.level:.0%} band")
    for label, tokens in (marks or {}).items():
        ax.axvline(tokens, ls="--", color="gray", lw=1)
        ax.annotate(label, (tokens, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="gray")
    return _against_tokens(figure, ax, "activation ratio", "Activation ratio against training data")


def loss_figure(results: dict[str, RunResult]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.add_subplot()
    for index, (name, run) in enumerate(results.items()):
        ax.plot(*run.curve("train_loss"), color=f"C{index}", lw=1, alpha=0.8, label=f"{name}: training loss")
        ax.plot(*run.curve("val_loss"), "o--", color=f"C{index}", ms=4, label=f"{name}: validation loss")
    return _against_tokens(figure, ax, "loss (nats per token)", "Training and validation loss")


def _against_tokens(figure, ax, ylabel: str, title: str) -> bytes:
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_bytes(figure)


# ---------------------------------------------------------------- the report


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{int(value)}"


def _unmeasured(run: RunDir) -> list[dict]:
    """The run's checkpoints that could not be measured: alone (the grid's per-checkpoint
    jobs) or in the stabilised curve ({"checkpoint", "error"}, one per checkpoint)."""
    found = {r["checkpoint"]: r["error"] for r in run.evaluation_failures()}
    for excluded in (run.sparsity_record() or {}).get("excluded", []):
        found.setdefault(excluded["checkpoint"], excluded["error"])
    return [{"checkpoint": name, "error": error} for name, error in sorted(found.items())]


def _prediction_cell(prediction, last_ratio: float) -> str:
    reached = last_ratio >= prediction.target if prediction.form == "silu" else last_ratio <= prediction.target
    if reached:
        return f"already reached (last checkpoint: {last_ratio:.4f})"
    if not prediction.reachable:
        return (f"never: the law levels off at A0 = {prediction.limit:.4f} first "
                f"({prediction.unreachable_share:.0%} of bootstrap fits agree)")
    low, high = prediction.ci
    text = f"{prediction.tokens:.3g} [{low:.3g}, {high:.3g}]"
    return text + (" (extrapolated beyond 2x the data)" if prediction.extrapolated else "")


def sparsity_buys(activation_ratio: float, activation: str | None, speedup: dict | None) -> str:
    """What a run's sparsity buys: the FFN FLOP fraction of its activation ratio and the
    speedup that bounds, and the decode speedup `sparsity-scaling speedup` measured on one of
    its checkpoints (its RUN/speedup.json: the point nearest that ratio), if any."""
    fraction = ffn_flop_fraction(activation_ratio, activation == "relu")
    bound = "at least" if activation == "relu" else "exactly"
    line = (f"at activation ratio {activation_ratio:.4f} the sparse FFNs do {bound} {fraction:.2f} of the dense FFN "
            f"FLOPs: at most {1 / fraction:.2f}x faster FFN blocks")
    if not speedup:
        return line + "; decoding not measured (`sparsity-scaling speedup RUN_DIR`)"
    point = min(speedup["points"], key=lambda p: abs(p["activation_ratio"] - activation_ratio))
    ffn, bound, model = point["ffn_speedup"], point["flop_bound"], point["model_speedup"]
    line += (f"; measured on {speedup['device']} ({speedup['threads']} threads, batch {speedup['batch']}) at "
             f"{speedup['checkpoint']}, activation ratio {point['activation_ratio']:.4f}: FFN blocks {ffn:.2f}x "
             f"(bound {bound:.2f}x: {ffn / bound:.0%} of it), whole model {model:.2f}x per token")
    if min(ffn, model) < 1:
        line += ("; too small to gain: at this size sparse decoding is slower than dense (the sparse FFNs' "
                 "bookkeeping costs more than the products they skip)")
    return line


def build_report(grid: Grid, uri: str, workdir: Workdir, targets: list[float], experiment_id: str,
                 parent_id: str | None, results: dict[str, RunResult]) -> tuple[Document, dict]:
    """The report of the grid's runs as MLflow holds them (see `collect`), and its numbers."""
    from sparsity_scaling.analysis.pareto import pareto_figure, pareto_table
    from sparsity_scaling.laws.predict import predict_tokens

    print(f"report: fitting the laws of {len(results)} runs (bootstrap)", flush=True)
    fits = fit_runs(results)
    found = findings(results, {spec.name: spec.pair_key for spec in grid.runs})
    doc = Document(f"Sparsity report: grid `{grid.name}`")
    doc.paragraph(f"{len(results)} runs of `{grid.path.name}`, read from MLflow experiment `{grid.name}` "
                  f"(id {experiment_id}, parent run `{parent_id}`) at {uri} on {time.strftime('%Y-%m-%d %H:%M')}. "
                  f"Activation ratios are PPL-{grid.spec.evaluation.p:g}% with the stabilising strategy "
                  f"(one CETT per run, set on its last {grid.spec.evaluation.last} checkpoints) on "
                  f"{grid.spec.evaluation.eval_tokens:,} validation tokens.")

    failed_runs = {spec.name: workdir.run(spec.name).failed() for spec in grid.runs if spec.name not in results}
    failed_runs = {name: failure["error"] for name, failure in failed_runs.items() if failure}
    if failed_runs:
        doc.heading("Failed runs")
        doc.paragraph("These runs are not in the findings, curves, fits or predictions below:")
        doc.bullets([f"**{name}**: {error}" for name, error in failed_runs.items()])
    unmeasured = {name: _unmeasured(workdir.run(name)) for name in results}
    unmeasured = {name: found for name, found in unmeasured.items() if found}
    if unmeasured:
        doc.heading("Checkpoints left out")
        doc.paragraph("These checkpoints could not be measured (non-finite weights or perplexity); they are not "
                      "in the activation curves or the fits:")
        doc.bullets([f"**{name}** {c['checkpoint']}: {c['error']}" for name, found in unmeasured.items() for c in found])

    doc.heading("Findings of the paper, checked on these runs")
    doc.bullets([f"**{verdict}**: {claim}. {evidence}." for claim, verdict, evidence in found])

    doc.heading("Runs")
    doc.table(["run", "activation", "non-embedding params", "tokens", "train loss", "val loss",
               "loss spikes", "skipped steps", "stabilised CETT", "activation ratio"],
              [[n, r.tags.get("activation", "-"), f"{int(r.tags['params']):,}" if r.tags.get("params") else "-",
                f"{r.curve()[0][-1]:,}", _ratio(r.last("train_loss")), _ratio(r.last("val_loss")),
                _count(r.last("loss_spikes")), _count(r.last("skipped_steps")),
                _ratio(r.last("cett")), _ratio(r.last("activation_ratio"))] for n, r in results.items()])
    doc.paragraph("A loss spike is a step whose training loss exceeds 1.25 times the median of the 50 steps "
                  "before it; skipped steps had a non-finite loss or gradient norm and changed nothing "
                  "(`train.skip_nonfinite_steps`).")

    doc.heading("Activation ratio against training tokens")
    doc.image("activation.png", activation_figure(results, fits, decay_marks(grid, results)),
              "Stabilised PPL-1% activation ratio (circles) with the fitted law and its bootstrap band; "
              "crosses: PPL-1% searched at each checkpoint alone; dashed: where the decay stage starts")
    steps = sorted({s for r in results.values() for s in r.curve()[0]})
    columns = {n: dict(r.metrics["activation_ratio"]) for n, r in results.items()}
    doc.table(["tokens", *results], [[f"{s:,}", *(_ratio(columns[n].get(s)) for n in results)] for s in steps])

    doc.heading("Fitted laws")
    doc.paragraph("ReLU: A = exp(-c D^alpha + b) + A0 (falls to A0); SiLU: A = -c / D^alpha + A0 (rises to A0); "
                  "D in 1e9 tokens. Intervals are 95% bootstrap intervals.")
    rows, failures = [], []
    for name, fit in fits.items():
        if isinstance(fit, str):
            failures.append(fit)
            continue
        coefficients = fit.fitted.law.coefficients
        cells = [f"{sci(fit.fitted.coefficient(c))} [{sci(fit.fitted.coefficient_interval(c)[0])}, "
                 f"{sci(fit.fitted.coefficient_interval(c)[1])}]" if c in coefficients else "-"
                 for c in ("alpha", "b", "c", "A0")]
        rows.append([name, fit.fit.law.name, *cells, sci(fit.fit.mae), f"{len(fit.fit.D)} of {len(fit.curve.tokens)}"])
    if rows:
        doc.table(["run", "law", "alpha", "b", "c", "A0", "MAE", "points fitted"], rows)
    warnings = [f"{n}: {w}" for n, f in fits.items() if not isinstance(f, str) for w in f.warnings]
    if failures or warnings:
        doc.bullets([f"No law fitted: {f}" for f in failures] + [f"Warning: {w}" for w in warnings])

    doc.heading("Predicted token budgets")
    predictions = {}
    fitted = {n: f for n, f in fits.items() if not isinstance(f, str)}
    if fitted:
        table = []
        for name, fit in fitted.items():
            predictions[name] = [predict_tokens(fit.fitted, t) for t in targets]
            last = float(fit.curve.activation_ratio[-1])
            relu = results[name].tags.get("activation") == "relu"
            table += [[name, f"{p.target:g}", f"{p.crossing} {p.target:g}", _prediction_cell(p, last),
                       f"{1 / ffn_flop_fraction(p.target, relu):.2f}x"] for p in predictions[name]]
        doc.paragraph("Training tokens until each run's fitted law crosses the target activation ratio, "
                      "with the 95% bootstrap interval, and the FFN decode speedup that ratio bounds "
                      "(see below).")
        doc.table(["run", "target", "when the ratio", "tokens [95% interval]", "FFN speedup at most"], table)
    else:
        doc.paragraph("No run has a fitted law, so no budget can be predicted.")

    doc.heading("What the sparsity buys")
    doc.paragraph("Decoding with sparse FFNs computes the gate projection dense and the down projection only "
                  "for the active neurons (the up projection too, for ReLU), so the activation ratio bounds "
                  "the FFN speedup; `sparsity-scaling speedup` measures it.")
    buys = {name: sparsity_buys(r.last("activation_ratio"), r.tags.get("activation"), workdir.run(name).speedup_record())
            for name, r in results.items()}
    doc.bullets([f"**{name}**: {line}" for name, line in buys.items()])

    downstream = {name: workdir.run(name).downstream_record() for name in results}
    downstream = {name: record for name, record in downstream.items() if record}
    if downstream:
        from sparsity_scaling.analysis.models import describe
        from sparsity_scaling.downstream.compare import render_table

        doc.heading("Downstream tasks at the measured sparsity")
        doc.paragraph("lm-eval tasks scored on each run's checkpoint dense and with the sparsity setting applied "
                      "(`sparsity-scaling downstream`); the activation ratio is the one the setting reached on the "
                      "task's own text.")
        for name, record in downstream.items():
            doc.paragraph(f"**{name}** at {record['train_tokens']:,} tokens, {describe(record['setting'])}, "
                          f"{record['limit'] or 'all'} examples per task:")
            doc.code(render_table(record["rows"]))

    doc.heading("Training and validation loss")
    doc.image("loss.png", loss_figure(results), "Training loss (lines) and validation loss at checkpoints (circles)")

    doc.heading("PPL-activation Pareto curves at the last checkpoint")
    curves = {f"{n} at {r.pareto['train_tokens']:,} tokens": r.pareto["points"]
              for n, r in results.items() if r.pareto}
    if curves:
        doc.paragraph("Lower and further left is better: the same perplexity with fewer active neurons.")
        doc.image("pareto.png", figure_bytes(pareto_figure(curves)), "PPL ratio against activation ratio for each method")
        for name, run in results.items():
            if run.pareto:
                doc.paragraph(f"**{name}** at {run.pareto['train_tokens']:,} tokens "
                              f"(dense PPL {run.pareto['dense_ppl']:.3f}):")
                doc.table(["method", "setting", "activation ratio", "PPL ratio"], pareto_table(run.pareto["points"]))
    else:
        doc.paragraph("No run has Pareto points (the grid's `evaluation.pareto` is off).")

    doc.heading("These runs in MLflow")
    doc.paragraph("Open the MLflow UI on this grid's store (the parent run lists the child runs; each child "
                  "has its activation curves, losses, thresholds and plots):")
    doc.code(_ui_command(uri, workdir, experiment_id, parent_id))
    doc.paragraph("Query the curves, fit the laws and predict budgets from MLflow:")
    where = workdir.path
    doc.code(f"python tools/curves.py --experiment {grid.name} --workdir {where} --out curves.csv\n"
             f"python tools/fit_laws.py --experiment {grid.name} --workdir {where} --json fits.json --plots fits\n"
             f"python tools/predict_tokens.py --experiment {grid.name} --workdir {where} --target {targets[0]:g}")

    data = {
        "grid": grid.name, "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_id,
        "targets": targets, "findings": [{"claim": c, "verdict": v, "evidence": e} for c, v, e in found],
        "failed_runs": failed_runs, "checkpoints_left_out": unmeasured,
        "runs": {n: {
            "run_id": r.run_id, "tags": r.tags, "metrics": {k: [list(p) for p in v] for k, v in r.metrics.items()},
            "fit": fits[n].to_json() | {"bootstrap": None} if not isinstance(fits[n], str) else {"error": fits[n]},
            "predictions": [{"target": p.target, **p.to_json()} for p in predictions.get(n, [])],
            "pareto": r.pareto,
            "sparsity_buys": buys[n],
            "downstream": downstream.get(n),
        } for n, r in results.items()},
    }
    return doc, data


def score_downstream(grid: Grid, workdir: Workdir, results: dict[str, RunResult]) -> None:
    """RUN/downstream.json for each finished run whose record does not hold the grid's tasks
    at its last checkpoint: the report's tasks scored dense and at the run's stabilised CETT."""
    from sparsity_scaling.analysis.models import parse_model
    from sparsity_scaling.analysis.settings import AnalysisSettings
    from sparsity_scaling.downstream.compare import DownstreamSettings, run_downstream
    from sparsity_scaling.evaluation.settings import MetricSettings
    from sparsity_scaling.data.pipeline import cache_root
    from sparsity_scaling.ranks import on_ranks

    wanted = grid.spec.report
    for name in results:
        run = workdir.run(name)
        checkpoint, record, sparsity = run.checkpoints()[-1], run.downstream_record(), run.sparsity_record()
        if sparsity is None or (record and record["checkpoint"] == checkpoint.name
                                and record["tasks"] == wanted.tasks and record["limit"] == wanted.task_limit):
            continue
        print(f"report: scoring {name} on {', '.join(wanted.tasks)} (dense and at CETT {sparsity['cett']:.4f})",
              flush=True)
        analysis = AnalysisSettings(out=str(run.path), metric=MetricSettings(metric="cett", value=sparsity["cett"]),
                                    data=grid.spec.evaluation.data())
        settings = DownstreamSettings(tuple(wanted.tasks), limit=wanted.task_limit,
                                      cache=str(cache_root(checkpoint.config().data)))
        on_ranks(1, run_downstream, parse_model(str(checkpoint.path)), analysis, settings)


def _ui_command(uri: str, workdir: Workdir, experiment_id: str, parent_id: str) -> str:
    link = f"#/experiments/{experiment_id}/runs/{parent_id}"
    if workdir.has_mlflow_store() and uri.startswith("http://127.0.0.1"):
        return (f"mlflow ui --backend-store-uri sqlite:///{workdir.mlflow_db} "
                f"--artifacts-destination {workdir.mlflow_artifacts} --port 5000\n"
                f"# then open http://127.0.0.1:5000/{link}")
    return f"# the grid's tracking server\nopen {uri}/{link}"


def write_report(grid: Grid, uri: str, workdir: Workdir, targets: list[float] | None = None) -> Path:
    """report.md (+ report_files/), report.html and report.json in the workdir; also logged
    to the grid's parent MLflow run."""
    from .tracking import client

    targets = list(targets or grid.spec.report.targets)
    for target in targets:
        if not 0 < target < 1:
            raise SettingError("target", f"{target:g}", "an activation ratio must lie in (0, 1)")
    failed = frozenset(spec.name for spec in grid.runs
                       if workdir.run(spec.name).failed() is not None and not workdir.run(spec.name).sparsity.is_file())
    collected = collect(uri, grid, failed)
    if grid.spec.report.tasks:
        score_downstream(grid, workdir, collected[2])
    doc, data = build_report(grid, uri, workdir, targets, *collected)
    doc.write(workdir.path, REPORT)
    write_json_atomic(workdir.report("json"), data)  # inf/nan (an unreachable target) as null
    if data["parent_run_id"]:
        mlflow = client(uri)
        for suffix in ("md", "html", "json"):
            mlflow.log_artifact(data["parent_run_id"], str(workdir.report(suffix)), REPORT)
    print(f"report: {workdir.report('html')} (and {workdir.report('md').name})", flush=True)
    return workdir.report("html")
