"""Evaluation jobs on the cluster: PPL-p% of each new checkpoint as it appears, then the
stabilising strategy and the Pareto curves of the last checkpoint when the run ends. They
run as Ray tasks beside training, never in its way; results are files in the run
directory, delivered to MLflow by `sync_run`."""

from __future__ import annotations

from pathlib import Path

import ray

from sparsity_scaling.files import write_json_atomic
from sparsity_scaling.rundir import RunDir, read_checkpoint

from .grid import Evaluation
from .queries import write_curves
from .tracking import sync_run

# Jobs started from a Tune trial would be captured by its placement group, which holds no
# CPU for them: schedule them on the cluster at large instead.
OUTSIDE_TRIAL = {"scheduling_strategy": "DEFAULT"}


@ray.remote(num_cpus=1)
def evaluate_checkpoint_task(checkpoint: str, evaluation: Evaluation) -> dict:
    from sparsity_scaling.evaluation.jobs import evaluate_checkpoint

    ck = read_checkpoint(checkpoint)
    record = evaluate_checkpoint(checkpoint, evaluation.metric(), evaluation.data())
    write_json_atomic(ck.run.evaluation_of(ck.path), record)
    sync_run(ck.run.path)
    return record


@ray.remote(num_cpus=1)
def evaluate_run_task(run_dir: str, evaluation: Evaluation) -> None:
    from sparsity_scaling.evaluation.jobs import evaluate_run

    evaluate_run(run_dir, evaluation.metric(), evaluation.data(), evaluation.last)
    plot_run(RunDir(run_dir))
    sync_run(run_dir)


@ray.remote(num_cpus=1)
def pareto_task(run_dir: str, evaluation: Evaluation) -> None:
    from sparsity_scaling.analysis.pareto import pareto_of_run

    pareto_of_run(run_dir, evaluation.metric(), evaluation.data())
    sync_run(run_dir)


def plot_run(run: RunDir) -> None:
    """The activation-curve plot: stabilised and per-checkpoint PPL-p% against training tokens."""
    stabilised = run.sparsity_record()["checkpoints"]
    curves = {"stabilised CETT": {"token_passed": [p["tokens"] for p in stabilised],
                                  "activation_ratio": [p["activation_ratio"] for p in stabilised], "tags": {}}}
    singles = run.evaluations()
    if singles:
        curves["per-checkpoint CETT"] = {"token_passed": [r["train_tokens"] for r in singles],
                                         "activation_ratio": [r["activation_ratio"] for r in singles], "tags": {}}
    write_curves(curves, "activation_ratio", run.activation_plot)


@ray.remote(num_cpus=0, max_concurrency=4)
class EvaluationQueue:
    """Owns a run's evaluation tasks, so they outlive a training worker that fails."""

    def __init__(self, run_dir: str, evaluation: Evaluation):
        self.run = RunDir(run_dir)
        self.evaluation = evaluation
        self.tasks: dict[str, ray.ObjectRef] = {}
        self.placement = {**OUTSIDE_TRIAL, "num_cpus": evaluation.cpus}

    def checkpoint_ready(self, checkpoint: str) -> None:
        if checkpoint not in self.tasks and not self.run.evaluation_of(Path(checkpoint)).is_file():
            self.tasks[checkpoint] = evaluate_checkpoint_task.options(**self.placement).remote(
                checkpoint, self.evaluation
            )

    def finish(self) -> None:
        """Wait for the per-checkpoint jobs, then apply the stabilising strategy once and
        draw the Pareto curves of the last checkpoint (both at most once)."""
        ray.get(list(self.tasks.values()))
        jobs = []
        if not self.run.sparsity.is_file():
            jobs.append(evaluate_run_task.options(**self.placement).remote(str(self.run.path), self.evaluation))
        if self.evaluation.pareto and not self.run.pareto.is_file():
            jobs.append(pareto_task.options(**self.placement).remote(str(self.run.path), self.evaluation))
        ray.get(jobs)
