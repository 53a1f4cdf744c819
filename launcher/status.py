"""`grid status`: each run's state from its files (no cluster needed)."""

from __future__ import annotations

import json
from pathlib import Path

from sparsity_scaling.config import checkpoint_tokens
from sparsity_scaling.train.checkpoint import list_checkpoints

from .grid import Grid


def run_state(run_dir: Path, spec) -> dict:
    checkpoints = list_checkpoints(run_dir)
    final = checkpoint_tokens(spec.config)[-1]
    tokens = checkpoints[-1].tokens if checkpoints else 0
    loss = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        train = [json.loads(l) for l in metrics.read_text().splitlines() if '"train"' in l]
        loss = train[-1]["loss"] if train else None
        tokens = max(tokens, train[-1]["tokens"]) if train else tokens
    ratio, state = None, "pending"
    evaluations = sorted((run_dir / "evaluations").glob("tokens_*.json")) if (run_dir / "evaluations").is_dir() else []
    if evaluations:
        ratio = json.loads(evaluations[-1].read_text())["activation_ratio"]
    if checkpoints or tokens:
        state = "training"
    if checkpoints and checkpoints[-1].tokens == final:
        state = "evaluating"
    if (run_dir / "sparsity.json").is_file():
        state = "done"
        ratio = json.loads((run_dir / "sparsity.json").read_text())["checkpoints"][-1]["activation_ratio"]
    return {"run": spec.name, "state": state, "tokens": tokens, "of": final, "loss": loss, "activation_ratio": ratio}


def status_table(grid: Grid, workdir: Path) -> str:
    lines = [f"{'run':<24}{'state':>11}{'tokens':>14}{'of':>12}{'loss':>9}{'act. ratio':>12}"]
    for spec in grid.runs:
        s = run_state(workdir / "runs" / spec.name, spec)
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        ratio = f"{s['activation_ratio']:.4f}" if s["activation_ratio"] is not None else "-"
        lines.append(f"{s['run']:<24}{s['state']:>11}{s['tokens']:>14,}{s['of']:>12,}{loss:>9}{ratio:>12}")
    return "\n".join(lines)
