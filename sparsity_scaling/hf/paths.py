"""What kind of model a path names: the one place that tells our checkpoints, our run
directories, Hugging Face model directories and GGUF files apart."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..rundir import RunDir, is_checkpoint

ModelKind = Literal["checkpoint", "run", "hf", "gguf"]


def model_kind(path: str | Path) -> ModelKind | None:
    """checkpoint (ours: manifest.json), run (ours: checkpoints/), hf (a directory with
    config.json), gguf (a .gguf file), or None for anything else."""
    path = Path(path)
    if path.is_file():
        return "gguf" if path.suffix.lower() == ".gguf" else None
    if is_checkpoint(path):
        return "checkpoint"
    if RunDir(path).checkpoints_dir.is_dir():
        return "run"
    if (path / "config.json").is_file():
        return "hf"
    return None
