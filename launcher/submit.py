"""`grid submit`: every run of a grid as a Ray Tune trial that fits a Ray Train TorchTrainer.

Ray schedules the runs (as many at once as the cluster holds); each run's workers form its
tensor x data parallel group and run `sparsity_scaling.train`. A run directory is the
run's identity: resubmitting skips what is finished, resumes what is not from its newest
complete checkpoint, and logs into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import ray
from ray import tune

from sparsity_scaling.config import checkpoint_tokens
from sparsity_scaling.errors import UserError
from sparsity_scaling.files import LockHeld
from sparsity_scaling.rundir import Checkpoint, RunDir
from sparsity_scaling.train.callbacks import Callback, ConsoleProgress, TrainPoint

from .cluster import HEAD, ON_HEAD, NodeWatch, check_nodes, connect_ray, output_to, this_node
from .grid import Grid, GridFile, RunSpec
from .preflight import ClusterFacts, enforce
from .report import write_report
from .status import ProgressPrinter
from .tracking import (check_tracking_uri, child_run, mark_outcome, parent_run, set_parent_status, sync_run,
                       sync_until_delivered, tracking)
from .workdir import Workdir


def is_trained(run: RunDir, spec: RunSpec) -> bool:
    done = run.checkpoints()
    return bool(done) and done[-1].tokens == checkpoint_tokens(spec.config)[-1]


class GridCallback(Callback):
    """In a grid's training worker: queue each new checkpoint's evaluation, and deliver the
    run's points to MLflow at each checkpoint and at most every 30 s in between."""

    def __init__(self, run: RunDir, queue, gate):
        self.run, self.queue, self.gate, self.synced = run, queue, gate, 0.0

    def on_start(self, plan) -> None:
        self.gate.training.remote(self.run.name)  # the workers hold their resources now
        self.queue.queue_unmeasured.remote()  # (re)started: what the last attempt wrote

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
    """One rank of one run, inside a Ray Train worker (the process group already exists).
    Notes the node it runs on; its output goes to the run's log for this rank.

    A UserError (a diverged step, a bad setting, a full disk) ends the worker normally,
    recorded in the run's failed.json: Ray would retry a raised error from the last
    checkpoint, and meet it again. Every rank meets the same one (a step's verdict is global)."""
    from ray import train

    from sparsity_scaling.train.start import train_on_rank

    spec: RunSpec = config["spec"]
    run = RunDir(config["run_dir"])
    rank = train.get_context().get_world_rank()
    node_id, ip = this_node()
    run.record_node(node_id, ip, time.time())
    with output_to(run.train_log(rank)):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: rank {rank} on node {node_id} ({ip})")
        try:
            train_on_rank(spec.config, run.path, [ConsoleProgress(), GridCallback(run, config["queue"], config["gate"])])
        except UserError as error:
            print(f"error: {error}", flush=True)
            if rank == 0:
                run.mark_failed(str(error), run.train_log(0))


def _fit(trainer, watch: NodeWatch) -> None:
    """trainer.fit(), stopped once no node of the cluster could hold the run's workers for
    the grid's node_wait_s (Ray Train alone would wait for one forever)."""
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(5)
        if thread.is_alive():
            watch.check("a training worker")
    if errors:
        raise errors[0]


def _error_line(error: BaseException) -> str:
    """What went wrong, in a line: a worker's exception is the last line of Ray's report."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _run_trial(params: dict, specs: dict, grid_spec: GridFile, workdir: str, gate) -> dict:
    """A Tune trial: train one run (if not trained), then wait for its evaluations. A failure
    is recorded in the run's failed.json with its log, for `grid status` and the driver."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .eval_queue import EvaluationQueue

    spec: RunSpec = specs[params["run"]]
    work = Workdir(workdir)
    run = work.run(spec.name)
    run.failure.unlink(missing_ok=True)
    log = run.train_log(0)
    try:
        queue = EvaluationQueue.options(**ON_HEAD).remote(str(run.path), grid_spec.evaluation, gate,
                                                          grid_spec.resources.node_wait_s)
        queue.queue_unmeasured.remote()
        if not is_trained(run, spec):
            res = grid_spec.resources
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={"spec": spec, "run_dir": str(run.path), "queue": queue, "gate": gate},
                scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                             resources_per_worker=res.worker_resources()),
                # Ray's default on GPUs is NCCL alone; the CPU sums need gloo (parallel.group_for)
                torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if res.gpus_per_worker > 0 else "gloo"),
                run_config=RunConfig(name=spec.name, storage_path=str(work.ray.resolve()),
                                     failure_config=FailureConfig(max_failures=grid_spec.max_failures)),
            )
            _fit(trainer, NodeWatch(res.worker_resources(), res.node_wait_s))
            failure = run.failed()
            if failure is not None:  # a deterministic error, not retried (see _train_worker)
                raise UserError(failure["error"])
        gate.training.remote(spec.name)  # trained (now or before): nothing of it to wait for
        log = run.evaluation_log
        ray.get(queue.finish.remote())
    except BaseException as error:
        gate.training.remote(spec.name)  # it holds nothing now: the other runs' evaluations may start
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            traceback.print_exc(file=out)
        run.mark_failed(_error_line(error), log)
        sync_run(run.path)  # its points up to the failure, to read beside the reason
        mark_outcome(run.path, _error_line(error))
        raise
    delivered = sync_until_delivered(run.path)
    mark_outcome(run.path, None)
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


@contextlib.contextmanager
def holding_workdir(workdir: Workdir):
    """Hold the workdir's driver lock while the block runs: one `grid submit` per workdir
    (two would train the same runs into the same directories). Refused in one line naming
    the holder, before anything is written; a workdir the lock created and nothing filled
    (a grid the preflight refused) is removed with it."""
    created = not workdir.path.exists()
    lock = workdir.driver(on_lost=_lost_workdir)
    try:
        lock.acquire(waiting=lambda holder: print(
            f"workdir {workdir.path}: held by {holder.describe()}; watching its heartbeat "
            f"(up to {lock.stale_s:g} s) to see whether it is still there", flush=True))
    except LockHeld as held:
        raise UserError(f"workdir {workdir.path}: in use by {held.holder.describe()}; one grid submit per "
                        f"workdir: wait for it or stop it (if it is gone with its host, delete "
                        f"{workdir.driver_lock}, or resubmit {lock.stale_s:g} s after its heartbeat stopped)") from None
    try:
        yield
    finally:
        lock.release()
        if created and not any(workdir.path.iterdir()):
            workdir.path.rmdir()


def _lost_workdir(holder) -> None:
    """The driver stalled so long that another took its workdir: stop as if interrupted."""
    import _thread

    who = holder.describe() if holder is not None else "nobody (its lock file is gone)"
    print(f"error: the workdir's driver lock is now held by {who}; this grid submit stops", file=sys.stderr,
          flush=True)
    _thread.interrupt_main()


def _data_paths(grid: Grid) -> tuple[list[Path], list[Path]]:
    """What the runs' ranks open wherever they run: directories they write (the data cache a
    corpus is tokenized into) and paths they read (tokenizers, corpora, prepared data: a
    prefix by its directory)."""
    from sparsity_scaling.data.pipeline import cache_root

    written, read = set(), set()
    for spec in grid.runs:
        data = spec.config.data
        prefixes = [data.train_prefix, data.valid_prefix, *(part.prefix for part in data.blend or ())]
        read.update(Path(prefix).parent for prefix in prefixes if prefix)
        read.update(Path(path) for path in (data.tokenizer, data.corpus) if path and Path(path).exists())
        if not (data.train_prefix or data.blend):
            written.add(cache_root(data))
    return sorted(written), sorted(read)


def _seen_by_every_node(grid: Grid, workdir: Workdir, cluster: ClusterFacts, uri: str) -> ClusterFacts:
    """The cluster with the tracking URI its ranks will use and what its nodes do not see: on
    several hosts a task on each node looks for the workdir, the data and the tracking server
    (on one host they are the driver's own)."""
    cluster = dataclasses.replace(cluster, tracking_uri=uri)
    if cluster.host_count < 2:
        return cluster
    written, read = _data_paths(grid)
    return dataclasses.replace(cluster, node_problems=tuple(check_nodes([workdir.path, *written], read, uri)))


def submit(grid: Grid, workdir: Workdir, address: str | None = None, gpu_memory: float | None = None,
           report: bool = True) -> None:
    """Train and evaluate every run of the grid, then write its report into the workdir.
    The preflight refuses a grid the cluster cannot run before anything starts (gpu_memory,
    bytes: each GPU's, where Ray's accelerator type does not tell it). Ctrl-C (SIGINT) stops
    it at once: its runs' trainers and evaluations end with it, the grid's parent MLflow run
    is KILLED, and a resubmit resumes. report=False: no report (a rehearsal's runs are too
    short for the laws)."""
    workdir = Workdir(workdir.path.resolve())
    check_corpora(grid)
    with holding_workdir(workdir):  # first: a second submit is refused before it joins Ray
        _quiet_ray()
        connect_ray(address)
        cluster = ClusterFacts.of_ray(gpu_memory)
        enforce(grid, cluster)  # before anything is written
        _submit(grid, workdir, cluster, report)


def _quiet_ray() -> None:
    """What Ray and Tune print, and how they take Ctrl-C, as a grid's driver wants it."""
    # Ray Train's print patch sends each print of a worker to its logger and, where Ray
    # wraps stdout, to stdout as well: every progress line would reach the driver twice.
    # (Ray passes this variable from the driver to the trainers' workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's old engine prints nothing at verbose 0
    # Tune's own SIGINT handler would end fit() "gracefully" and return the interrupted trials
    # as if they had ended: the driver would go on to the report. Python's KeyboardInterrupt
    # stops it where it is instead.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # A failed run is reported in one line naming its log (which holds the traceback), not
    # by Tune's traceback of the trial.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)


def _submit(grid: Grid, workdir: Workdir, cluster: ClusterFacts, report: bool) -> None:
    with tracking(workdir) as uri:
        check_tracking_uri(uri)
        enforce(grid, _seen_by_every_node(grid, workdir, cluster, uri))
        parent = parent_run(uri, grid)
        set_parent_status(uri, parent, "RUNNING")
        outcome = "FAILED"
        try:
            _drive(grid, workdir, uri, parent, report)
            outcome = "FINISHED"
        except KeyboardInterrupt:
            outcome = "KILLED"
            # the trials' actors (and with them the trainers and evaluations) end with the
            # driver's Ray job: before the lock goes, so a resubmit meets none of them
            ray.shutdown()
            raise
        finally:
            set_parent_status(uri, parent, outcome)


def _drive(grid: Grid, workdir: Workdir, uri: str, parent: str, report: bool) -> None:
    """The grid's runs as Tune trials, then (if `report`) its report; a UserError naming the first failed run."""
    for spec in grid.runs:
        child_run(uri, grid, spec, parent, workdir.run(spec.name))
    print(f"grid {grid.name}: {len(grid.runs)} runs, workdir {workdir.path}, MLflow {uri}", flush=True)
    from .eval_queue import TrainingGate

    gate = TrainingGate.options(**ON_HEAD).remote([s.name for s in grid.runs])
    trial = tune.with_parameters(
        _run_trial, specs={s.name: s for s in grid.runs}, grid_spec=grid.spec, workdir=str(workdir.path),
        gate=gate,
    )
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0, **HEAD}),  # trials run on the head node
        param_space={"run": tune.grid_search([s.name for s in grid.runs])},
        run_config=tune.RunConfig(name=grid.name, storage_path=str(workdir.ray), verbose=0),
    )
    with ProgressPrinter(grid, workdir):  # instead of Tune's periodic status table
        results = tuner.fit()
    failed = [workdir.run(r.config["run"]) for r in results if r.error]
    if report and len(failed) < len(grid.runs):
        write_report(grid, uri, workdir)  # the runs that finished; the failed ones named
    if failed:
        first = failed[0].failed() or {"error": "see its logs", "log": str(failed[0].logs_dir)}
        more = f" ({len(failed) - 1} more runs failed: `grid status`)" if len(failed) > 1 else ""
        finished = len(grid.runs) - len(failed)
        raise UserError(f"grid {grid.name} stopped: run {failed[0].name}: {first['error']} "
                        f"(log: {first['log']}){more}"
                        + (f"; {finished} of {len(grid.runs)} runs finished, see the report" if finished else ""))
