"""Figures rendered off-screen (matplotlib's Figure, no pyplot state) and saved atomically."""

from __future__ import annotations

import io
from pathlib import Path

from .files import write_bytes_atomic


def figure_bytes(figure, format: str = "png", dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=format, dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(figure, path, dpi: int = 110) -> None:
    """Render to memory, then write the file whole (its suffix names the format)."""
    write_bytes_atomic(path, figure_bytes(figure, Path(path).suffix.lstrip(".") or "png", dpi))
