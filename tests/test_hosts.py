"""The grid on a cluster whose nodes are distinct hosts (tests/hosts.py: network namespaces
on this machine, each with its own address, raylet and HOME): what `ray.cluster_utils`
nodes, which share one address and one loopback, cannot show. The grid's MLflow server on
the head is reached from the training ranks of other hosts, each point arriving once; the
node check accepts shared paths and refuses a node-local one and a server only the head
reaches; a run survives losing the host of its training, and one of an evaluation job.

Needs root and iproute2 (skipped, saying why, without): `sudo -E env PYTHONPATH=$PWD
.venv/bin/python -m pytest tests/test_hosts.py`."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse

import pytest

from helpers import mlflow_history
from hosts import host_cluster, why_not
from sparsity_scaling.rundir import RunDir
from test_cluster import _grid, check_moved, lose_training_then_evaluation, submit_argv


@pytest.fixture(scope="module")
def hosts():
    """A head holding no CPU and three one-CPU worker hosts (as test_cluster's nodes: one
    holds a training worker or an evaluation job)."""
    reason = why_not()
    if reason:
        pytest.skip(f"no cluster of distinct hosts: {reason}")
    yield from host_cluster(workers=3, cpus=1)


CHECK = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import ray
from launcher.cluster import check_nodes, cluster_hosts
from launcher.preflight import tracking_problem

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass

ray.init(address=sys.argv[1], log_to_driver=False)
shared, local, head_ip = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
servers = {host: HTTPServer((host, 0), Health) for host in ("127.0.0.1", head_ip)}
for server in servers.values():
    threading.Thread(target=server.serve_forever, daemon=True).start()
uri = {host: f"http://{host}:{server.server_address[1]}" for host, server in servers.items()}
hosts = cluster_hosts()
found = {
    "hosts": hosts,
    "shared": check_nodes([shared / "work"], [shared / "corpus"], uri[head_ip]),
    "local": check_nodes([local / "work"], [local / "corpus"], uri["127.0.0.1"]),
    "loopback": uri["127.0.0.1"],
    "uri": {u: getattr(tracking_problem(u, len(hosts)), "reason", None)
            for u in (uri["127.0.0.1"], uri[head_ip], "http://localhost:5000", "sqlite:///x/mlflow.db")},
}
print(json.dumps(found, default=vars))
"""


def test_the_node_check_accepts_shared_paths_and_refuses_node_local_ones(hosts):
    """A directory every host shares passes; LOCAL, a directory of the same name on each host
    (a node's scratch disk), fails on every host but the driver's, and so does a corpus
    there, missing on one worker and different on another (an identical copy passes); a server bound to the head's
    loopback answers only the head, one on its cluster address every host."""
    shared = hosts.base / "shared"
    (shared / "corpus").mkdir(parents=True)
    (shared / "corpus" / "shard0.bin").write_bytes(b"tokens" * 100)
    head, w1, w2, w3 = hosts.hosts
    for host in hosts.hosts:  # a directory of the same name on every host, as a scratch disk's
        (host.private / "work").mkdir()
    for host in (head, w1, w2):  # a corpus of the same name at LOCAL: w3 has none, w2's differs
        (host.private / "corpus").mkdir()
        (host.private / "corpus" / "shard0.bin").write_bytes(b"tokens" * (100 if host is not w2 else 99))
    done = hosts.python(head, CHECK, hosts.address, str(shared), str(hosts.local), head.ip, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert found["hosts"] == sorted(h.ip for h in hosts.hosts)
    assert found["shared"] == []
    work, corpus = str((hosts.local / "work").resolve()), str((hosts.local / "corpus").resolve())
    loopback = found["loopback"]
    problems = {(p["node_ip"], p["subject"], p["why"].split(" (")[0]) for p in found["local"]}
    assert problems == {
        *[(w.ip, work, "not the directory the driver sees") for w in (w1, w2, w3)],
        # w1's copy is the driver's, byte for byte: it passes
        (w2.ip, corpus, "differs from the driver's"), (w3.ip, corpus, "does not exist on this node"),
        *[(w.ip, loopback, "no MLflow server answers there from this node") for w in (w1, w2, w3)],
    }

    on_loopback, on_cluster_address, localhost, store = found["uri"].values()
    assert "loopback" in on_loopback and "loopback" in localhost and on_cluster_address is None
    assert "SQLite" in store


def test_a_grid_across_hosts_delivers_from_its_workers_and_survives_losing_hosts(hosts, grid_run, monkeypatch):
    """relu trains on a worker host and delivers its points to the head's MLflow server
    itself; its training host, and later the host of one of its evaluation jobs, is lost
    (every process of the host ends, its raylet first among them), and the run moves on."""
    workdir = hosts.base / "work"  # on storage every host shares
    process = hosts.popen(hosts.head, submit_argv(_grid(hosts.base, "hosts_test"), hosts.address, workdir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relu = RunDir(workdir / "runs" / "relu")
    on = {host.ip: host for host in hosts.hosts}
    try:
        lost_training, lost_evaluation, stdout, stderr = lose_training_then_evaluation(
            process, relu, lambda record: hosts.stop(on[record["ip"]]))
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, (stdout[-3000:], stderr[-5000:])
    assert lost_training is not None and lost_evaluation is not None

    # the grid's server ran on the head's cluster address, the URI every run recorded
    workers = {host.ip for host in hosts.hosts[1:]}
    for run in ("relu",):
        assert json.loads(RunDir(workdir / "runs" / run).mlflow_run.read_text())["tracking_uri"].startswith(
            f"http://{hosts.head.ip}:")
    # the training ranks on worker hosts delivered their points themselves
    trained_on = [node["ip"] for node in relu.nodes()]
    assert len(trained_on) == 2 and set(trained_on) <= workers
    server_log = (workdir / "mlflow" / "server.log").read_text()
    senders = set(re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"POST /api/2\.0/mlflow/runs/log-batch", server_log))
    assert senders & set(trained_on), senders

    # read back from the store itself (the server has stopped with the grid; this process
    # is outside the hosts' network)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    logged = mlflow_history(workdir, "hosts_test")["relu"]
    assert {node.split("/")[0] for node in logged["tags"]["nodes"].split(", ")} == set(trained_on)
    check_moved(relu, RunDir(grid_run / "runs" / "relu"), lost_training, lost_evaluation, logged)
    # each training point exactly once
    tokens = [p["tokens"] for p in relu.metric_points() if p["kind"] == "train" and p.get("loss") is not None]
    assert [step for step, _ in logged["metrics"]["train_loss"]] == sorted(set(tokens))


def test_a_single_host_grid_keeps_its_server_on_loopback(grid_run):
    """The shared grid, on a local Ray instance: its server listened on 127.0.0.1 only,
    the address its runs recorded."""
    for run in ("relu", "silu"):
        uri = json.loads(RunDir(grid_run / "runs" / run).mlflow_run.read_text())["tracking_uri"]
        assert urllib.parse.urlsplit(uri).hostname == "127.0.0.1"


def test_a_resubmit_points_the_runs_at_the_store_s_current_address(tmp_path):
    """A run recorded with an address the store is no longer served at (an earlier submit's
    loopback server) is pointed at the current one when that holds its MLflow run, and
    left alone when it does not (a run of another store)."""
    from helpers import mlflow_run_dir
    from launcher.tracking import child_run

    mlflow, run_id, run_dir = mlflow_run_dir(tmp_path)
    uri = json.loads((run_dir / "mlflow_run.json").read_text())["tracking_uri"]
    old = {"run_id": run_id, "tracking_uri": "http://127.0.0.1:9"}
    (run_dir / "mlflow_run.json").write_text(json.dumps(old))
    assert child_run(uri, None, None, "parent", RunDir(run_dir)) == run_id
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == {"run_id": run_id, "tracking_uri": uri}

    stranger = {"run_id": "0" * 32, "tracking_uri": "http://127.0.0.1:9"}
    (run_dir / "mlflow_run.json").write_text(json.dumps(stranger))
    assert child_run(uri, None, None, "parent", RunDir(run_dir)) == stranger["run_id"]
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == stranger


def test_the_server_takes_requests_addressed_to_the_host_it_binds(tmp_path):
    """A head whose cluster address is neither loopback nor a private range (here 127.0.0.2,
    which MLflow's own host check does not know): the nodes' requests, addressed to it, are
    served, not refused with 403."""
    from mlflow import MlflowClient

    from launcher.tracking import start_local_server, stop_local_server
    from launcher.workdir import Workdir

    workdir = Workdir(tmp_path / "work")
    uri = start_local_server(workdir, "127.0.0.2")
    try:
        assert urllib.parse.urlsplit(uri).hostname == "127.0.0.2"
        client = MlflowClient(uri)
        experiment = client.create_experiment("addressed")
        assert client.get_experiment(experiment).name == "addressed"
    finally:
        stop_local_server(workdir)
