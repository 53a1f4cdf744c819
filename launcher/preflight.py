"""The preflight: every reason a cluster cannot run a grid, found before anything starts.

`grid plan` checks a grid against a cluster described by its flags (`ClusterFacts.target`),
`grid submit` against the cluster it joined (`ClusterFacts.of_ray`), and refuses it with one
line per problem, each naming the run, the field, its value and a fix:

- resources: a worker (and an evaluation rank) fits a node, a run's workers the cluster;
- the batch split: dp x train.micro_batch_size divides the batch's sequences (`BatchSplit`,
  the arithmetic `train.loop.Layout` trains with; tp dividing the heads and d_ff is checked
  where every run config is, in `RunConfig`);
- memory: the estimated peak of a training rank (`costs.MemoryEstimate`) fits its GPU;
- evaluation on GPUs: a grid that trains on GPUs evaluates on GPUs too;
- a tracking server every node reaches, and paths every node sees (`NodeProblem`s, found by
  a task on each node: `cluster.check_nodes`).

CPU grids (no GPU per worker) train in host memory beside everything else on the machine:
their memory is shown, not checked.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from sparsity_scaling.costs import DEFAULT_GPU_MEMORY_GB, GB, GPU_MEMORY_GB, BatchSplit
from sparsity_scaling.errors import UserError

from .grid import Grid, RunSpec


@dataclass(frozen=True)
class Problem:
    """One reason a grid cannot run: where (a run, or None for the whole grid), the field and
    its value, what goes wrong and how to fix it."""

    run: str | None
    field: str
    value: Any
    reason: str
    fix: str

    def line(self) -> str:
        where = f"run {self.run}: " if self.run else ""
        value = "" if self.value is None else f" {self.value}"
        return f"{where}{self.field}{value}: {self.reason}; {self.fix}"


@dataclass(frozen=True)
class Node:
    """What one node offers: logical CPUs (None: not known), GPUs, and each GPU's memory in
    bytes (None: no GPUs, or not known)."""

    cpus: float | None
    gpus: float
    gpu_memory: int | None = None

    @classmethod
    def of_ray(cls, resources: dict[str, float], gpu_memory: float | None = None) -> "Node":
        """A node from its Ray resources: each GPU's memory from its accelerator type
        (`costs.GPU_MEMORY_GB`), else `gpu_memory` (bytes), else 80 GB."""
        gpus = resources.get("GPU", 0)
        kind = next((key.partition(":")[2] for key in resources if key.startswith("accelerator_type:")), None)
        known = GPU_MEMORY_GB.get(kind) if kind else None
        memory = known * GB if known else (gpu_memory or DEFAULT_GPU_MEMORY_GB * GB)
        return cls(resources.get("CPU", 0), gpus, int(memory) if gpus else None)


@dataclass(frozen=True)
class NodeProblem:
    """Something a node of the cluster does not see as the driver does, found by a task on
    that node (`cluster.check_nodes`): a shared directory, a corpus, the tracking server."""

    node_ip: str
    node_id: str
    subject: str  # the path or the tracking URI
    why: str

    def problem(self) -> Problem:
        return Problem(None, f"node {self.node_ip} ({self.node_id[:12]})", self.subject, self.why,
                       "put the workdir and corpora on storage every node mounts at the same path, and serve "
                       "MLflow where every node reaches it")


@dataclass(frozen=True)
class ClusterFacts:
    """The cluster a grid is checked against: its nodes, whether it is the one joined (or one
    described by `grid plan`'s flags), the tracking URI its ranks will use, and the paths some
    nodes do not see."""

    nodes: tuple[Node, ...]
    connected: bool
    hosts: int | None = None  # distinct hosts (raylets of one machine share its IP); None: one per node
    tracking_uri: str | None = None
    node_problems: tuple[NodeProblem, ...] = ()

    @classmethod
    def target(cls, nodes: int, gpus_per_node: int, gpu_memory: float, cpus_per_node: float | None = None) -> "ClusterFacts":
        """A cluster of `nodes` alike nodes (`grid plan`'s flags; gpu_memory in bytes)."""
        node = Node(cpus_per_node, gpus_per_node, int(gpu_memory) if gpus_per_node else None)
        return cls((node,) * nodes, connected=False)

    @classmethod
    def of_ray(cls, gpu_memory: float | None = None) -> "ClusterFacts":
        """The live nodes of the Ray cluster joined (`Node.of_ray`)."""
        import ray

        alive = [node for node in ray.nodes() if node.get("Alive")]
        return cls(tuple(Node.of_ray(node["Resources"], gpu_memory) for node in alive), connected=True,
                   hosts=len({node["NodeManagerAddress"] for node in alive}))

    @property
    def host_count(self) -> int:
        return len(self.nodes) if self.hosts is None else self.hosts

    @property
    def has_gpus(self) -> bool:
        return any(node.gpus for node in self.nodes)

    @property
    def gpu_memory(self) -> int | None:
        """The smallest known GPU memory of the nodes with GPUs (a rank may land on any)."""
        known = [node.gpu_memory for node in self.nodes if node.gpus and node.gpu_memory]
        return min(known) if known else None

    def describe(self) -> str:
        count = f"{len(self.nodes)} node" + ("s" if len(self.nodes) != 1 else "")
        gpus = sorted({node.gpus for node in self.nodes})
        memory = f" of {self.gpu_memory / GB:g} GB" if self.gpu_memory else ""
        shape = f"{'/'.join(f'{g:g}' for g in gpus)} GPUs{memory} per node"
        return f"{'the connected cluster' if self.connected else 'the target cluster'} ({count}, {shape})"



def _resources(grid: Grid, cluster: ClusterFacts) -> list[Problem]:
    """A worker of each run and a rank of each evaluation job fit some node; a run's workers
    and a job's ranks fit the cluster."""
    res, evaluation = grid.spec.resources, grid.spec.evaluation
    problems = []

    def offered(key: str) -> list[float] | None:
        """What each node has of `key` (None where some node's amount is not known)."""
        values = [node.cpus if key == "CPU" else node.gpus for node in cluster.nodes]
        return None if any(v is None for v in values) else values

    worker = {key: need for key, need in res.worker_resources().items() if offered(key) is not None}
    if worker and not any(all(offered(key)[i] >= need for key, need in worker.items()) for i in range(len(cluster.nodes))):
        problems.append(Problem(None, "resources", None, f"no node has {res.cpus_per_worker:g} CPUs and "
                                f"{res.gpus_per_worker:g} GPUs for one worker",
                                "lower resources.cpus_per_worker or gpus_per_worker, or add such nodes"))
    for key, need in worker.items():
        values = offered(key)
        if values is not None and need * res.workers > sum(values):
            problems.append(Problem(None, "resources", None, f"a run needs {need * res.workers:g} {key} "
                                    f"({res.workers} workers), the cluster has {sum(values):g}",
                                    "lower resources.dp or tp, or add nodes"))
    for key, need in evaluation.rank_resources().items():
        values = offered(key)
        if values is None:
            continue
        if not any(v >= need for v in values):
            problems.append(Problem(None, f"evaluation.{key.lower()}s", f"{need:g}",
                                    f"no node has that many {key}s (the most on one node: {max(values, default=0):g})",
                                    f"lower it, or add a node with {need:g} {key}s"))
        elif need * evaluation.tp > sum(values):
            problems.append(Problem(None, "evaluation.tp", evaluation.tp, f"a job needs {need * evaluation.tp:g} "
                                    f"{key}s, the cluster has {sum(values):g}", "lower evaluation.tp"))
    return problems


def _batch_split(run: RunSpec, dp: int) -> Problem | None:
    split = BatchSplit.of(run.config, dp)
    if split.divides:
        return None
    batch = f"the {split.sequences} sequences of a batch (train.batch_tokens {split.batch_tokens} / seq {split.seq_len})"
    sizes = split.micro_sizes()
    if not sizes:
        dps = [d for d in range(1, split.sequences + 1) if split.sequences % d == 0 and d != dp]
        near = sorted(dps, key=lambda d: abs(d - dp))[:2]
        return Problem(run.name, "resources.dp", dp, f"does not divide {batch}",
                       f"use dp {' or '.join(map(str, sorted(near)))}, or a train.batch_tokens of a multiple of "
                       f"{dp} sequences")
    below = [m for m in sizes if m < split.micro][-1:]
    above = [m for m in sizes if m > split.micro][:1]
    return Problem(run.name, "train.micro_batch_size", split.micro,
                   f"dp {dp} x micro {split.micro} = {dp * split.micro} does not divide {batch}",
                   f"use micro_batch_size {' or '.join(map(str, below + above))}")


def _ranks_per_gpu(gpus_per_worker: float) -> int:
    """Training ranks sharing one GPU (Ray packs 1 / gpus_per_worker of them on it)."""
    return max(1, math.floor(1 / gpus_per_worker + 1e-9)) if gpus_per_worker < 1 else 1


def _memory(grid: Grid, run: RunSpec, limit: int) -> Problem | None:
    """The run's estimated peak against one GPU; a fix that fits, if one does."""
    share = _ranks_per_gpu(grid.spec.resources.gpus_per_worker)
    estimate = grid.memory(run)
    if estimate.total * share <= limit:
        return None
    train, dp = run.config.train, grid.spec.resources.dp
    sizes = BatchSplit.of(run.config, dp).micro_sizes() or [train.micro_batch_size]
    options = [(f"micro_batch_size {m}", {"micro_batch_size": m}) for m in reversed(sizes) if m < train.micro_batch_size]
    if not train.activation_checkpointing:
        options.append(("train.activation_checkpointing: true", {"activation_checkpointing": True}))
    if train.zero_stage < 1:
        options.append(("train.zero_stage: 1", {"zero_stage": 1}))
    fits = []
    for text, change in options:
        if "micro_batch_size" in change and any(fit.startswith("micro_batch_size") for fit in fits):
            continue  # the largest micro-batch that fits is the one to name
        changed = run.config.model_copy(update={"train": train.model_copy(update=change)})
        total = grid.memory(RunSpec(run.name, changed, run.base, run.overrides)).total * share
        if total <= limit:
            fits.append(f"{text} ({total / GB:.1f} GB)")
    fix = ("use " + " or ".join(fits[:2])) if fits else \
        "no smaller micro-batch, activation checkpointing or ZeRO 1 alone fits: raise resources.tp, or use larger GPUs"
    shared = f" x {share} ranks per GPU" if share > 1 else ""
    return Problem(run.name, "train.micro_batch_size", train.micro_batch_size,
                   f"estimated peak {estimate.total / GB:.1f} GB per rank{shared} ({estimate.describe()}) exceeds "
                   f"the {limit / GB:g} GB of a GPU", fix)


def is_loopback_uri(uri: str) -> bool:
    """Whether an http(s) URI names the loopback interface of whichever host opens it (a
    server there is one the other nodes of a cluster cannot reach)."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tracking_problem(uri: str, hosts: int) -> Problem | None:
    """Why the training ranks of a cluster of `hosts` hosts could not deliver to `uri`: with
    more than one host, a loopback server reaches only the processes of its own host, and a
    store file (sqlite:, a path) would be opened by every node itself."""
    if hosts < 2:
        return None
    fix = "serve MLflow on the head's cluster address, or set MLFLOW_TRACKING_URI to a server every node reaches"
    if is_loopback_uri(uri):
        return Problem(None, "tracking URI", uri, f"a loopback address, which the other {hosts - 1} hosts of the "
                       "cluster cannot reach", fix)
    if urlparse(uri).scheme not in ("http", "https"):
        return Problem(None, "tracking URI", uri, f"a store every node would open itself, on {hosts} hosts "
                       "(SQLite's locking is not safe on shared storage)", fix)
    return None


def check_grid(grid: Grid, cluster: ClusterFacts) -> list[Problem]:
    """Every problem that keeps `cluster` from running `grid`, grid-wide ones first."""
    problems = _resources(grid, cluster)
    res, evaluation = grid.spec.resources, grid.spec.evaluation
    on_gpus = res.gpus_per_worker > 0
    if on_gpus and cluster.has_gpus and evaluation.gpus == 0:
        problems.append(Problem(None, "evaluation.gpus", 0, "a grid that trains on GPUs would evaluate its "
                                "checkpoints on CPUs (hours per pass at these sizes)",
                                "set evaluation.gpus: 1 (a fraction shares a GPU between jobs)"))
    tracking = cluster.tracking_uri and tracking_problem(cluster.tracking_uri, cluster.host_count)
    if tracking:
        problems.append(tracking)
    problems += [node.problem() for node in cluster.node_problems]
    limit = cluster.gpu_memory
    for run in grid.runs:
        problem = _batch_split(run, res.dp)
        if problem:
            problems.append(problem)
        if on_gpus and limit:
            problem = _memory(grid, run, limit)
            if problem:
                problems.append(problem)
    return problems


def refusal(grid: Grid, cluster: ClusterFacts, problems: list[Problem]) -> UserError:
    """The error that refuses a grid: a line naming the grid and cluster, then one per problem."""
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    return UserError("\n".join([f"{grid.path}: {cluster.describe()} cannot run this grid ({count}):",
                                *(f"  {problem.line()}" for problem in problems)]))


def enforce(grid: Grid, cluster: ClusterFacts) -> None:
    """Refuse, before anything starts, a grid that `cluster` cannot run."""
    problems = check_grid(grid, cluster)
    if problems:
        raise refusal(grid, cluster, problems)
