"""A run's health as it trains: non-finite steps (stopped, or skipped up to
`train.skip_nonfinite_steps`) and loss spikes (counted).

**Loss spike rule.** A step's training loss is a spike when it exceeds `SPIKE_FACTOR` (1.25)
times the median of the previous `SPIKE_WINDOW` (50) finite step losses, once at least
`SPIKE_MIN_HISTORY` (10) are known. The median ignores the spikes themselves and the noise
of single batches; a ratio makes the rule independent of the loss's scale (a 25% jump is
far beyond batch-to-batch noise at any loss); and 50 steps follow the falling loss of early
training closely, so a falling loss is never a spike. A switch of data (the decay stage's
`train.decay_data`) can count as one: the counter says the loss jumped, not why.

The state travels in each checkpoint's manifest (`health`), so a resumed run counts as the
uninterrupted one does.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ..errors import NonFiniteError

SPIKE_FACTOR = 1.25
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10


@dataclass
class Health:
    skipped_steps: int = 0  # non-finite steps skipped so far (no optimizer update)
    loss_spikes: int = 0
    recent_losses: list[float] = field(default_factory=list)  # the last SPIKE_WINDOW finite losses

    @classmethod
    def from_manifest(cls, manifest: dict | None) -> "Health":
        record = (manifest or {}).get("health") or {}
        return cls(record.get("skipped_steps", 0), record.get("loss_spikes", 0), list(record.get("recent_losses", [])))

    def record(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "loss_spikes": self.loss_spikes,
                "recent_losses": self.recent_losses}

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike against the losses seen so far (the rule above)."""
        return (len(self.recent_losses) >= SPIKE_MIN_HISTORY
                and loss > SPIKE_FACTOR * statistics.median(self.recent_losses))

    def finite_step(self, loss: float) -> None:
        if self.is_spike(loss):
            self.loss_spikes += 1
        self.recent_losses = (self.recent_losses + [loss])[-SPIKE_WINDOW:]

    def nonfinite_step(self, step: int, tokens: int, loss: float, grad_norm: float, allowed: int) -> str:
        """Count a step whose loss or gradient norm is not finite; the line saying it was
        skipped, or NonFiniteError once more than `allowed` steps were skipped."""
        what = f"step {step} (tokens {tokens:,}): loss {loss:.4g}, grad_norm {_number(grad_norm)}"
        if self.skipped_steps >= allowed:
            skipped = f"; {self.skipped_steps} earlier non-finite step(s) skipped" if self.skipped_steps else ""
            raise NonFiniteError(f"training diverged at {what} (not finite){skipped}; no checkpoint "
                                 f"written after the last finite one; train.skip_nonfinite_steps {allowed} "
                                 "sets how many such steps may be skipped")
        self.skipped_steps += 1
        return (f"warning: {what}: not finite, update skipped ({self.skipped_steps} of "
                f"train.skip_nonfinite_steps {allowed})")


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"


def finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)
