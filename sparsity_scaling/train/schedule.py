"""The WSD learning-rate schedule (warm-up, stable, decay) used by MiniCPM and the paper."""

from __future__ import annotations

import math

from ..config import RunConfig, TrainConfig, checkpoint_tokens


def decay_start(total_steps: int, cfg: TrainConfig) -> int:
    """The first step of the decay stage (where train.decay_data, if any, takes over)."""
    return total_steps - round(cfg.decay_fraction * total_steps)


def decay_start_tokens(config: RunConfig) -> int:
    """Training tokens at the start of the decay stage (marked on activation curves)."""
    batch = (config.train.batch_tokens // config.data.seq_len) * config.data.seq_len
    return decay_start(checkpoint_tokens(config)[-1] // batch, config.train) * batch


def wsd_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    warmup = round(cfg.warmup_fraction * total_steps)
    start = decay_start(total_steps, cfg)
    decay = total_steps - start
    if step < warmup:
        return (step + 1) / warmup
    if step < start or decay == 0:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay)
    floor = cfg.final_lr_ratio
    if cfg.decay_shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.decay_shape == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor**progress  # exponential: MiniCPM's choice
