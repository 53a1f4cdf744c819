"""Atomic writes: readers see the old file (or directory) or the new one, never a partial one.

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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import WriteFailed


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
