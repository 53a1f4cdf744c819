"""`grid status`: each run's state from its files (no cluster needed)."""

from __future__ import annotations

from sparsity_scaling.config import checkpoint_tokens
from sparsity_scaling.rundir import RunDir

from .grid import Grid, RunSpec
from .workdir import Workdir


def run_state(run: RunDir, spec: RunSpec) -> dict:
    checkpoints = run.checkpoints()
    final = checkpoint_tokens(spec.config)[-1]
    tokens = checkpoints[-1].tokens if checkpoints else 0
    train = [p for p in run.metric_points() if p["kind"] == "train"]
    loss = train[-1]["loss"] if train else None
    tokens = max(tokens, train[-1]["tokens"]) if train else tokens
    evaluations = run.evaluations()
    ratio = evaluations[-1]["activation_ratio"] if evaluations else None
    state = "pending"
    if checkpoints or tokens:
        state = "training"
    if checkpoints and checkpoints[-1].tokens == final:
        state = "evaluating"
    stabilised = run.sparsity_record()
    if stabilised is not None:
        state = "done"
        ratio = stabilised["checkpoints"][-1]["activation_ratio"]
    return {"run": spec.name, "state": state, "tokens": tokens, "of": final, "loss": loss, "activation_ratio": ratio}


def status_table(grid: Grid, workdir: Workdir) -> str:
    lines = [f"{'run':<24}{'state':>11}{'tokens':>14}{'of':>12}{'loss':>9}{'act. ratio':>12}"]
    for spec in grid.runs:
        s = run_state(workdir.run(spec.name), spec)
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        ratio = f"{s['activation_ratio']:.4f}" if s["activation_ratio"] is not None else "-"
        lines.append(f"{s['run']:<24}{s['state']:>11}{s['tokens']:>14,}{s['of']:>12,}{loss:>9}{ratio:>12}")
    return "\n".join(lines)
