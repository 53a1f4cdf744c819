"""Atomic writes: readers see the old file (or directory) or the new one, never a partial one.
And `OwnerLock`: a file that names the one process holding a workdir or a run.

JSON is written strictly (nan and infinities as null, which JSON has no other way to say),
with lists of plain values kept on one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError, WriteFailed


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in chunks (files of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file renamed into place. A write that
    fails (a full disk: ENOSPC) leaves the old file and no temporary, and is one
    `UserError` line naming the path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteFailed):
            raise WriteFailed(path, error) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json_text(data))


def json_text(data) -> str:
    """Indented JSON with infinities and nan written as null: strict JSON, which every
    JSON reader accepts (Python's own writes `NaN`, which strict readers reject)."""
    return _indented(_finite_or_null(data)) + "\n"


def json_line(data) -> str:
    """One line of a JSON-lines file (metrics.jsonl), as strict as `json_text`."""
    return json.dumps(_finite_or_null(data), allow_nan=False)


def _indented(value, indent=""):
    """Like json.dumps(indent=2), but a list of plain values stays on one line (a
    bootstrap sample, a layer's thresholds)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(key)}: {_indented(v, inner)}" for key, v in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _indented(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)


def _finite_or_null(value):
    if isinstance(value, dict):
        return {key: _finite_or_null(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@contextmanager
def directory_written_whole(target: str | Path) -> Iterator[Path]:
    """Fill the yielded directory; when the block ends it becomes `target` in one rename.

    If the block fails, nothing is left behind. An empty `target` is replaced; a complete
    one written meanwhile by another process (the same cached content) is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield work
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.rename(work, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # nothing left after a successful rename


# ---------------------------------------------------------------- owner locks


def _read_or(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _this_machine() -> tuple[str, str]:
    """(host name, what tells this kernel and pid namespace from another's): a pid means
    something only where both match (a rebooted host, or a container sharing the host name,
    does not see the same processes)."""
    import socket

    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return socket.gethostname(), f"{_read_or('/proc/sys/kernel/random/boot_id')}/{namespace}"


def _process_started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), "" where /proc has
    no such field, or None if there is no such live process (a zombie is gone too): with
    the pid it names one process, though the pid is reused later."""
    stat = _read_or(f"/proc/{pid}/stat", default=None) if os.path.isdir("/proc") else None
    if stat is None:
        if os.path.isdir("/proc"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass(frozen=True)
class LockHolder:
    """Who holds an `OwnerLock`: a process (host, machine, pid and its start), what it is
    ("grid submit", "trainer"), since when, its last heartbeat (its own clock: shown, never
    compared with another host's) and a token naming this one acquisition."""

    what: str
    host: str
    machine: str
    pid: int
    started: str
    since: float
    heartbeat: float
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{self.what} on host {self.host} (pid {self.pid}, since {since})"

    def on_this_machine(self) -> bool:
        return (self.host, self.machine) == _this_machine()

    def is_alive_here(self) -> bool:
        """On this machine: whether the process is still the one that took the lock."""
        return _process_started(self.pid) == self.started


class LockHeld(UserError):
    def __init__(self, path: Path, holder: LockHolder):
        self.path, self.holder = path, holder
        super().__init__(f"{path}: held by {holder.describe()}")


class OwnerLock:
    """A lock file that one process at a time holds, on a local or a network file system.

    Taken by hard-linking a complete record of the holder to the lock's name (atomic, also
    on NFS, where flock may not reach other hosts; a reader never sees a half-written
    record). The holder rewrites its heartbeat every `heartbeat_s` seconds. A holder is gone,
    and its lock is taken over, when its process has ended (on this machine: pid and the
    process' start time, so a reused pid does not count), or, on another host, when its
    heartbeat has not changed for `stale_s` seconds of watching it (a lost node; no clocks
    of different hosts are compared). A holder that finds its lock taken over (it stalled
    for `stale_s`) calls `on_lost`.
    """

    def __init__(self, path: str | Path, what: str, heartbeat_s: float = 10, stale_s: float = 60,
                 on_lost=None):
        self.path, self.what = Path(path), what
        self.heartbeat_s, self.stale_s, self.on_lost = heartbeat_s, stale_s, on_lost
        self.mine: LockHolder | None = None
        self._stop = None

    @property
    def _breaker(self) -> Path:
        return self.path.with_name(self.path.name + ".break")

    def holder(self) -> LockHolder | None:
        """The lock's holder, or None if it is free."""
        try:
            return LockHolder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # not a lock record: nobody can be asked
            return LockHolder("unknown", "?", "?", 0, "", 0.0, 0.0, _read_or(str(self.path)))

    def acquire(self, wait_s: float = 0, waiting=None) -> None:
        """Take the lock, or raise LockHeld naming its holder once `wait_s` seconds have
        passed with the holder alive. A holder on another host counts as alive once its
        heartbeat was seen to change; one whose heartbeat stays still for `stale_s` is
        gone. `waiting(holder)` is called once if this has to wait."""
        import secrets

        host, machine = _this_machine()
        deadline = time.monotonic() + wait_s
        watched, seen_alive, told = None, False, False
        while True:
            now = time.time()
            record = LockHolder(self.what, host, machine, os.getpid(), _process_started(os.getpid()) or "",
                                now, now, secrets.token_hex(8))
            if self._create(self.path, record):
                self.mine = record
                self._start_heartbeat()
                return
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            gone = False
            if holder.on_this_machine():
                gone = not holder.is_alive_here()
                seen_alive = not gone
            else:
                key = (holder.token, holder.heartbeat)
                if watched is None or watched[0] != key:
                    seen_alive = watched is not None
                    watched = (key, time.monotonic())
                gone = time.monotonic() - watched[1] >= self.stale_s
            if gone:
                self._take_over(holder)
                continue
            if seen_alive and time.monotonic() >= deadline:
                raise LockHeld(self.path, holder)
            if waiting is not None and not told:
                waiting(holder)
                told = True
            time.sleep(min(1.0, self.heartbeat_s / 4))

    def release(self) -> None:
        """Stop the heartbeat and free the lock (if it is still this holder's)."""
        if self._stop is not None:
            self._stop.set()
        if self.mine is not None and self._holds():
            self.path.unlink(missing_ok=True)
        self.mine = None

    def __enter__(self) -> "OwnerLock":
        if self.mine is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------ inside

    def _holds(self) -> bool:
        holder = self.holder()
        return holder is not None and self.mine is not None and holder.token == self.mine.token

    @staticmethod
    def _create(path: Path, record: LockHolder) -> bool:
        """Link a complete record to `path`; False if `path` exists."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{record.token}")
        tmp.write_text(json_text(record.__dict__))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # NFS: a link that was made but whose reply was lost
            return os.stat(tmp).st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, gone: LockHolder) -> None:
        """Remove the lock of a holder that is gone, unless it changed meanwhile (another
        contender took it over first): contenders take turns through a breaker file."""
        host, machine = _this_machine()
        breaker = LockHolder("breaker", host, machine, os.getpid(), _process_started(os.getpid()) or "",
                             time.time(), time.time(), gone.token)
        if not self._create(self._breaker, breaker):
            other = OwnerLock(self._breaker, "breaker").holder()
            # a breaker holds it for moments: one older than stale_s by its file time was cut off
            stuck = other is not None and other.on_this_machine() and not other.is_alive_here()
            try:
                stuck = stuck or time.time() - self._breaker.stat().st_mtime > self.stale_s
            except FileNotFoundError:
                return
            if stuck:
                self._breaker.unlink(missing_ok=True)
            time.sleep(0.1)
            return
        try:
            now = self.holder()
            if now is not None and (now.token, now.heartbeat) == (gone.token, gone.heartbeat):
                self.path.unlink(missing_ok=True)
        finally:
            self._breaker.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    if not self._holds():
                        if not stop.is_set() and self.on_lost is not None:
                            self.on_lost(self.holder())
                        return
                    self.mine = LockHolder(**{**self.mine.__dict__, "heartbeat": time.time()})
                    write_json_atomic(self.path, self.mine.__dict__)
                except OSError:  # the file system is away for a moment: the next beat tries again
                    continue

        threading.Thread(target=beat, name=f"heartbeat {self.path.name}", daemon=True).start()
