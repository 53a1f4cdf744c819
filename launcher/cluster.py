"""Joining a Ray cluster (or starting a local one), shared by `grid submit` and `data
prepare`; where the grid's control runs, and noticing a cluster that lost every node a
worker needs."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from pathlib import Path

import ray

from sparsity_scaling.errors import SettingError, UserError


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
