"""Joining a Ray cluster (or starting a local one), shared by `grid submit` and `data
prepare`; where the grid's control runs, what every node must see (the workdir, the
corpora, the tracking server), and noticing a cluster that lost every node a worker needs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import traceback
import uuid
from pathlib import Path

import ray

from sparsity_scaling.errors import SettingError, UserError

from .preflight import NodeProblem


def connect_ray(address: str | None) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start a local instance. Workers' output
    stays in their own logs (a run's in RUN/logs/, Ray's in its session's logs/ directory):
    the driver prints its progress lines and one line per failure, not Ray's worker chatter."""
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if not address or address == "local":
        # A single-machine instance: keep Ray on the loopback interface (Ray's switch for
        # laptop clusters), so the embedded default opens nothing to the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(include_dashboard=False, log_to_driver=False)
        return
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=5).close()
        except (OSError, ValueError):
            raise SettingError("address", address, "no Ray cluster reachable there") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError) as error:
        raise SettingError("address", address, f"cannot join the Ray cluster ({str(error).splitlines()[0]})") from None


# The grid's control (Tune trials, evaluation queues, the training gate, the tasks that
# orchestrate evaluation jobs) holds no CPU and lives on the head node, where the driver
# runs: a lost worker node takes only training workers and evaluation ranks with it, and
# Ray Train and the evaluation tasks restart those elsewhere.
HEAD = {"node:__internal_head__": 0.001}
ON_HEAD = {"num_cpus": 0, "resources": HEAD, "scheduling_strategy": "DEFAULT"}


def this_node() -> tuple[str, str]:
    """(node id, IP) of the node this process runs on."""
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def node_can_hold(need: dict[str, float]) -> bool:
    """Whether any live node has, in all, the resources of one worker (busy or not)."""
    return any(all(node["Resources"].get(key, 0) >= amount for key, amount in need.items() if amount)
               for node in ray.nodes() if node.get("Alive"))


class NodeWatch:
    """Notices when no live node could ever hold a worker of `need`, and for how long: a
    cluster that lost every such node (an autoscaler may still add one) stops the grid
    after `wait_s` rather than waiting forever."""

    def __init__(self, need: dict[str, float], wait_s: float):
        self.need, self.wait_s, self.lost_since = need, wait_s, None

    def check(self, what: str) -> None:
        """Raise UserError once no node could hold `what` (a training worker, a rank of an
        evaluation job) for wait_s seconds."""
        if node_can_hold(self.need):
            self.lost_since = None
            return
        self.lost_since = self.lost_since or time.time()
        if time.time() - self.lost_since >= self.wait_s:
            need = ", ".join(f"{amount:g} {key}" for key, amount in self.need.items() if amount)
            raise UserError(f"no node of the cluster can hold {what} ({need}) for "
                            f"{self.wait_s:g} s (node_wait_s); the checkpoints written are intact, "
                            f"resubmit to resume once the cluster has such nodes")


@contextlib.contextmanager
def output_to(log: Path):
    """This worker's stdout and stderr, and the traceback of an error, appended to `log`
    (a run's own log: the driver shows progress lines, not worker output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            yield
        except BaseException:
            traceback.print_exc()
            raise


# ---------------------------------------------------------------- what every node must see


def cluster_hosts() -> list[str]:
    """The distinct IPs of the cluster's live nodes (several raylets on one host share one)."""
    return sorted({node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")})


MARKER = ".node-check-"  # + a token: the file the driver writes into each shared directory


def fingerprint(path: Path, files: int = 16, head: int = 1 << 16) -> str | None:
    """What identifies a corpus (a file or a directory of files) cheaply: every file's
    relative name and size, and a digest of the first 64 KiB of the first `files` files.
    None if it does not exist."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for i, file in enumerate(found):
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{file.stat().st_size}\0".encode())
        if i < files:
            with open(file, "rb") as data:
                digest.update(data.read(head))
    return digest.hexdigest()


def _look_from_node(shared: dict[str, str], read: dict[str, str | None],
                    tracking_uri: str | None) -> list[tuple[str, str]]:
    """On one node: (subject, why) for each shared directory whose marker does not hold the
    driver's token or that this node cannot write, each read path missing or different
    here, and a tracking server that does not answer from here."""
    from .tracking import server_answers

    problems = []
    for directory, token in shared.items():
        marker = Path(directory) / f"{MARKER}{token}"
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen != token:
            problems.append((directory, "not the directory the driver sees (no marker the driver wrote there: a "
                                        "node-local path of the same name?); it must be on storage every node shares"))
            continue
        probe = Path(directory) / f"{MARKER}{token}-{uuid.uuid4().hex}"
        try:
            probe.write_text(token)
            probe.unlink()
        except OSError as error:
            problems.append((directory, f"not writable from this node ({error.strerror or error})"))
    for path, expected in read.items():
        seen = fingerprint(Path(path))
        if seen is None:
            problems.append((path, "does not exist on this node"))
        elif seen != expected:
            problems.append((path, "differs from the driver's (a node-local copy?); it must be on shared storage"))
    web = tracking_uri and tracking_uri.startswith(("http://", "https://"))
    if web and not server_answers(tracking_uri, timeout=5):
        problems.append((tracking_uri, "no MLflow server answers there from this node"))
    return problems


def check_nodes(shared: list[Path], read: list[Path] = (), tracking_uri: str | None = None,
                timeout: float = 120) -> list[NodeProblem]:
    """What each live node does not see as the driver does, by one task pinned to each node:
    `shared` directories (the workdir: created if missing; the driver writes a unique token
    into each and every node reads it back, so a node-local directory of the same name
    fails), `read` paths (the corpora: each node compares their fingerprint), and the
    tracking server (each node asks it for /health). Empty when every node sees them all.
    A node that does not answer within `timeout` seconds is a problem too."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tokens = {}
    for directory in shared:
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        tokens[str(directory)] = uuid.uuid4().hex
        (directory / f"{MARKER}{tokens[str(directory)]}").write_text(tokens[str(directory)])
    expected = {str(Path(p).resolve()): fingerprint(Path(p).resolve()) for p in read}
    look = ray.remote(num_cpus=0, max_retries=0)(_look_from_node)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        pending = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            tokens, expected, tracking_uri): n for n in nodes}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        problems = []
        for ref in ready:
            node = pending[ref]
            try:
                found = ray.get(ref)
            except ray.exceptions.RayError as error:
                found = [("(the check)", f"failed on this node: {str(error).strip().splitlines()[-1][:200]}")]
            problems += [NodeProblem(node["NodeManagerAddress"], node["NodeID"], subject, why)
                         for subject, why in found]
        for ref in late:
            ray.cancel(ref, force=True)
            node = pending[ref]
            problems.append(NodeProblem(node["NodeManagerAddress"], node["NodeID"], "(the check)",
                                        f"no answer within {timeout:g} s"))
    finally:
        for directory, token in tokens.items():
            (Path(directory) / f"{MARKER}{token}").unlink(missing_ok=True)
    return sorted(problems, key=lambda p: (p.node_ip, p.node_id, p.subject))
