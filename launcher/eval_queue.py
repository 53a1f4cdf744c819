"""Evaluation jobs on the cluster: PPL-p% of each new checkpoint as it appears, then the
stabilising strategy and the Pareto curves of the last checkpoint when the run ends. Each
job is a placement group of `evaluation.tp` ranks (`run_job`), started only once every run
holds its training resources (`TrainingGate`); results are files in the run directory,
delivered to MLflow by `sync_run`."""

from __future__ import annotations

import os
import time
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


@ray.remote(num_cpus=0)
class TrainingGate:
    """Training keeps priority: evaluation jobs wait until every run of the grid has its
    training resources (or is trained), so an evaluation never takes the CPUs or GPUs a run
    was planned with."""

    def __init__(self, runs: list[str]):
        self.waiting = set(runs)

    def training(self, run: str) -> None:
        """The run holds its training resources (or needs none: it is trained)."""
        self.waiting.discard(run)

    def is_open(self) -> bool:
        return not self.waiting


def _after_training(gate) -> None:
    while not ray.get(gate.is_open.remote()):
        time.sleep(2)


@ray.remote(num_cpus=0)
class _Rank:
    """One rank of an evaluation job: a Ray worker with the job's CPUs and GPUs per rank."""

    def address(self) -> tuple[str, int]:
        from sparsity_scaling.parallel import free_port

        return ray.util.get_node_ip_address(), free_port()

    def run(self, rank: int, world: int, master: tuple[str, int], fn, *args):
        from sparsity_scaling.parallel import shutdown_parallel

        # Ray shows each rank only its own GPUs, so its device is always the first one.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        try:
            return fn(*args)
        finally:
            shutdown_parallel()


def run_job(evaluation: Evaluation, fn, *args):
    """fn(*args) on `evaluation.tp` ranks that form one process group (a placement group of
    one bundle per rank); rank 0's result. fn runs `init_parallel(tp)` and lets rank 0 write."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    per_rank = evaluation.rank_resources()
    group = placement_group([per_rank] * evaluation.tp, strategy="PACK")
    ray.get(group.ready())
    try:
        ranks = [_Rank.options(num_cpus=evaluation.cpus, num_gpus=evaluation.gpus,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
                 for index in range(evaluation.tp)]
        master = ray.get(ranks[0].address.remote())
        results = ray.get([r.run.remote(i, evaluation.tp, master, fn, *args) for i, r in enumerate(ranks)])
    finally:
        remove_placement_group(group)
    return results[0]


def _checkpoint_job(checkpoint: str, evaluation: Evaluation) -> dict:
    import torch.distributed as dist

    from sparsity_scaling.evaluation.jobs import evaluate_checkpoint

    ck = read_checkpoint(checkpoint)
    record = evaluate_checkpoint(checkpoint, evaluation.metric(), evaluation.data(), evaluation.tp)
    if dist.get_rank() == 0:
        write_json_atomic(ck.run.evaluation_of(ck.path), record)
    return record


def _stabilised_job(run_dir: str, evaluation: Evaluation) -> None:
    from sparsity_scaling.evaluation.jobs import evaluate_run

    evaluate_run(run_dir, evaluation.metric(), evaluation.data(), evaluation.last, evaluation.tp)


# A job's orchestrating task holds no resources (its ranks do); if a node with one of its
# ranks dies, the task fails with the rank's actor and Ray runs it again.
JOB = {**OUTSIDE_TRIAL, "num_cpus": 0, "retry_exceptions": [ray.exceptions.RayActorError], "max_retries": 3}


@ray.remote
def evaluate_checkpoint_task(checkpoint: str, evaluation: Evaluation, gate) -> dict:
    _after_training(gate)
    record = run_job(evaluation, _checkpoint_job, checkpoint, evaluation)
    sync_run(read_checkpoint(checkpoint).run.path)
    return record


@ray.remote
def evaluate_run_task(run_dir: str, evaluation: Evaluation, gate) -> None:
    _after_training(gate)
    run_job(evaluation, _stabilised_job, run_dir, evaluation)
    plot_run(RunDir(run_dir))
    sync_run(run_dir)


def _pareto_job(run_dir: str, evaluation: Evaluation) -> None:
    from sparsity_scaling.analysis.pareto import pareto_of_run

    pareto_of_run(run_dir, evaluation.metric(), evaluation.data())


@ray.remote
def pareto_task(run_dir: str, evaluation: Evaluation, gate) -> None:
    """The Pareto curves at the last checkpoint (one rank with the job's per-rank resources)."""
    _after_training(gate)
    run_job(evaluation.model_copy(update={"tp": 1}), _pareto_job, run_dir, evaluation)
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

    def __init__(self, run_dir: str, evaluation: Evaluation, gate):
        self.run = RunDir(run_dir)
        self.evaluation, self.gate = evaluation, gate
        self.tasks: dict[str, ray.ObjectRef] = {}

    def checkpoint_ready(self, checkpoint: str) -> None:
        if checkpoint not in self.tasks and not self.run.evaluation_of(Path(checkpoint)).is_file():
            self.tasks[checkpoint] = evaluate_checkpoint_task.options(**JOB).remote(
                checkpoint, self.evaluation, self.gate
            )

    def finish(self) -> None:
        """Wait for the per-checkpoint jobs, then apply the stabilising strategy once and
        draw the Pareto curves of the last checkpoint (both at most once)."""
        ray.get(list(self.tasks.values()))
        jobs = []
        if not self.run.sparsity.is_file():
            jobs.append(evaluate_run_task.options(**JOB).remote(str(self.run.path), self.evaluation, self.gate))
        if self.evaluation.pareto and not self.run.pareto.is_file():
            jobs.append(pareto_task.options(**JOB).remote(str(self.run.path), self.evaluation, self.gate))
        ray.get(jobs)
