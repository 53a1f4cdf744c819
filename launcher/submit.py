"""`grid submit`: every run of a grid as a Ray Tune trial that fits a Ray Train TorchTrainer.

Ray schedules the runs (as many at once as the cluster holds); each run's workers form its
tensor x data parallel group and run `sparsity_scaling.train`. A run directory is the
run's identity: resubmitting skips what is finished, resumes what is not from its newest
complete checkpoint, and logs into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import ray
from ray import tune

from sparsity_scaling.config import checkpoint_tokens
from sparsity_scaling.errors import UserError
from sparsity_scaling.train.checkpoint import list_checkpoints

from .grid import Grid, RunSpec, load_grid
from .report import write_report
from .tracking import check_tracking_uri, child_run, parent_run, sync_run, sync_until_delivered, tracking


def run_dir_of(workdir: Path, spec: RunSpec) -> Path:
    return workdir / "runs" / spec.name


def is_trained(run_dir: Path, spec: RunSpec) -> bool:
    done = list_checkpoints(run_dir)
    return bool(done) and done[-1].tokens == checkpoint_tokens(spec.config)[-1]


def connect_ray(address: str | None) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start a local instance."""
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if not address or address == "local":
        # A single-machine instance: keep Ray on the loopback interface (Ray's switch for
        # laptop clusters), so the embedded default opens nothing to the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": _without_state_api_warnings})
        return
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=5).close()
        except (OSError, ValueError):
            raise UserError(f"--address {address}: no Ray cluster reachable there") from None
    try:
        ray.init(address=address, include_dashboard=False)
    except (ConnectionError, RuntimeError) as error:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({str(error).splitlines()[0]})") from None


def _without_state_api_warnings() -> None:
    """In every worker of the local instance: Ray Train's placement-group cleaner asks the
    State API (a dashboard service the embedded default does not start) every few seconds
    and warns each time it cannot; those warnings would bury the training progress."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


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


def _train_worker(config: dict) -> None:
    """One rank of one run, inside a Ray Train worker (the process group already exists)."""
    import time

    import torch.distributed as dist

    from sparsity_scaling.data import prepare_data
    from sparsity_scaling.parallel import init_parallel
    from sparsity_scaling.train.loop import train

    spec: RunSpec = config["spec"]
    init_parallel(spec.config.parallel.tp)
    box = [prepare_data(spec.config.data) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    queue = config["queue"]
    last_sync = [0.0]

    def on_event(kind: str, path: Path) -> None:
        if kind == "checkpoint":
            queue.checkpoint_ready.remote(str(path))
        if kind == "checkpoint" or time.time() - last_sync[0] > 30:
            last_sync[0] = time.time()
            sync_run(config["run_dir"])

    train(spec.config, config["run_dir"], box[0], on_event)


def _run_trial(params: dict, specs: dict, grid_spec, workdir: str) -> dict:
    """A Tune trial: train one run (if not trained), then wait for its evaluations."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .evaluation import OUTSIDE_TRIAL, EvaluationQueue

    spec: RunSpec = specs[params["run"]]
    run_dir = run_dir_of(Path(workdir), spec)
    evaluation = grid_spec.evaluation.model_dump()
    queue = EvaluationQueue.options(**OUTSIDE_TRIAL).remote(str(run_dir), evaluation)
    for ck in list_checkpoints(run_dir):
        queue.checkpoint_ready.remote(str(ck.path))
    if not is_trained(run_dir, spec):
        res = grid_spec.resources
        worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"spec": spec, "run_dir": str(run_dir), "queue": queue},
            scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                         resources_per_worker=worker),
            run_config=RunConfig(name=spec.name, storage_path=str(Path(workdir).resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=grid_spec.max_failures)),
        )
        trainer.fit()
    ray.get(queue.finish.remote())
    delivered = sync_until_delivered(run_dir)
    summary = json.loads((run_dir / "sparsity.json").read_text())["checkpoints"][-1]
    return {"activation_ratio": summary["activation_ratio"], "tokens": summary["tokens"], "mlflow_delivered": delivered}


def submit(grid_path: str, address: str | None = None, workdir: str | None = None) -> Path:
    """Train and evaluate every run of the grid, then write its report into the workdir."""
    grid = load_grid(grid_path)
    workdir_path = Path(workdir or Path("runs") / grid.name).resolve()
    # Ray Train's print patch sends each print of a worker to its logger and, where Ray
    # wraps stdout, to stdout as well: every progress line would reach the driver twice.
    # (Ray passes this variable from the driver to the trainers' workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    with tracking(workdir_path) as uri:
        check_tracking_uri(uri)
        connect_ray(address)
        check_resources(grid)
        parent = parent_run(uri, grid)
        for spec in grid.runs:
            child_run(uri, grid, spec, parent, run_dir_of(workdir_path, spec))
        print(f"grid {grid.name}: {len(grid.runs)} runs, workdir {workdir_path}, MLflow {uri}", flush=True)
        trial = tune.with_parameters(
            _run_trial, specs={s.name: s for s in grid.runs}, grid_spec=grid.spec, workdir=str(workdir_path)
        )
        tuner = tune.Tuner(
            tune.with_resources(trial, {"CPU": 0.01}),
            param_space={"run": tune.grid_search([s.name for s in grid.runs])},
            run_config=tune.RunConfig(name=grid.name, storage_path=str(workdir_path / "ray"), verbose=1),
        )
        results = tuner.fit()
        failed = [r for r in results if r.error]
        if failed:
            raise UserError(f"{len(failed)} of {len(grid.runs)} runs failed: {failed[0].error}".splitlines()[0])
        write_report(grid, uri, workdir_path)
    return workdir_path
