"""Activation curves out of MLflow: `tools/curves.py` and the law tools' MLflow source."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sparsity_scaling.errors import UserError
from sparsity_scaling.files import write_json_atomic


def query_curves(uri: str, experiment: str, filter_string: str = "", metric: str = "activation_ratio") -> dict:
    """{run name: {"token_passed": [...], metric: [...], "tags": {...}}} for matching child runs."""
    from .tracking import check_tracking_uri, client

    check_tracking_uri(uri)
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"--experiment {experiment}: no such MLflow experiment at {uri}")
    try:
        runs = mlflow.search_runs([found.experiment_id], filter_string=filter_string or "", max_results=10000)
    except Exception as error:  # MlflowException for a malformed filter
        raise UserError(f"--filter {filter_string!r}: {str(error).splitlines()[0][:200]}") from None
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
        raise UserError(f"--experiment {experiment}: no run with a {metric} curve matches {filter_string!r}")
    return curves


def write_curves(curves: dict, metric: str, out: str | Path) -> None:
    """.csv: one row per point; .json: the reference format per run; .png: a plot."""
    out = Path(out)
    if out.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["model", "tokens", metric, "activation", "params"])
        for name, curve in curves.items():
            for tokens, value in zip(curve["token_passed"], curve[metric]):
                writer.writerow([name, tokens, value, curve["tags"].get("activation", ""), curve["tags"].get("params", "")])
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(buffer.getvalue())
        tmp.replace(out)
    elif out.suffix == ".json":
        write_json_atomic(out, {name: {"token_passed": c["token_passed"], metric: c[metric]} for name, c in curves.items()})
    elif out.suffix == ".png":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, curve in sorted(curves.items()):
            ax.plot(curve["token_passed"], curve[metric], marker="o", ms=3, label=name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{metric.replace('_', ' ')} against training tokens")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = out.with_name(f".{out.stem}.tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(out)
    else:
        raise UserError(f"--out {out}: expected a .csv, .json or .png file")


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
