"""Dead neurons: the share of neurons active on fewer than a given share of tokens, at every
checkpoint of a run, beside the run's activation-ratio trend."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import UserError
from .activity import Activity


def dead_point(activity: Activity, below: float) -> dict:
    """Share of neurons (overall and per layer) whose activation frequency is below `below`."""
    dead = activity.frequency() < below
    return {"dead_neuron_ratio": float(dead.mean()), "dead_neurons": int(dead.sum()),
            "neurons": int(dead.size), "layer_dead_ratios": dead.mean(1).tolist(),
            "activation_ratio": activity.activation_ratio, "eval_tokens": activity.tokens}


def run_curve(run_dir: str | Path) -> dict | None:
    """RUN/sparsity.json's stabilised activation ratio per checkpoint, if the run has one."""
    path = Path(run_dir) / "sparsity.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        points = [(p["tokens"], p["activation_ratio"]) for p in record["checkpoints"]]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a sparsity record of evaluate-run ({error})") from None
    return {"metric": record.get("metric"), "p": record.get("p"), "cett": record.get("cett"),
            "tokens": [t for t, _ in points], "activation_ratio": [a for _, a in points]}


def dead_figure(report: dict) -> Figure:
    """Dead-neuron ratio (left axis) and activation ratio (right axis) against training tokens."""
    points = report["checkpoints"]
    tokens = [p["tokens"] for p in points]
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(tokens, [p["dead_neuron_ratio"] for p in points], "o-", color="tab:red",
            label=f"dead neurons (active on < {report['dead_below']:g} of tokens)")
    ax.set(xscale="log", xlabel="training tokens", ylabel="dead-neuron ratio",
           title=f"{report['run']}: dead neurons and activation ratio over training")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(tokens, [p["activation_ratio"] for p in points], "s--", color="tab:blue", ms=4,
               label=f"activation ratio ({report['setting_text']})")
    curve = report.get("run_curve")
    if curve:
        right.plot(curve["tokens"], curve["activation_ratio"], "^-", color="tab:green", ms=4,
                   label="activation ratio (RUN/sparsity.json, stabilised)")
    right.set_ylabel("activation ratio")
    lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return figure

