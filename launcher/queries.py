"""Activation curves read back out of MLflow (for `tools/curves.py`, the law tools and the
report), and written as CSV, reference-format JSON or a plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sparsity_scaling.errors import SettingError
from sparsity_scaling.figures import save_figure
from sparsity_scaling.files import write_json_atomic, write_text_atomic


def query_curves(uri: str, experiment: str, filter_string: str = "", metric: str = "activation_ratio") -> dict:
    """{run name: {"token_passed": [...], metric: [...], "tags": {...}}} for matching child runs."""
    from .tracking import check_tracking_uri, client

    check_tracking_uri(uri)
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise SettingError("experiment", experiment, f"no such MLflow experiment at {uri}")
    try:
        runs = mlflow.search_runs([found.experiment_id], filter_string=filter_string or "", max_results=10000)
    except Exception as error:  # MlflowException for a malformed filter
        raise SettingError("filter", repr(filter_string), str(error).splitlines()[0][:200]) from None
    curves = {}
    for run in runs:
        if run.data.tags.get("sparsity_scaling.role") == "parent":
            continue
        history = sorted(mlflow.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        if history:
            name = run.data.tags.get("run", run.info.run_name)
            curves[name] = {
                "token_passed": [m.step for m in history],
                metric: [m.value for m in history],
                "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            }
    if not curves:
        raise SettingError("experiment", experiment, f"no run with a {metric} curve matches {filter_string!r}")
    return curves


def write_curves(curves: dict, metric: str, out: str | Path, marks: dict[str, float] | None = None) -> None:
    """.csv: one row per point; .json: the reference format per run; .png: a plot, with a
    dashed vertical line at each of `marks` ({label: training tokens})."""
    out = Path(out)
    if out.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["model", "tokens", metric, "activation", "params"])
        for name, curve in curves.items():
            for tokens, value in zip(curve["token_passed"], curve[metric]):
                writer.writerow([name, tokens, value, curve["tags"].get("activation", ""), curve["tags"].get("params", "")])
        write_text_atomic(out, buffer.getvalue())
    elif out.suffix == ".json":
        write_json_atomic(out, {name: {"token_passed": c["token_passed"], metric: c[metric]} for name, c in curves.items()})
    elif out.suffix == ".png":
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4.5), layout="tight")
        ax = figure.add_subplot()
        for name, curve in sorted(curves.items()):
            ax.plot(curve["token_passed"], curve[metric], marker="o", ms=3, label=name)
        for label, tokens in (marks or {}).items():
            ax.axvline(tokens, ls="--", color="gray", lw=1)
            ax.annotate(label, (tokens, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="gray")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{metric.replace('_', ' ')} against training tokens")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(figure, out, dpi=120)
    else:
        raise SettingError("out", out, "expected a .csv, .json or .png file")


def law_curve(name: str, tokens, ratios, tags: dict):
    """A laws.io.Curve of a grid run's curve, with what its MLflow tags say about the model."""
    from sparsity_scaling.laws.io import Curve

    return Curve(
        name, tokens, ratios, activation=tags.get("activation"),
        params=float(tags["params"]) if tags.get("params") else None,
        width_depth_ratio=float(tags["width_depth_ratio"]) if tags.get("width_depth_ratio") else None,
    )


def mlflow_curves(uri: str, experiment: str, filter_string: str = "") -> dict:
    """The law tools' MLflow source: {name: laws.io.Curve} of the stabilised activation curves."""
    return {name: law_curve(name, c["token_passed"], c["activation_ratio"], c["tags"])
            for name, c in query_curves(uri, experiment, filter_string).items()}
