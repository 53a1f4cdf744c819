"""The grid on a simulated multi-node cluster (`ray.cluster_utils.Cluster`: a head node and
worker nodes, each its own raylet with its own logical CPUs, all on this machine and its
loopback address): a cluster that loses every node stops the grid with one line. The
helpers here also drive test_hosts.py, where a node lost mid-run, with its training workers
or an evaluation job, is survived on a cluster of distinct hosts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path


from helpers import GRID, REPO, trajectory
from sparsity_scaling.rundir import RunDir


def _cluster(workers: int):
    """A head that holds no CPU (the grid's control lives there) and `workers` one-CPU nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def _grid(tmp_path: Path, name: str, node_wait_s: float = 600, tokens: int = 0) -> Path:
    """The cpu_test grid's relu run (so it equals the shared grid's), renamed, without the
    Pareto curves; one CPU per worker, so a one-CPU node holds one training worker or one
    evaluation job. `tokens`: a shorter run."""
    grid = tmp_path / f"{name}.yaml"
    text = GRID.read_text().replace("name: cpu_test", f"name: {name}").replace(
        "../models/micro.yaml", str(REPO / "configs/models/micro.yaml")).replace("[relu, silu]", "[relu]")
    text = re.sub(r"(?m)^resources: .*$", "resources: {tp: 1, dp: 1, cpus_per_worker: 1, "
                  f"node_wait_s: {node_wait_s}}}", text)
    text = text.replace("calibration_tokens: 1024}", "calibration_tokens: 1024, pareto: false}")
    if tokens:
        text = text.replace("train.tokens: 16384", f"train.tokens: {tokens}")
    grid.write_text(text)
    return grid


def submit_argv(grid: Path, address: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "sparsity_scaling.cli", "grid", "submit", str(grid), "--address", address,
            "--workdir", str(workdir)]


def _submit(grid: Path, address: str, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(submit_argv(grid, address, workdir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _remove(cluster, nodes: list, node_id: str) -> None:
    (node,) = [n for n in nodes if n.node_id == node_id]
    cluster.remove_node(node)
    nodes.remove(node)


def lose_training_then_evaluation(process: subprocess.Popen, relu: RunDir, remove) -> tuple:
    """While the grid runs: once relu has two checkpoints, lose the node of its training;
    later, a node running one of its evaluation jobs (`remove(record)`, a record naming the
    node's node_id and ip). (lost training node id, lost job's record, stdout, stderr)."""
    lost_training = lost_evaluation = None
    deadline = time.time() + 900
    while process.poll() is None and time.time() < deadline and lost_evaluation is None:
        if lost_training is None and len(relu.checkpoints()) >= 2 and relu.nodes():
            lost_training = relu.nodes()[0]["node_id"]
            remove(relu.nodes()[0])
        elif lost_training is not None:
            trained_on = {n["node_id"] for n in relu.nodes()}
            for job in relu.running_jobs():
                # a job that has not begun its search yet: it is still running when its node goes
                if job["node_id"] not in trained_on and "search_step" not in job:
                    lost_evaluation = job
                    remove(job)
                    break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=900)
    return lost_training, lost_evaluation, stdout, stderr


def check_moved(relu: RunDir, shared: RunDir, lost_training: str, lost_evaluation: dict, logged: dict) -> None:
    """relu moved on from the node it lost, from its newest complete checkpoint (the same
    trajectory and checkpoints as the uninterrupted `shared` run); the evaluation whose
    node went was retried on another node; MLflow (`logged`: relu's tags and metrics)
    holds every point once."""
    assert len(relu.nodes()) == 2 and relu.nodes()[0]["node_id"] == lost_training
    assert trajectory(relu.path) == trajectory(shared.path)
    assert [c.tokens for c in relu.checkpoints()] == [c.tokens for c in shared.checkpoints()]

    # the evaluation whose node went was retried on another node, and its result is there once
    if lost_evaluation["job"] == "stabilised":
        record = relu.sparsity_record()
        assert [p["tokens"] for p in record["checkpoints"]] == [c.tokens for c in relu.checkpoints()]
    else:
        record = json.loads(relu.evaluation_of(relu.checkpoints_dir / lost_evaluation["job"]).read_text())
    assert record["evaluated_on"]["node_id"] != lost_evaluation["node_id"]
    assert record["evaluated_on"]["attempt"] == lost_evaluation["attempt"] + 1
    assert not relu.running_jobs()

    assert len(logged["tags"]["nodes"].split(", ")) == 2
    steps = [s for s, _ in logged["metrics"]["activation_ratio_checkpoint"]]
    assert steps == [c.tokens for c in relu.checkpoints()]  # every checkpoint's result exactly once
    for key, points in logged["metrics"].items():
        assert len({s for s, _ in points}) == len(points), key


def test_a_cluster_that_loses_every_node_stops_the_grid_with_one_line(tmp_path):
    """relu's only node goes after its first checkpoint, and no other node could hold it: the
    grid stops after node_wait_s, naming the run; what it wrote is intact. (A resubmit resumes
    it from there, as test_a_run_survives_... shows within one submit.)"""
    cluster, nodes = _cluster(workers=1)
    try:
        workdir = tmp_path / "work"
        grid = _grid(tmp_path, "lost_test", node_wait_s=5, tokens=8192)
        process = _submit(grid, cluster.address, workdir)
        relu = RunDir(workdir / "runs" / "relu")
        deadline = time.time() + 600
        while process.poll() is None and time.time() < deadline and not relu.checkpoints():
            time.sleep(0.05)
        kept = [c.name for c in relu.checkpoints()]
        _remove(cluster, nodes, nodes[0].node_id)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        cluster.shutdown()
    assert process.returncode == 2, (stdout[-3000:], stderr[-5000:])
    last = stderr.splitlines()[-1]
    # what waited in vain is the training worker or, where training got further first, an
    # evaluation job of the run: either way the line names it, its need and its log
    lost = re.match(r"sparsity-scaling: error: grid lost_test stopped: run relu: no node of the cluster can hold "
                    r"(a training worker|a rank of its evaluation job \S+) \(1 CPU\) for 5 s", last)
    assert lost, stderr[-3000:]
    log = relu.train_log(0) if lost[1] == "a training worker" else relu.evaluation_log
    assert f"(log: {log})" in last and "Traceback" not in stderr
    # the checkpoints written are intact, and the run says why it stopped
    assert kept and [c.name for c in relu.checkpoints()][: len(kept)] == kept
    for checkpoint in relu.checkpoints():
        checkpoint.verify()
    status = subprocess.run([sys.executable, "-m", "sparsity_scaling.cli", "grid", "status", str(grid),
                             "--workdir", str(workdir)], cwd=REPO, capture_output=True, text=True)
    assert "relu: failed: " in status.stdout and str(log) in status.stdout
