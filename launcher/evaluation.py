"""Evaluation jobs on the cluster: PPL-p% of each new checkpoint as it appears, then the
stabilising strategy and the Pareto curves of the last checkpoint when the run ends. They
run as Ray tasks beside training, never in its way; results are files in the run
directory, delivered to MLflow by `sync_run`."""

from __future__ import annotations

from pathlib import Path

import ray

from sparsity_scaling.files import write_json_atomic

from .tracking import sync_run


# Jobs started from a Tune trial would be captured by its placement group, which holds no
# CPU for them: schedule them on the cluster at large instead.
OUTSIDE_TRIAL = {"scheduling_strategy": "DEFAULT"}


def result_path(checkpoint: Path) -> Path:
    return checkpoint.parent.parent / "evaluations" / f"{checkpoint.name}.json"


@ray.remote(num_cpus=1)
def evaluate_checkpoint_task(checkpoint: str, evaluation: dict) -> dict:
    from sparsity_scaling.evaluate import evaluate_checkpoint, settings

    out = result_path(Path(checkpoint))
    record = evaluate_checkpoint(checkpoint, settings(**evaluation))
    write_json_atomic(out, record)
    sync_run(out.parent.parent)
    return record


@ray.remote(num_cpus=1)
def evaluate_run_task(run_dir: str, evaluation: dict) -> None:
    from sparsity_scaling.evaluate import evaluate_run, settings

    evaluate_run(run_dir, settings(**evaluation))
    plot_run(Path(run_dir))
    sync_run(run_dir)


@ray.remote(num_cpus=1)
def pareto_task(run_dir: str, evaluation: dict) -> None:
    from sparsity_scaling.analysis.pareto import pareto_of_run
    from sparsity_scaling.evaluate import settings

    pareto_of_run(run_dir, settings(**evaluation))
    sync_run(run_dir)


def plot_run(run_dir: Path) -> None:
    """activation_curve.png: stabilised and per-checkpoint PPL-1% against training tokens."""
    import json

    from .curves import write_curves

    stabilised = json.loads((run_dir / "sparsity.json").read_text())["checkpoints"]
    curves = {"stabilised CETT": {"token_passed": [p["tokens"] for p in stabilised],
                                  "activation_ratio": [p["activation_ratio"] for p in stabilised], "tags": {}}}
    evaluations = run_dir / "evaluations"
    files = evaluations.glob("tokens_*.json") if evaluations.is_dir() else []
    singles = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["train_tokens"])
    if singles:
        curves["per-checkpoint CETT"] = {"token_passed": [r["train_tokens"] for r in singles],
                                         "activation_ratio": [r["activation_ratio"] for r in singles], "tags": {}}
    write_curves(curves, "activation_ratio", run_dir / "activation_curve.png")


@ray.remote(num_cpus=0, max_concurrency=4)
class EvaluationQueue:
    """Owns a run's evaluation tasks, so they outlive a training worker that fails."""

    def __init__(self, run_dir: str, evaluation: dict):
        self.run_dir = Path(run_dir)
        self.evaluation = evaluation
        self.tasks: dict[str, ray.ObjectRef] = {}
        self.placement = {**OUTSIDE_TRIAL, "num_cpus": evaluation.get("cpus", 1)}

    def checkpoint_ready(self, checkpoint: str) -> None:
        if checkpoint not in self.tasks and not result_path(Path(checkpoint)).is_file():
            self.tasks[checkpoint] = evaluate_checkpoint_task.options(**self.placement).remote(
                checkpoint, self.evaluation
            )

    def finish(self) -> None:
        """Wait for the per-checkpoint jobs, then apply the stabilising strategy once and
        draw the Pareto curves of the last checkpoint (both at most once)."""
        ray.get(list(self.tasks.values()))
        jobs = []
        if not (self.run_dir / "sparsity.json").is_file():
            jobs.append(evaluate_run_task.options(**self.placement).remote(str(self.run_dir), self.evaluation))
        if self.evaluation.get("pareto", True) and not (self.run_dir / "pareto.json").is_file():
            jobs.append(pareto_task.options(**self.placement).remote(str(self.run_dir), self.evaluation))
        ray.get(jobs)
