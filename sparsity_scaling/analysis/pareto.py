"""PPL-activation Pareto curves: every sparsity method on one model and data, in one plot.

All points come from one `Evaluator`, so the dense pass runs once; the PPL-p% sweep shares
every CETT point it has measured between its searches, so each new p starts from the
tightest bracket the earlier ones left. A point is (activation ratio, PPL ratio): a method
whose curve lies lower and further left keeps perplexity with fewer active neurons.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..evaluation.inputs import ModelRef
from ..evaluation.jobs import load_evaluator
from ..evaluation.settings import DataSettings, MetricSettings
from ..figures import save_figure
from ..files import write_json_atomic
from ..formatting import table
from ..metrics.comm import gather_neurons, tp_size
from ..metrics.rules import FixedThreshold, ReluZero, TopK, TopP
from ..metrics import check_p
from ..metrics.search import Evaluator, ppl_p
from ..parallel import init_parallel
from ..rundir import RunDir
from .models import ModelSpec
from .output import is_rank0, say
from .settings import AnalysisSettings

P_VALUES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # PPL-p%: allowed perplexity increase, percent
KEEP_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)  # Top-k: k as a share of d_f
FAT_QUANTILES = (0.5, 0.65, 0.8, 0.9, 0.95, 0.98)  # FAT-eps: eps at these quantiles of non-zero |a|
TOP_P_VALUES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # top-p: share of the |a| mass kept

METHOD_LABELS = {"ppl-p": "PPL-p% (CETT)", "topk": "Top-k", "fat": "FAT-eps", "relu": "ReLU zero", "top-p": "top-p"}


def _fat_eps(evaluator: Evaluator, quantiles) -> list[float]:
    """eps at quantiles of the non-zero |a| over the calibration activations of all layers
    (all neurons, so every tensor-parallel size gets the same values). Non-zero: most of a
    ReLU model's |a| are exactly 0, where every quantile would give the dense model."""
    values = torch.cat([gather_neurons(a.abs()).flatten() for _, a in sorted(evaluator.dense.calibration.items())])
    values = values[values > 0]
    if values.numel() == 0:
        return []
    if values.numel() > 4_000_000:  # quantiles of an even subsample: the same on every rank
        values = values[:: values.numel() // 4_000_000 + 1]
    values = values.double().cpu()  # the calibration lives on the model's device
    return sorted({float(q) for q in np.quantile(values.numpy(), quantiles)})


def _row(method: str, param: float | None, sparse, evaluator: Evaluator) -> dict:
    return {"method": method, "param": param, "activation_ratio": sparse.activation_ratio,
            "ppl_ratio": evaluator.ppl_ratio(sparse)}


def pareto_points(evaluator: Evaluator, activation: str | None, p_values=P_VALUES,
                  keep_fractions=KEEP_FRACTIONS, fat_quantiles=FAT_QUANTILES,
                  top_p_values=TOP_P_VALUES, on_point=None) -> list[dict]:
    """One row per setting: {"method", "param", "activation_ratio", "ppl_ratio"}.

    PPL-p% sweeps p; Top-k sweeps k = fraction * d_f; FAT-eps sweeps eps at quantiles of the
    dense non-zero |a|; top-p sweeps the kept mass; ReLU models add the straightforward ReLU point.
    A p whose search cannot reach its PPL ratio (too little data) is skipped; if no point
    at all can be measured, UserError.
    """
    for p in p_values:
        check_p(p)
    rows, skipped = [], []
    report = on_point or (lambda row: None)
    measured: dict = {}
    for p in sorted(p_values):
        try:
            result = ppl_p(evaluator, p, measured)
        except UserError as error:
            skipped.append(f"PPL-{p:g}%: {error}")
            continue
        rows.append({"method": "ppl-p", "param": p, "activation_ratio": result.activation_ratio,
                     "ppl_ratio": result.ppl_ratio, "cett": result.cett})
        report(rows[-1])
    width = evaluator.target.ffns[0].local_neurons * tp_size()  # d_f
    settings = [("topk", k, TopK(k=k)) for k in sorted({max(1, round(f * width)) for f in keep_fractions})]
    settings += [("fat", eps, FixedThreshold(eps=eps)) for eps in _fat_eps(evaluator, fat_quantiles)]
    settings += [("top-p", p, TopP(p=p)) for p in top_p_values]
    if activation == "relu":
        settings.append(("relu", None, ReluZero()))
    for method, param, rule in settings:
        rows.append(_row(method, param, evaluator.measure(rule), evaluator))
        report(rows[-1])
    if not rows:
        raise UserError("pareto: no sweep point could be measured (" + "; ".join(skipped) + ")")
    return rows


def pareto_figure(curves: dict[str, list[dict]]):
    """Perplexity increase against activation ratio, one panel per model, one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(5.5 * len(curves), 4.5), layout="constrained")
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, rows) in zip(axes, curves.items()):
        for method, label in METHOD_LABELS.items():
            points = sorted((r["activation_ratio"], 100 * (r["ppl_ratio"] - 1)) for r in rows if r["method"] == method)
            if points:
                x, y = zip(*points)
                ax.plot(x, y, "o-" if len(points) > 1 else "*", ms=5 if len(points) > 1 else 12, label=label)
        ax.set_xlabel("activation ratio")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.set_yscale("symlog", linthresh=0.1)  # +0.25% and several-fold on one axis
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def write_pareto(curves: dict[str, list[dict]], json_path, png_path) -> None:
    """The points as JSON ({model: rows}) and the plot, both written atomically."""
    write_json_atomic(json_path, curves)
    save_figure(pareto_figure(curves), png_path)


def pareto_table(rows: list[dict]) -> list[list[str]]:
    """Rows of method, setting, activation ratio and PPL ratio for reports."""
    def setting(row):
        if row["method"] == "ppl-p":
            return f"p = {row['param']:g}% (CETT {row['cett']:.4g})"
        if row["method"] == "topk":
            return f"k = {int(row['param'])}"
        if row["method"] == "fat":
            return f"eps = {row['param']:.3g}"
        if row["method"] == "top-p":
            return f"p = {row['param']:g}"
        return "gate > 0"

    return [[METHOD_LABELS[r["method"]], setting(r), f"{r['activation_ratio']:.4f}", f"{r['ppl_ratio']:.4f}"]
            for r in rows]



def pareto_on_rank(settings: AnalysisSettings, specs: list[ModelSpec], p_values=P_VALUES) -> None:
    """`analyze pareto`: every method on every model; a collective on every rank."""
    init_parallel(settings.tp)
    curves = {}
    for spec in specs:
        say(f"{spec.label}: dense pass")
        evaluator = load_evaluator(spec.model, settings.first_data, settings.metric, settings.tp)
        report = lambda row, label=spec.label: say(  # noqa: E731
            f"{label}: {row['method']} {row['param']}: activation ratio {row['activation_ratio']:.4f}, "
            f"PPL ratio {row['ppl_ratio']:.4f}")
        curves[spec.label] = pareto_points(evaluator, spec.model.activation(evaluator.target),
                                           p_values=p_values, on_point=report)
    if is_rank0():
        out = Path(settings.out)
        files = [out / RunDir.PARETO, out / RunDir.PARETO_PLOT]
        write_pareto(curves, *files)
        for label, rows in curves.items():
            print(f"\n{label}\n" + table(["method", "setting", "activation ratio", "PPL ratio"], pareto_table(rows)))
        print(f"wrote {files[0]} and {files[1]}")
        if settings.publish is not None:
            settings.publish(files, [])


def pareto_of_run(run_dir: str | Path, metric: MetricSettings, data: DataSettings) -> dict:
    """The Pareto points at a run's last checkpoint, on its validation split (this process,
    TP 1): RUN/pareto.png, then RUN/pareto.json (whose presence marks the work done)."""
    run = RunDir(run_dir)
    init_parallel(1)
    last = run.checkpoints()[-1]
    model = ModelRef(checkpoint=str(last.path))
    evaluator = load_evaluator(model, data, metric)
    rows = pareto_points(evaluator, model.activation(evaluator.target))
    record = {"checkpoint": last.name, "train_tokens": last.tokens, "dense_ppl": evaluator.dense.ppl,
              "eval_tokens": evaluator.data.tokens, "forward_passes": round(evaluator.forward_passes(), 1),
              "points": rows}
    save_figure(pareto_figure({f"{run.name} at {last.tokens:,} tokens": rows}), run.pareto_plot)
    write_json_atomic(run.pareto, record)
    return record
