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
import sys
import time
from pathlib import Path

import pytest

from conftest import mlflow_history, trajectory
from hosts import host_cluster, why_not
from sparsity_scaling.rundir import RunDir
from test_cluster import _grid, submit_argv


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
from launcher.cluster import check_nodes, cluster_hosts, tracking_uri_problem

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
    "uri": {u: tracking_uri_problem(u, hosts) for u in (uri["127.0.0.1"], uri[head_ip], "http://localhost:5000",
                                                          "sqlite:///x/mlflow.db")},
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
    for host in (head, w1, w2):  # a corpus of the same name at LOCAL: w3 has none, w2's differs
        (host.private / "corpus").mkdir()
        (host.private / "corpus" / "shard0.bin").write_bytes(b"tokens" * (100 if host is not w2 else 99))
    done = hosts.python(head, CHECK, hosts.address, str(shared), str(hosts.local), head.ip, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert found["hosts"] == sorted(h.ip for h in hosts.hosts)
    assert found["shared"] == []
    work, corpus, loopback = str((hosts.local / "work").resolve()), str((hosts.local / "corpus").resolve()), found["loopback"]
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
