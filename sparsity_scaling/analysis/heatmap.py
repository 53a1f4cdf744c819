"""Activation ratio by layer and token position for one short text, drawn as the Sparsing
Law paper's released code draws it: layers down, token positions across with the tokens
as tick labels."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def heatmap_figure(ratios: np.ndarray, tokens: list[str], title: str) -> Figure:
    """ratios [layers, positions] -> an annotated heatmap with a colour bar."""
    layers, positions = ratios.shape
    figure = Figure(figsize=(max(6.0, 0.32 * positions + 2.5), max(3.0, 0.35 * layers + 2.0)),
                    layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(ratios, aspect="auto", cmap="viridis", interpolation="nearest",
                      vmin=0.0, vmax=max(float(np.nanmax(ratios)), 1e-9))
    ax.set_xticks(range(positions), tokens, rotation=90, fontsize=8, fontfamily="monospace")
    step = max(1, layers // 24)
    ax.set_yticks(range(0, layers, step))
    ax.set_xlabel("token (position in the text)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="activation ratio (share of active neurons)")
    return figure
