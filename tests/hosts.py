"""A Ray cluster whose nodes are distinct hosts on this machine, for tests.

Each host is a network namespace with its own address and a real `ray start` raylet, its
own HOME and Ray temp dir. The namespaces reach each other through veth pairs to a bridge
that lives in one more namespace: the root namespace gets no interface, address or route,
and nothing is sent outside loopback and these namespaces. They share the filesystem, as
nodes share NFS, except LOCAL (`HostCluster.local`): one path that each host sees as its own
directory (a bind mount in its mount namespace), like a node's scratch disk.

Needs root and iproute2 (`ip netns`); `why_not()` says what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO

SUBNET = "10.213.0"  # in 10.0.0.0/8, used by no network of this machine: only these namespaces see it
RAY_PORT = 6379  # each namespace has its own ports: no clash with any other Ray on the machine


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def why_not() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the test as root)"
    if shutil.which("ip") is None or shutil.which("mount") is None:
        return "network namespaces need iproute2's `ip` and `mount`"
    probe = f"ssprobe{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe)
    _ip("netns", "del", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace ({made.stderr.strip()[:200]})"
    return None


@dataclass
class Host:
    name: str  # head, w1, w2, ...
    netns: str
    ip: str
    home: Path
    private: Path  # what this host sees at HostCluster.local

    @property
    def temp(self) -> Path:
        return self.home / "ray"


class HostCluster:
    """A head holding no CPU and `workers` hosts of `cpus` CPUs each, under `base`."""

    def __init__(self, base: Path, workers: int, cpus: int):
        self.base, self.cpus = base, cpus
        tag = uuid.uuid4().hex[:6]
        self.switch = f"ss{tag}-sw"
        self.local = base / "local"  # a different directory on each host
        self.local.mkdir()
        names = ["head"] + [f"w{i + 1}" for i in range(workers)]
        self.hosts = [Host(name, f"ss{tag}-{name}", f"{SUBNET}.{i + 1}", base / f"home-{name}", base / f"local-{name}")
                      for i, name in enumerate(names)]
        self.head = self.hosts[0]
        self.address = f"{self.head.ip}:{RAY_PORT}"

    # ------------------------------------------------------------ the network

    def _check(self, *args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def make_network(self) -> None:
        self._check("netns", "add", self.switch)
        self._check("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._check("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            self._check("netns", "add", host.netns)
            self._check("-n", host.netns, "link", "set", "lo", "up")
            # one end in the host's namespace (eth0), the other on the bridge
            self._check("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                        "netns", host.netns)
            self._check("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            self._check("-n", self.switch, "link", "set", f"p{i}", "up")
            self._check("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            self._check("-n", host.netns, "link", "set", "eth0", "up")
            host.home.mkdir()
            host.private.mkdir()

    # ------------------------------------------------------------ processes on a host

    def env(self, host: Host) -> dict:
        """A host's environment: its own HOME; Ray finds its node's address (not loopback);
        Ray's workers import this checkout."""
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, "HOME": str(host.home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """argv on `host`: in its network namespace, with its own LOCAL directory."""
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        return ["ip", "netns", "exec", host.netns, "sh", "-c", script, "sh", str(host.private), str(self.local), *argv]

    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), env=self.env(host), cwd=REPO, text=True, **kwargs)

    def run(self, host: Host, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), env=self.env(host), cwd=REPO, text=True,
                              capture_output=True, timeout=timeout)

    def python(self, host: Host, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(host, [sys.executable, "-c", code, *args], timeout)

    def start_ray(self, timeout: float = 240) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        common = ["--disable-usage-stats", "--object-store-memory=100000000"]

        def start(host: Host, node: list[str]) -> None:
            # a raylet must register within Ray's 30 s: on a loaded machine it may miss that
            for attempt in range(3):
                started = self.run(host, [ray, "start", *node, f"--node-ip-address={host.ip}",
                                          f"--temp-dir={host.temp}", *common], timeout=180)
                if started.returncode == 0:
                    return
                self.stop(host)
            raise RuntimeError(f"ray start on {host.name}: {started.stdout[-3000:]} {started.stderr[-3000:]}")

        start(self.head, ["--head", f"--port={RAY_PORT}", "--num-cpus=0", "--include-dashboard=false"])
        for host in self.hosts[1:]:  # one at a time: at once, they overload the GCS of a loaded machine
            start(host, [f"--address={self.address}", f"--num-cpus={self.cpus}"])
        wait = ("import ray, time; ray.init(address='%s', log_to_driver=False)\n"
                "deadline = time.time() + %f\n"
                "while sum(n['Alive'] for n in ray.nodes()) < %d and time.time() < deadline: time.sleep(0.5)\n"
                "print(sum(n['Alive'] for n in ray.nodes()))") % (self.address, timeout, len(self.hosts))
        seen = self.python(self.head, wait, timeout=timeout + 60)
        if seen.stdout.strip() != str(len(self.hosts)):
            raise RuntimeError(f"the cluster did not form: {seen.stdout[-1000:]} {seen.stderr[-2000:]}")

    def stop(self, host: Host) -> None:
        """End every process on the host (its raylet, its Ray workers): the host is lost."""
        for _ in range(50):
            pids = [int(p) for p in _ip("netns", "pids", host.netns).stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        """Every process, namespace, veth and the bridge, gone (a namespace's interfaces go with it)."""
        for host in self.hosts:
            self.stop(host)
            _ip("netns", "del", host.netns)
        _ip("netns", "del", self.switch)


def host_cluster(workers: int = 2, cpus: int = 1):
    """A started HostCluster (a generator for a fixture: closed after, also on failure)."""
    # short paths: Ray's socket paths under the temp dir must stay within 107 characters
    base = Path(tempfile.mkdtemp(prefix="ssh", dir="/tmp"))
    cluster = HostCluster(base, workers, cpus)
    try:
        cluster.make_network()
        cluster.start_ray()
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
