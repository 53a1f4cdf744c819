"""`grid submit`: every run of a grid as a Ray Tune trial that fits a Ray Train TorchTrainer.

Ray schedules the runs (as many at once as the cluster holds); each run's workers form its
tensor x data parallel group and run `sparsity_scaling.train`. A run directory is the
run's identity: resubmitting skips what is finished, resumes what is not from its newest
complete checkpoint, and logs into the same MLflow run.
"""

from __future__ import annotations

import os
import time

import ray
from ray import tune

from sparsity_scaling.config import checkpoint_tokens
from sparsity_scaling.errors import UserError
from sparsity_scaling.rundir import Checkpoint, RunDir
from sparsity_scaling.train.callbacks import Callback, ConsoleProgress, TrainPoint

from .cluster import connect_ray
from .grid import Grid, GridFile, RunSpec
from .report import write_report
from .status import ProgressPrinter
from .tracking import check_tracking_uri, child_run, parent_run, sync_run, sync_until_delivered, tracking
from .workdir import Workdir


def is_trained(run: RunDir, spec: RunSpec) -> bool:
    done = run.checkpoints()
    return bool(done) and done[-1].tokens == checkpoint_tokens(spec.config)[-1]


def check_resources(grid: Grid) -> None:
    """Refuse a run that no node (or the whole cluster) could ever hold."""
    res = grid.spec.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_worker = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
    if not any(all(node.get(k, 0) >= v for k, v in per_worker.items() if v) for node in nodes):
        raise UserError(
            f"{grid.path}: resources: no node has {res.cpus_per_worker:g} CPUs and "
            f"{res.gpus_per_worker:g} GPUs for one worker"
        )
    for key, need in per_worker.items():
        total = sum(node.get(key, 0) for node in nodes)
        if need and need * res.workers > total:
            raise UserError(
                f"{grid.path}: resources: a run needs {need * res.workers:g} {key} "
                f"({res.workers} workers), the cluster has {total:g}"
            )
    evaluation = grid.spec.evaluation
    for key, need in evaluation.rank_resources().items():
        if not any(node.get(key, 0) >= need for node in nodes):
            best = max((node.get(key, 0) for node in nodes), default=0)
            raise UserError(f"{grid.path}: evaluation.{key.lower()}s {need:g}: no node has that many {key}s "
                            f"(the most on one node: {best:g})")
        total = sum(node.get(key, 0) for node in nodes)
        if need * evaluation.tp > total:
            raise UserError(f"{grid.path}: evaluation.tp {evaluation.tp}: a job needs {need * evaluation.tp:g} "
                            f"{key}s, the cluster has {total:g}")


class GridCallback(Callback):
    """In a grid's training worker: queue each new checkpoint's evaluation, and deliver the
    run's points to MLflow at each checkpoint and at most every 30 s in between."""

    def __init__(self, run: RunDir, queue, gate):
        self.run, self.queue, self.gate, self.synced = run, queue, gate, 0.0

    def on_start(self, plan) -> None:
        self.gate.training.remote(self.run.name)  # the workers hold their resources now

    def _sync(self) -> None:
        self.synced = time.time()
        sync_run(self.run.path)

    def on_log(self, point: TrainPoint) -> None:
        if time.time() - self.synced > 30:
            self._sync()

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.queue.checkpoint_ready.remote(str(checkpoint.path))
        self._sync()


def _train_worker(config: dict) -> None:
    """One rank of one run, inside a Ray Train worker (the process group already exists)."""
    from sparsity_scaling.train.start import train_on_rank

    spec: RunSpec = config["spec"]
    run = RunDir(config["run_dir"])
    train_on_rank(spec.config, run.path, [ConsoleProgress(), GridCallback(run, config["queue"], config["gate"])])


def _run_trial(params: dict, specs: dict, grid_spec: GridFile, workdir: str, gate) -> dict:
    """A Tune trial: train one run (if not trained), then wait for its evaluations."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .eval_queue import OUTSIDE_TRIAL, EvaluationQueue

    spec: RunSpec = specs[params["run"]]
    work = Workdir(workdir)
    run = work.run(spec.name)
    queue = EvaluationQueue.options(**OUTSIDE_TRIAL).remote(str(run.path), grid_spec.evaluation, gate)
    for ck in run.checkpoints():
        queue.checkpoint_ready.remote(str(ck.path))
    if not is_trained(run, spec):
        res = grid_spec.resources
        worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"spec": spec, "run_dir": str(run.path), "queue": queue, "gate": gate},
            scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                         resources_per_worker=worker),
            run_config=RunConfig(name=spec.name, storage_path=str(work.ray.resolve()),
                                 failure_config=FailureConfig(max_failures=grid_spec.max_failures)),
        )
        trainer.fit()
    gate.training.remote(spec.name)  # trained (now or before): nothing of it to wait for
    ray.get(queue.finish.remote())
    delivered = sync_until_delivered(run.path)
    summary = run.sparsity_record()["checkpoints"][-1]
    return {"activation_ratio": summary["activation_ratio"], "tokens": summary["tokens"], "mlflow_delivered": delivered}


def check_corpora(grid: Grid) -> None:
    """Refuse, before anything runs, a run whose corpus is not prepared or too small for its
    budget (the epoch guard; each distinct data setting is checked once)."""
    from sparsity_scaling.data.pipeline import check_budget

    checked = set()
    for spec in grid.runs:
        key = (spec.config.data.model_dump_json(), spec.config.train.tokens)
        if key not in checked:
            checked.add(key)
            try:
                check_budget(spec.config.data, spec.config.train.tokens)
            except UserError as error:
                raise UserError(f"{grid.path}: run {spec.name}: {error}") from None


def submit(grid: Grid, workdir: Workdir, address: str | None = None) -> None:
    """Train and evaluate every run of the grid, then write its report into the workdir."""
    workdir = Workdir(workdir.path.resolve())
    check_corpora(grid)
    # Ray Train's print patch sends each print of a worker to its logger and, where Ray
    # wraps stdout, to stdout as well: every progress line would reach the driver twice.
    # (Ray passes this variable from the driver to the trainers' workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    connect_ray(address)
    check_resources(grid)
    with tracking(workdir) as uri:
        check_tracking_uri(uri)
        parent = parent_run(uri, grid)
        for spec in grid.runs:
            child_run(uri, grid, spec, parent, workdir.run(spec.name))
        print(f"grid {grid.name}: {len(grid.runs)} runs, workdir {workdir.path}, MLflow {uri}", flush=True)
        from .eval_queue import OUTSIDE_TRIAL, TrainingGate

        gate = TrainingGate.options(**OUTSIDE_TRIAL).remote([s.name for s in grid.runs])
        trial = tune.with_parameters(
            _run_trial, specs={s.name: s for s in grid.runs}, grid_spec=grid.spec, workdir=str(workdir.path),
            gate=gate,
        )
        tuner = tune.Tuner(
            tune.with_resources(trial, {"CPU": 0.01}),
            param_space={"run": tune.grid_search([s.name for s in grid.runs])},
            run_config=tune.RunConfig(name=grid.name, storage_path=str(workdir.ray), verbose=0),
        )
        with ProgressPrinter(grid, workdir):  # instead of Tune's periodic status table
            results = tuner.fit()
        failed = [r for r in results if r.error]
        if failed:
            raise UserError(f"{len(failed)} of {len(grid.runs)} runs failed: {failed[0].error}".splitlines()[0])
        write_report(grid, uri, workdir)
