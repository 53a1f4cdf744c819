"""How an analysis reports: progress lines on rank 0, and its results as OUT/NAME.json and
OUT/NAME.png (atomically), then published elsewhere if the settings say so."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from ..figures import save_figure
from ..files import write_json_atomic
from .settings import AnalysisSettings


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def say(message: str) -> None:
    """A progress line on stderr, once per job."""
    if is_rank0():
        print(message, file=sys.stderr, flush=True)


def write_results(settings: AnalysisSettings, name: str, record: dict, figure,
                  metrics: list[tuple[str, float, int]] = ()) -> None:
    """OUT/NAME.json and OUT/NAME.png, then the same to the settings' publisher (rank 0)."""
    out = Path(settings.out)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    write_json_atomic(json_path, record)
    save_figure(figure, png_path)
    print(f"wrote {json_path} and {png_path}")
    if settings.publish is not None:
        settings.publish([json_path, png_path], list(metrics))
