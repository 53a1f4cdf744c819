"""Evaluation jobs on the cluster: PPL-p% of each new checkpoint as it appears, then the
stabilising strategy and the Pareto curves of the last checkpoint when the run ends. Each
job is a placement group of `evaluation.tp` ranks (`run_job`), started only once every run
holds its training resources (`TrainingGate`). A job whose node is lost is retried on
another; while it runs, its rank 0 reports in RUN/jobs/ (`JobStatus`). Results are files in
the run directory, delivered to MLflow by `sync_run`."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import ray

from sparsity_scaling.files import write_json_atomic
from sparsity_scaling.rundir import RunDir, read_checkpoint

from .cluster import ON_HEAD, NodeWatch, output_to, this_node
from .grid import Evaluation
from .queries import write_curves
from .tracking import sync_run

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


def gpu_environment(gpu_ids: list) -> dict[str, str]:
    """What an evaluation rank that Ray gave `gpu_ids` changes in its environment. Ray shows
    a rank given GPUs only its own (CUDA_VISIBLE_DEVICES), so its device is the first one it
    sees (LOCAL_RANK 0); a rank given none sees every GPU of its node, training's included
    (Ray 2.60 leaves the variable as it is), so CUDA is hidden from it: it runs on its CPUs."""
    return {} if gpu_ids else {"CUDA_VISIBLE_DEVICES": ""}


@ray.remote(num_cpus=0)
class _Rank:
    """One rank of an evaluation job: a Ray worker with the job's CPUs and GPUs per rank."""

    def __init__(self):
        os.environ.update(gpu_environment(ray.get_gpu_ids()))  # before anything here starts CUDA

    def address(self) -> tuple[str, int]:
        from sparsity_scaling.parallel import free_port

        return ray.util.get_node_ip_address(), free_port()

    def run(self, rank: int, world: int, master: tuple[str, int], log: str, fn, *args):
        from sparsity_scaling.parallel import shutdown_parallel

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        with output_to(Path(log)):
            try:
                return fn(*args)
            finally:
                shutdown_parallel()


# max_retries=0: a rank lost with its node fails the job, which the orchestrating task runs
# again after waiting, watched, for a node (JOB), as a job of actors does
@ray.remote(num_cpus=0, max_retries=0)
def _only_rank(cpus: float, log: str, fn, *args):
    """The one rank of a job on CPUs, as a task: Ray keeps the worker process for the next
    job, which then skips the interpreter's start and the imports (about 6 s on 2 cores).
    A job with GPUs keeps its actors, a fresh process each, CUDA's state never inherited."""
    from sparsity_scaling.parallel import free_port, shutdown_parallel

    os.environ.update(gpu_environment([]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(max(1, int(cpus)))  # a kept worker read OMP_NUM_THREADS for an earlier task
    with output_to(Path(log)):
        try:
            return fn(*args)
        finally:
            shutdown_parallel()


def run_job(evaluation: Evaluation, wait_s: float, log: Path, job: str, fn, *args):
    """fn(*args) on `evaluation.tp` ranks that form one process group (a placement group of
    one bundle per rank); rank 0's result. fn runs `init_parallel(tp)` and lets rank 0 write.
    The ranks' output goes to `log` (a run's evaluation log). Waits for room on the cluster, but
    stops after `wait_s` seconds in which no node could hold a rank at all."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    per_rank = evaluation.rank_resources()
    group = placement_group([per_rank] * evaluation.tp, strategy="PACK")
    watch = NodeWatch(per_rank, wait_s)
    try:
        while not ray.wait([group.ready()], timeout=5)[0]:
            watch.check(f"a rank of its evaluation job {job}")
        if evaluation.tp == 1 and not evaluation.gpus:
            return ray.get(_only_rank.options(num_cpus=evaluation.cpus,
                                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote(
                evaluation.cpus, str(log), fn, *args))
        ranks = [_Rank.options(num_cpus=evaluation.cpus, num_gpus=evaluation.gpus,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
                 for index in range(evaluation.tp)]
        master = ray.get(ranks[0].address.remote())
        results = ray.get([r.run.remote(i, evaluation.tp, master, str(log), fn, *args) for i, r in enumerate(ranks)])
    finally:
        remove_placement_group(group)
    return results[0]


class JobStatus:
    """RUN/jobs/JOB.json while an evaluation job runs, written by its rank 0: the node it
    runs on, its attempt (a job whose node was lost runs again elsewhere) and the latest
    step of its CETT search. `grid status` shows it; it goes once the job's result is written."""

    def __init__(self, run: RunDir, job: str):
        self.path = run.job_status(job)
        try:
            attempt = json.loads(self.path.read_text())["attempt"] + 1  # an attempt was cut off
        except (OSError, ValueError, KeyError):
            attempt = 1
        node_id, ip = this_node()
        self.record = {"job": job, "node_id": node_id, "ip": ip, "attempt": attempt, "started": time.time()}
        write_json_atomic(self.path, self.record)

    def search_step(self, step: int, point) -> None:
        self.record.update(search_step=step, cett=point.x, ppl_ratio=point.ratio)
        write_json_atomic(self.path, self.record)

    def where(self) -> dict:
        """What the job's result records of how it was computed: where, which attempt, and
        when its rank 0 started (`evaluated_on`)."""
        return {key: self.record[key] for key in ("node_id", "ip", "attempt", "started")}

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def _status(run: RunDir, job: str) -> JobStatus | None:
    """The job's status on its rank 0 (the only one that writes); None on other ranks."""
    return JobStatus(run, job) if os.environ.get("RANK") == "0" else None


def _checkpoint_job(checkpoint: str, evaluation: Evaluation) -> dict | None:
    """A checkpoint's PPL-p% result; None, recorded as failed, if it cannot be measured
    (non-finite weights or perplexity): trying again would meet the same values."""
    from sparsity_scaling.errors import NonFiniteError
    from sparsity_scaling.evaluation.jobs import evaluate_checkpoint

    ck = read_checkpoint(checkpoint)
    status = _status(ck.run, ck.name)
    try:
        record = evaluate_checkpoint(checkpoint, evaluation.metric(), evaluation.data(), evaluation.tp,
                                     on_step=status.search_step if status else None)
    except NonFiniteError as error:
        if status:
            write_json_atomic(ck.run.evaluation_failure_of(ck.path),
                              {"checkpoint": ck.name, "train_tokens": ck.tokens, "error": str(error)})
            status.done()
        return None
    if status:
        write_json_atomic(ck.run.evaluation_of(ck.path), {**record, "evaluated_on": status.where()})
        status.done()
    return record


def _stabilised_job(run_dir: str, evaluation: Evaluation) -> None:
    from sparsity_scaling.evaluation.jobs import evaluate_run

    status = _status(RunDir(run_dir), "stabilised")
    evaluate_run(run_dir, evaluation.metric(), evaluation.data(), evaluation.last, evaluation.tp,
                 on_step=status.search_step if status else None, extra={"evaluated_on": status.where()} if status else None)
    if status:
        status.done()


def _pareto_job(run_dir: str, evaluation: Evaluation) -> None:
    from sparsity_scaling.analysis.pareto import pareto_of_run

    pareto_of_run(run_dir, evaluation.metric(), evaluation.data())


# A job's orchestrating task holds no resources (its ranks do) and runs on the head node; if
# a node with one of its ranks dies, the task fails with the rank (its actor or task) and Ray
# runs it again, on the nodes left.
JOB = {**ON_HEAD, "retry_exceptions": [ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                                        ray.exceptions.NodeDiedError], "max_retries": 3}


@ray.remote
def evaluate_checkpoint_task(checkpoint: str, evaluation: Evaluation, gate, wait_s: float) -> dict | None:
    _after_training(gate)
    run = read_checkpoint(checkpoint).run
    record = run_job(evaluation, wait_s, run.evaluation_log, Path(checkpoint).name, _checkpoint_job, checkpoint,
                     evaluation)
    sync_run(run.path)
    return record


@ray.remote
def evaluate_run_task(run_dir: str, evaluation: Evaluation, gate, wait_s: float) -> None:
    _after_training(gate)
    run_job(evaluation, wait_s, RunDir(run_dir).evaluation_log, "stabilised", _stabilised_job, run_dir, evaluation)
    plot_run(RunDir(run_dir))
    sync_run(run_dir)


@ray.remote
def pareto_task(run_dir: str, evaluation: Evaluation, gate, wait_s: float) -> None:
    """The Pareto curves at the last checkpoint (one rank with the job's per-rank resources)."""
    _after_training(gate)
    run_job(evaluation.model_copy(update={"tp": 1}), wait_s, RunDir(run_dir).evaluation_log, "pareto", _pareto_job,
            run_dir, evaluation)
    sync_run(run_dir)


def plot_run(run: RunDir) -> None:
    """The activation-curve plot: stabilised and per-checkpoint PPL-p% against training
    tokens, the start of the decay stage marked (where train.decay_data takes over)."""
    from sparsity_scaling.config import load_config
    from sparsity_scaling.train.schedule import decay_start_tokens

    stabilised = run.sparsity_record()["checkpoints"]
    curves = {"stabilised CETT": {"token_passed": [p["tokens"] for p in stabilised],
                                  "activation_ratio": [p["activation_ratio"] for p in stabilised], "tags": {}}}
    singles = run.evaluations()
    if singles:
        curves["per-checkpoint CETT"] = {"token_passed": [r["train_tokens"] for r in singles],
                                         "activation_ratio": [r["activation_ratio"] for r in singles], "tags": {}}
    config = load_config(run.config_file)
    label = "decay: train.decay_data" if config.train.decay_data else "decay starts"
    write_curves(curves, "activation_ratio", run.activation_plot, marks={label: decay_start_tokens(config)})


@ray.remote(num_cpus=0, max_concurrency=4)
class EvaluationQueue:
    """Owns a run's evaluation tasks, so they outlive a training worker that fails."""

    def __init__(self, run_dir: str, evaluation: Evaluation, gate, wait_s: float):
        self.run = RunDir(run_dir)
        self.evaluation, self.gate, self.wait_s = evaluation, gate, wait_s
        self.tasks: dict[str, ray.ObjectRef] = {}
        self.lock = threading.Lock()  # calls run concurrently: one task per checkpoint

    def checkpoint_ready(self, checkpoint: str) -> None:
        with self.lock:
            done = (self.run.evaluation_of(Path(checkpoint)).is_file()
                    or self.run.evaluation_failure_of(Path(checkpoint)).is_file())
            if checkpoint not in self.tasks and not done:
                self.tasks[checkpoint] = evaluate_checkpoint_task.options(**JOB).remote(
                    checkpoint, self.evaluation, self.gate, self.wait_s
                )

    def queue_unmeasured(self) -> None:
        """Queue every complete checkpoint of the run without a result: the run directory,
        not the messages, is the truth (a worker lost with its node may have written a
        checkpoint and died before its message left)."""
        for checkpoint in self.run.checkpoints():
            self.checkpoint_ready(str(checkpoint.path))

    def finish(self) -> None:
        """Wait for the per-checkpoint jobs, then apply the stabilising strategy once and
        draw the Pareto curves of the last checkpoint (both at most once)."""
        self.queue_unmeasured()
        with self.lock:
            tasks = list(self.tasks.values())
        ray.get(tasks)
        jobs = []
        if not self.run.sparsity.is_file():
            jobs.append(evaluate_run_task.options(**JOB).remote(str(self.run.path), self.evaluation, self.gate,
                                                               self.wait_s))
        if self.evaluation.pareto and not self.run.pareto.is_file():
            jobs.append(pareto_task.options(**JOB).remote(str(self.run.path), self.evaluation, self.gate, self.wait_s))
        ray.get(jobs)
