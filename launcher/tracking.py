"""MLflow: the local tracking server, one parent run per grid, one child run per training
run, and the delivery of a run's points from its files.

A run's files are the source of truth (its metrics, evaluations and results, see `RunDir`);
MLflow mirrors them. `sync_run` delivers whatever is new since its cursor, under a file lock, so
any process may call it at any time: a point is logged exactly once, and points produced
while the server is unreachable are delivered by a later call.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from sparsity_scaling.errors import SettingError, UserError
from sparsity_scaling.files import write_json_atomic
from sparsity_scaling.rundir import RunDir

from .workdir import Workdir


def server_answers(uri: str, timeout: float = 2) -> bool:
    """Whether an MLflow server answers its /health at `uri` (from this process's host)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def server_host() -> str | None:
    """The address the grid's MLflow server binds, where the cluster's nodes reach it: this
    node's IP as Ray knows it, the address Ray's own services here listen on, on a cluster of
    several hosts (never 0.0.0.0); loopback on a cluster of one host (the local instance
    `cluster.connect_ray` starts, or one `ray start` made), which nothing else need reach.
    None when this process is not on Ray."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    here = ray.util.get_node_ip_address()
    hosts = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    return LOOPBACK if hosts <= {here} else here


def start_local_server(workdir: Workdir, host: str | None = None, timeout: float = 300) -> str:
    """Start (or reuse) the workdir's MLflow server, backed by SQLite in the workdir, bound
    to `host`: the address the cluster's nodes reach it at (`server_host`; the
    head's cluster address, loopback on a local instance). host=None: any running server
    of the workdir will do (a command on this machine), else a new one on loopback.

    A restarted server takes its old port again when it is free, so the runs' recorded
    tracking URI stays valid and postponed points reach it.
    """
    workdir = Workdir(workdir.path.resolve())
    workdir.mlflow.mkdir(parents=True, exist_ok=True)
    record = workdir.mlflow_server
    port = 0
    if record.is_file():
        uri = json.loads(record.read_text())["uri"]
        old_host, old_port = _host_port(uri)
        if host is None or old_host == host:
            if server_answers(uri):
                return uri
            port = old_port
        elif server_answers(uri):  # serving its own command (`grid status`, a report) where the nodes cannot reach it
            raise UserError(f"the MLflow server of {workdir.path} runs at {uri} (pid "
                            f"{json.loads(record.read_text())['pid']}), which the cluster's nodes cannot reach "
                            f"at {host}; let the command that started it finish, then submit again")
    host = host or LOOPBACK
    if not (port and _port_free(host, port)):
        port = _free_port(host)
    uri = f"http://{_url_host(host)}:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(workdir.mlflow_log, "ab")
    # MLflow answers 403 to a Host header outside loopback and the private ranges unless told:
    # the nodes address it by the host it binds, which may be any address of the head.
    allowed = ["localhost:*", "127.0.0.1:*", "[[]::1]:*",
               *(a for a in os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS", "").split(",") if a.strip())]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner
           "MLFLOW_SERVER_ALLOWED_HOSTS": ",".join([*allowed, f"{_url_host(host)}:{port}"])}
    process = subprocess.Popen(
        [str(mlflow), "server", "--host", host, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir.mlflow_db}",
         "--artifacts-destination", str(workdir.mlflow_artifacts)],
        stdout=log, stderr=log, start_new_session=True, env=env,
    )
    deadline = time.time() + timeout
    while not server_answers(uri):
        if process.poll() is not None or time.time() > deadline:  # a loaded head can take a minute or more
            why = "exited" if process.poll() is not None else f"did not answer within {timeout:g} s"
            if process.poll() is None:  # not left to answer later on a port no record names
                import signal

                os.killpg(process.pid, signal.SIGKILL)
            raise UserError(f"the local MLflow server {why}; see {workdir.mlflow_log}")
        time.sleep(0.5)
    write_json_atomic(record, {"uri": uri, "pid": process.pid})
    return uri


LOOPBACK = "127.0.0.1"


def _host_port(uri: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(uri)
    return parts.hostname, parts.port


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address


def _reachable(uri: str) -> bool:
    """A quick look before MLflow's own client, which retries for minutes when a server is away."""
    return not uri.startswith(("http://", "https://")) or server_answers(uri)


def stop_local_server(workdir: Workdir) -> None:
    """Stop the workdir's MLflow server (its whole process group) if it runs."""
    import signal

    record = workdir.mlflow_server.resolve()
    if not record.is_file():
        return
    server = json.loads(record.read_text())
    host, port = _host_port(server["uri"])
    # Wait until it has exited and its port is free: a server still answering while it shuts
    # down would be taken for a running one by the next command, and a new one needs the port.
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server["pid"], sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if _exited(server["pid"]) and _port_free(host, port):
                return
            time.sleep(0.1)


def _exited(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # this process started it: reaped now
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def tracking(workdir: Workdir, uri: str | None = None, create: bool = True):
    """The tracking URI for a command: `uri`, else $MLFLOW_TRACKING_URI, else the workdir's
    local server, started for the command and stopped after it if it was not already
    running: in a process on Ray (`grid submit`), bound where the cluster's nodes reach
    it (`server_host`). With create=False, a workdir without a local store is
    refused (nothing to read there)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        yield uri
        return
    if not create and not workdir.has_mlflow_store():
        raise SettingError("workdir", workdir.path, "no MLflow store there (give a tracking URI, or submit the grid first)")
    record = workdir.mlflow_server
    was_running = record.is_file() and server_answers(json.loads(record.read_text())["uri"])
    uri = start_local_server(workdir, server_host())  # on Ray: where the nodes deliver to it
    try:
        yield uri
    finally:
        if not was_running:
            stop_local_server(workdir)


def check_tracking_uri(uri: str) -> None:
    """Fail early, in one line, if MLflow cannot be reached at `uri`."""
    from mlflow.tracking import MlflowClient

    if not _reachable(uri):
        raise UserError(f"MLflow tracking URI {uri}: cannot be opened (no server answers there)")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # MLflow raises many types for a bad URI
        message = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"MLflow tracking URI {uri}: cannot be opened ({message})") from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _find_run(mlflow, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = mlflow.search_runs([experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None


def parent_run(uri: str, grid) -> str:
    """The grid's parent run (found by its tags, created once)."""
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(grid.name)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(grid.name)
    tags = {"sparsity_scaling.grid": grid.name, "sparsity_scaling.role": "parent"}
    run_id = _find_run(mlflow, experiment_id, tags)
    if run_id is None:
        run_id = mlflow.create_run(experiment_id, run_name=grid.name, tags=tags).info.run_id
        mlflow.log_text(run_id, Path(grid.path).read_text(), "grid.yaml")
    return run_id


def set_parent_status(uri: str, run_id: str, status: str) -> None:
    """The grid's parent run follows its driver: RUNNING while a `grid submit` drives it, then
    FINISHED (every run finished), FAILED (some failed) or KILLED (interrupted). Best effort:
    an unreachable server only costs the status."""
    try:
        if not _reachable(uri):
            raise ConnectionError(f"no MLflow server answers at {uri}")
        if status == "RUNNING":
            client(uri).update_run(run_id, status="RUNNING")
        else:
            client(uri).set_terminated(run_id, status)
    except Exception as problem:  # MLflow raises many types when its server is away
        print(f"MLflow status of the grid's parent run not set: {str(problem).splitlines()[0][:160]}",
              file=sys.stderr, flush=True)


def child_run(uri: str, grid, spec, parent_id: str, run: RunDir) -> str:
    """The run's MLflow run: the id kept in its directory, so a resumed run logs into it
    (at `uri`, when the run is found there)."""
    id_file = run.mlflow_run
    if id_file.is_file():
        identity = json.loads(id_file.read_text())
        if identity["tracking_uri"] != uri and _holds_run(uri, identity["run_id"]):
            # the same store, served at another address now (the grid's server on the head's
            # cluster address, where an earlier submit had it on loopback): deliver there
            write_json_atomic(id_file, {**identity, "tracking_uri": uri})
        return identity["run_id"]
    mlflow = client(uri)
    experiment_id = mlflow.get_experiment_by_name(grid.name).experiment_id
    tags = {"sparsity_scaling.grid": grid.name, "sparsity_scaling.run": spec.name}
    run_id = _find_run(mlflow, experiment_id, tags)
    if run_id is None:
        all_tags = {**tags, **spec.tags(grid.name), "mlflow.parentRunId": parent_id}
        run_id = mlflow.create_run(experiment_id, run_name=spec.name, tags=all_tags).info.run_id
        from mlflow.entities import Param

        flat = _flatten(spec.config.model_dump(mode="json"))
        mlflow.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])
        mlflow.log_text(run_id, spec.config.to_yaml(), RunDir.CONFIG)
    run.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(id_file, {"run_id": run_id, "tracking_uri": uri})
    return run_id


def _holds_run(uri: str, run_id: str) -> bool:
    try:
        client(uri).get_run(run_id)
    except Exception:  # MLflow raises several types for an unknown run
        return False
    return True


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------- delivery


@contextmanager
def _locked(run: RunDir, wait: bool):
    handle = open(run.mlflow_lock, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# MLflow metric <- field of a training point in metrics.jsonl
TRAIN_METRICS = {"train_loss": "loss", "lr": "lr", "tokens_per_s": "tokens_per_s", "grad_norm": "grad_norm",
                 "loss_spikes": "loss_spikes", "skipped_steps": "skipped_steps"}


def _pending_points(run: RunDir, cursor: dict) -> tuple[list[tuple[str, float, int]], dict]:
    """(key, value, step) of every point newer than the cursor, and the advanced cursor."""
    points, new = [], dict(cursor)
    for point in run.metric_points():
        kind, tokens = point["kind"], point["tokens"]
        if tokens <= cursor.get(kind, -1):
            continue  # delivered before (a resumed run reproduces it exactly)
        if kind == "train":
            points += [(key, point.get(field), tokens) for key, field in TRAIN_METRICS.items()]
        else:
            points.append(("val_loss", point["loss"], tokens))
        new[kind] = max(new.get(kind, -1), tokens)
    # checkpoints' evaluations finish in any order: the cursor lists each one delivered
    delivered = set(cursor.get("checkpoint_evals", []))
    for result in run.evaluations():
        tokens = result["train_tokens"]
        if tokens in delivered:
            continue
        points += [("activation_ratio_checkpoint", result["activation_ratio"], tokens),
                   ("cett_checkpoint", result["cett"], tokens),
                   ("ppl_ratio_checkpoint", result["ppl_ratio"], tokens)]
        if result.get("converged") is not None:  # 1: the PPL-p% search met its tolerance, 0: it ran out of steps
            points.append(("converged_checkpoint", float(result["converged"]), tokens))
        delivered.add(tokens)
    new["checkpoint_evals"] = sorted(delivered)
    points = [p for p in points if p[1] is not None]  # a skipped step's loss: null in the file, no point
    record = None if cursor.get("stabilised") else run.sparsity_record()
    if record is not None:
        for point in record["checkpoints"]:
            tokens = point["tokens"]
            points += [("activation_ratio", point["activation_ratio"], tokens), ("cett", record["cett"], tokens),
                       ("ppl_ratio", point["ppl_ratio"], tokens)]
            if record.get("converged") is not None:  # the stabilising search's, as for cett
                points.append(("converged", float(record["converged"]), tokens))
            points += [(f"layer_activation_ratio/{i}", r, tokens)
                       for i, r in enumerate(point["layer_activation_ratios"])]
        new["stabilised"] = True
    # the nodes that trained the run (more than one after a lost node): the "nodes" tag
    new["nodes"] = [f"{n['ip']}/{n['node_id'][:12]}" for n in run.nodes()]
    # each result file once it is complete; a rewritten file is not sent again
    new["artifacts"] = sorted(set(cursor.get("artifacts", [])) | {f.name for f in run.results if f.is_file()})
    return points, new


def sync_run(run_dir: str | Path, wait: bool = False) -> bool:
    """Deliver the run's new points to its MLflow run. False if the server is unreachable
    (nothing is lost: the cursor only moves after a successful delivery).

    A delivery cut short after the server took the points but before the cursor moved
    (a killed process) is marked in flight; the next call skips the points MLflow already
    holds, so no point is logged twice.
    """
    from mlflow.entities import Metric

    run = RunDir(run_dir)
    if not run.mlflow_run.is_file():
        return False
    identity = json.loads(run.mlflow_run.read_text())
    cursor_file = run.mlflow_cursor
    with _locked(run, wait) as acquired:
        if not acquired:
            return True  # another process is delivering right now
        state = json.loads(cursor_file.read_text()) if cursor_file.is_file() else {"delivered": {}}
        cursor = state["delivered"]
        points, new = _pending_points(run, cursor)
        if not points and new == cursor:
            return True
        try:
            if not _reachable(identity["tracking_uri"]):
                raise ConnectionError(f"no MLflow server answers at {identity['tracking_uri']}")
            mlflow = client(identity["tracking_uri"])
            if state.get("in_flight"):
                held = {(key, m.step) for key in {p[0] for p in points}
                        for m in mlflow.get_metric_history(identity["run_id"], key)}
                points = [p for p in points if (p[0], int(p[2])) not in held]
            write_json_atomic(cursor_file, {"delivered": cursor, "in_flight": True})
            now = int(time.time() * 1000)
            metrics = [Metric(key, float(value), now, int(step)) for key, value, step in points]
            for i in range(0, len(metrics), 900):
                mlflow.log_batch(identity["run_id"], metrics=metrics[i : i + 900])
            if new["nodes"] != cursor.get("nodes"):
                mlflow.set_tag(identity["run_id"], "nodes", ", ".join(new["nodes"]))
            for artifact in sorted(set(new["artifacts"]) - set(cursor.get("artifacts", []))):
                mlflow.log_artifact(identity["run_id"], str(run.path / artifact))
        except Exception as error:  # the server is down or unreachable: try again later
            print(f"MLflow delivery for {run.name} postponed: {str(error).splitlines()[0][:160]}",
                  file=sys.stderr, flush=True)
            return False
        new["from"] = sorted(set(cursor.get("from", [])) | {_this_host()})
        write_json_atomic(cursor_file, {"delivered": new, "in_flight": False})
        return True


def _this_host() -> str:
    """The address of the host this process delivers from: its Ray node's IP, else its name."""
    return server_host() or socket.gethostname()


def delivered_from(run: RunDir) -> list[str]:
    """The hosts whose processes have delivered the run's points to MLflow (a training rank's
    node among them once it delivered itself)."""
    if not run.mlflow_cursor.is_file():
        return []
    return json.loads(run.mlflow_cursor.read_text())["delivered"].get("from", [])


def mark_outcome(run_dir: str | Path, error: str | None) -> None:
    """The run's MLflow status: FAILED with its reason (tag `failure`), or FINISHED, which
    also clears the reason of an earlier failed attempt. Best effort: an unreachable server
    only costs the status."""
    run = RunDir(run_dir)
    if not run.mlflow_run.is_file():
        return
    identity = json.loads(run.mlflow_run.read_text())
    try:
        if not _reachable(identity["tracking_uri"]):
            raise ConnectionError(f"no MLflow server answers at {identity['tracking_uri']}")
        mlflow = client(identity["tracking_uri"])
        if error is not None:
            mlflow.set_tag(identity["run_id"], "failure", error[:5000])
        elif "failure" in mlflow.get_run(identity["run_id"]).data.tags:
            mlflow.delete_tag(identity["run_id"], "failure")
        mlflow.set_terminated(identity["run_id"], "FAILED" if error is not None else "FINISHED")
    except Exception as problem:  # MLflow raises many types when its server is away
        print(f"MLflow status of {run.name} not set: {str(problem).splitlines()[0][:160]}", file=sys.stderr, flush=True)


def sync_until_delivered(run_dir: str | Path, timeout: float = 600) -> bool:
    """At the end of a run: keep trying while the server is away, up to `timeout` seconds."""
    deadline = time.time() + timeout
    delay = 1.0
    while not sync_run(run_dir, wait=True):
        if time.time() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 30)
    return True


# ---------------------------------------------------------------- results of other commands


def run_target(run: str, uri: str | None) -> tuple[str, str]:
    """(tracking URI, run id) of `run`: a grid's run directory (the run it recorded, at
    `uri` or the URI it recorded) or a run id at `uri`; checked to exist."""
    path = RunDir(run)
    if path.path.is_dir():
        if not path.mlflow_run.is_file():
            raise SettingError("mlflow_run", run, f"a directory without {path.mlflow_run.name} (not a grid's run directory)")
        identity = json.loads(path.mlflow_run.read_text())
        run_id, uri = identity["run_id"], uri or identity.get("tracking_uri")
    else:
        run_id = run
    if not uri:
        raise SettingError("tracking_uri", None, f"needed for MLflow run {run_id} (or set MLFLOW_TRACKING_URI)")
    check_tracking_uri(uri)
    try:
        client(uri).get_run(run_id)
    except Exception as error:  # MLflow raises several types for an unknown run
        raise SettingError("mlflow_run", run_id, f"no such run at {uri} ({str(error).splitlines()[0][:120]})") from None
    return uri, run_id


class ArtifactLogger:
    """Logs result files (under `folder`) and metrics to one MLflow run: the publisher of
    `analyze --mlflow-run`. Picklable, so spawned ranks can call it."""

    def __init__(self, uri: str, run_id: str, folder: str = "analysis"):
        self.uri, self.run_id, self.folder = uri, run_id, folder

    def __call__(self, paths, metrics) -> None:
        from mlflow.entities import Metric

        mlflow = client(self.uri)
        for path in paths:
            mlflow.log_artifact(self.run_id, str(path), artifact_path=self.folder)
        if metrics:
            now = int(time.time() * 1000)
            mlflow.log_batch(self.run_id, metrics=[Metric(key, float(value), now, int(step))
                                                   for key, value, step in metrics])
        print(f"logged to MLflow run {self.run_id} at {self.uri}")
