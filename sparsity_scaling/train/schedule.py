"""The WSD learning-rate schedule (warm-up, stable, decay) used by MiniCPM and the paper."""

from __future__ import annotations

import math

from ..config import TrainConfig


def wsd_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    warmup = round(cfg.warmup_fraction * total_steps)
    decay = round(cfg.decay_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    if step < decay_start or decay == 0:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay)
    floor = cfg.final_lr_ratio
    if cfg.decay_shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.decay_shape == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor**progress  # exponential: MiniCPM's choice
