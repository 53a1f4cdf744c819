"""Atomic files: a reader sees the old file or directory or the new one, never a partial one."""

from __future__ import annotations

import json
import os

import pytest

from sparsity_scaling import files


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "result.json"
    files.write_json_atomic(target, {"x": float("inf"), "y": [1.0, float("nan")]})
    assert json.loads(target.read_text()) == {"x": None, "y": [1.0, None]}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        files.write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": None, "y": [1.0, None]}
    assert os.listdir(target.parent) == ["result.json"]


def test_a_directory_written_whole_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "cache" / "entry"
    with pytest.raises(RuntimeError):
        with files.directory_written_whole(target) as work:
            (work / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(target.parent) == []
    with files.directory_written_whole(target) as work:
        (work / "a.bin").write_bytes(b"first")
    with files.directory_written_whole(target) as work:  # a second writer of the same entry
        (work / "a.bin").write_bytes(b"second")
    assert (target / "a.bin").read_bytes() == b"first" and os.listdir(target.parent) == ["entry"]
