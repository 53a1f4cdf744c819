"""Atomic checkpoints with manifests, and the run directory that holds them.

    OUT/run.json                     which run this directory belongs to (config hash)
    OUT/config.yaml, tokenizer.model the resolved config and tokenizer
    OUT/metrics.jsonl                train / validation points, one JSON object a line
    OUT/checkpoints/tokens_<N>/      one checkpoint:
        manifest.json                tokens, step, config hash, sha256 of every file
        model.pt                     unsharded fp32 weights (any TP size can load them)
        engine/                      DeepSpeed state for exact resume (optimizer shards)

A checkpoint is written into `.tmp-<name>` and renamed into place after its manifest is
written, so a checkpoint directory without the `.tmp-` prefix is always complete, and an
interrupted write leaves older checkpoints untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


def checkpoint_name(tokens: int) -> str:
    return f"tokens_{tokens:015d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    def verify(self) -> None:
        """Check every file against the manifest's checksums (slow on big models)."""
        for rel, digest in self.manifest["files"].items():
            file = self.path / rel
            if not file.is_file() or sha256_file(file) != digest:
                raise UserError(f"{self.path}: {rel} is missing or does not match its checksum")


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not a complete checkpoint (no {MANIFEST})") from None
    except json.JSONDecodeError:
        raise UserError(f"{path}/{MANIFEST}: not valid JSON") from None
    return Checkpoint(path, manifest)


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX) or not (path / MANIFEST).is_file():
            continue
        found.append(read_checkpoint(path))
    return sorted(found, key=lambda c: c.tokens)


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete leftovers of interrupted writes (never a complete checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def start_checkpoint(run_dir: str | Path, tokens: int) -> Path:
    """A fresh temporary directory for the checkpoint at `tokens` (stale leftovers removed).

    Fill it, then call `finish_checkpoint`; until then it is invisible to `list_checkpoints`,
    and a crash leaves only a `.tmp-` directory that the next start removes.
    """
    tmp = Path(run_dir) / "checkpoints" / f"{TMP_PREFIX}{checkpoint_name(tokens)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(tmp: Path, manifest: dict) -> Path:
    """Checksum the files, write the manifest, and rename the directory into place."""
    files = {
        str(p.relative_to(tmp)): sha256_file(p)
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    write_json_atomic(tmp / MANIFEST, {**manifest, "files": files})
    final = tmp.with_name(tmp.name.removeprefix(TMP_PREFIX))
    if final.exists():  # the same checkpoint again (a rerun of the same step): keep the old
        shutil.rmtree(tmp)
        return final
    os.rename(tmp, final)
    return final


def claim_run_dir(run_dir: str | Path, config_hash: str, config_yaml: str) -> None:
    """Make `run_dir` this run's, or refuse if it holds another run's checkpoints."""
    run_dir = Path(run_dir)
    identity = run_dir / "run.json"
    if identity.is_file():
        try:
            theirs = json.loads(identity.read_text()).get("config_hash")
        except json.JSONDecodeError:
            theirs = None
        if theirs != config_hash:
            raise UserError(
                f"--out {run_dir}: holds another run (config hash {theirs}, this run "
                f"{config_hash}); choose a new directory"
            )
        return
    if list_checkpoints(run_dir):
        raise UserError(f"--out {run_dir}: holds checkpoints of an unknown run; choose a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_yaml)
    write_json_atomic(identity, {"config_hash": config_hash})
