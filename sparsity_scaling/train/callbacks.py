"""Typed hooks of the training loop: what a run reports as it goes.

The loop calls every callback on rank 0 only: `on_start` once the run's plan is known (and
whether it resumes), `on_log` after each training or validation point is written to the
run's metrics, and `on_checkpoint` after a checkpoint is complete on disk. Console
progress is one callback; a grid's worker adds one that delivers metrics to MLflow and
queues the checkpoint's evaluation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..formatting import duration
from ..rundir import Checkpoint


@dataclass(frozen=True)
class TrainPlan:
    """What a run is about to do."""

    model: str
    non_embedding_params: int
    total_steps: int
    batch_tokens: int
    tp: int
    dp: int
    dtype: str
    checkpoints: int
    start_step: int  # > 0 when resuming
    resumed_from: Checkpoint | None


@dataclass(frozen=True)
class TrainPoint:
    """One line of metrics.jsonl: a training point (kind "train") or a validation point ("val")."""

    kind: str
    step: int
    tokens: int
    loss: float
    lr: float | None = None  # training points only
    tokens_per_s: float | None = None  # training points only
    grad_norm: float | None = None  # training points: the global gradient norm before clipping
    loss_spikes: int | None = None  # training points: loss spikes so far (`train.health`)
    skipped_steps: int | None = None  # training points: non-finite steps skipped so far
    skipped: bool | None = None  # True at a skipped step: its loss or grad_norm is null (not finite)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Callback:
    """Override the hooks a callback needs; the others do nothing."""

    def on_start(self, plan: TrainPlan) -> None:
        pass

    def on_log(self, point: TrainPoint) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass


class ConsoleProgress(Callback):
    """One line per logged step (loss, learning rate, tokens/s, ETA) and per checkpoint."""

    def on_start(self, plan: TrainPlan) -> None:
        self.plan, self.started = plan, time.time()
        if plan.resumed_from is not None and plan.start_step >= plan.total_steps:
            print(f"already complete: {plan.resumed_from.name}; nothing to train", flush=True)
        elif plan.resumed_from is not None:
            print(f"resuming from {plan.resumed_from.name} (step {plan.start_step})", flush=True)
        print(f"training {plan.model}: {plan.non_embedding_params / 1e6:.2f}M non-embedding parameters, "
              f"{plan.total_steps} steps of {plan.batch_tokens:,} tokens, tp={plan.tp} dp={plan.dp}, "
              f"{plan.dtype}, {plan.checkpoints} checkpoints", flush=True)

    def on_log(self, point: TrainPoint) -> None:
        if point.kind != "train":
            return
        eta = (self.plan.total_steps - point.step) * self.plan.batch_tokens / max(point.tokens_per_s, 1e-9)
        norm = "-" if point.grad_norm is None else f"{point.grad_norm:.3g}"
        trouble = "".join(f" | {name} {count}" for name, count in (("loss spikes", point.loss_spikes),
                                                                   ("skipped steps", point.skipped_steps)) if count)
        print(f"step {point.step}/{self.plan.total_steps} | tokens {point.tokens:,} | loss {point.loss:.4f} | "
              f"grad norm {norm} | lr {point.lr:.2e} | {point.tokens_per_s:,.0f} tok/s | ETA {duration(eta)}"
              + trouble, flush=True)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        print(f"checkpoint {checkpoint.name} | val loss {checkpoint.manifest['val_loss']:.4f}", flush=True)
