"""Activation ratio by layer and token position for one short text, drawn as the Sparsing
Law paper's released code draws it: layers down, token positions across with the tokens
as tick labels."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..metrics.measure import EvalData
from ..parallel import init_parallel
from .activity import measure_activity
from .models import ModelSpec, describe, model_and_rule, text_sequence, vocabulary
from .output import is_rank0, write_results
from .settings import AnalysisSettings


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


def heatmap_on_rank(settings: AnalysisSettings, spec: ModelSpec, text: str, max_tokens: int = 48) -> None:
    """`analyze heatmap`: one model on one text; a collective on every rank."""
    init_parallel(settings.tp)
    vocab = vocabulary(spec)
    sequence = text_sequence(vocab, text, max_tokens)
    target, rule, setting = model_and_rule(settings, spec)
    activity = measure_activity(target, EvalData(sequence, 1), rule, "text")
    ratios = activity.position_ratios()
    ids = sequence[0, :-1].tolist()
    tokens = [vocab.text(i) for i in ids]
    if is_rank0():
        report = {"model": spec.label, "setting": setting, "text": text, "ids": ids, "tokens": tokens,
                  "layer_position_ratios": ratios.tolist(), "activation_ratio": activity.activation_ratio}
        title = f"{spec.label}: activation ratio by layer and token under {describe(setting)}"
        write_results(settings, "heatmap", report, heatmap_figure(ratios, tokens, title))
