"""Dead neurons: the share of neurons active on fewer than a given share of tokens, at every
checkpoint of a run, beside the run's activation-ratio trend."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..parallel import init_parallel
from ..rundir import RunDir
from .activity import Activity, measure_activity
from ..evaluation.inputs import ModelRef
from .models import ModelSpec, model_and_rule, one_dataset
from .output import is_rank0, say, write_results
from .settings import AnalysisSettings


def dead_point(activity: Activity, below: float) -> dict:
    """Share of neurons (overall and per layer) whose activation frequency is below `below`."""
    dead = activity.frequency() < below
    return {"dead_neuron_ratio": float(dead.mean()), "dead_neurons": int(dead.sum()),
            "neurons": int(dead.size), "layer_dead_ratios": dead.mean(1).tolist(),
            "activation_ratio": activity.activation_ratio, "eval_tokens": activity.tokens}


def run_curve(run: RunDir) -> dict | None:
    """The run's stabilised activation ratio per checkpoint (evaluate-run), if it has one."""
    record = run.sparsity_record()
    if record is None:
        return None
    points = record["checkpoints"]
    return {"metric": record.get("metric"), "p": record.get("p"), "cett": record.get("cett"),
            "tokens": [p["tokens"] for p in points], "activation_ratio": [p["activation_ratio"] for p in points]}


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
                   label=f"activation ratio (RUN/{RunDir.SPARSITY}, stabilised)")
    right.set_ylabel("activation ratio")
    lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return figure



def dead_on_rank(settings: AnalysisSettings, run_dir: str, dead_below: float = 0.001, stabilised: bool = False) -> None:
    """`analyze dead`: every checkpoint of a run; a collective on every rank."""
    init_parallel(settings.tp)
    run = RunDir(run_dir)
    points = []
    for ck in run.checkpoints():
        spec = ModelSpec(ck.name, ModelRef(checkpoint=str(ck.path)))
        data = one_dataset(settings, spec)
        target, rule, setting = model_and_rule(settings, spec)
        activity = measure_activity(target, data, rule, ck.name)
        point = {"checkpoint": ck.name, "tokens": ck.tokens, "step": ck.step,
                 **dead_point(activity, dead_below), "setting": setting}
        points.append(point)
        say(f"{ck.name}: dead neurons {point['dead_neuron_ratio']:.4f}, "
            f"activation ratio {point['activation_ratio']:.4f}")
    if is_rank0():
        metric = settings.metric
        text = f"PPL-{metric.p:g}% of each checkpoint" if metric.metric == "ppl-p" else metric.describe(stabilised)
        report = {"run": run.name, "run_dir": str(run.path), "dead_below": dead_below,
                  "setting_text": text, "checkpoints": points, "run_curve": run_curve(run)}
        metrics = [("dead_neuron_ratio", p["dead_neuron_ratio"], p["tokens"]) for p in points]
        write_results(settings, "dead", report, dead_figure(report), metrics)
