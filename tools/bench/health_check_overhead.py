"""Benchmark: what the per-step health check costs a training step.

Times `Trainer.step` (the real path: every step reads the global batch's loss and gradient
norm back, one all-reduce and one device-to-host copy, and decides before the update)
against the same step without the check (DeepSpeed clips, the loss stays on the device),
on one process with synthetic tokens, alternating single steps so both see the same
machine load; the medians of the step times are compared.

    python tools/bench/health_check_overhead.py configs/models/tiny.yaml --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import RandomTokens


def unchecked_step(trainer, step: int) -> None:
    """The step as it was before the health check: no verdict, no read of the loss."""
    from deepspeed.runtime.utils import clip_grad_norm_

    from sparsity_scaling.parallel import device

    consumed = step * trainer.layout.global_samples
    for first, count in trainer.layout.micro_batches(consumed):
        batch = trainer.train_sampler.samples(first, count).to(device(), non_blocking=True)
        loss = trainer.engine.module.token_losses(batch[:, :-1], batch[:, 1:]).mean()
        trainer.engine.backward(loss)
        if trainer.clips_itself and trainer.engine.is_gradient_accumulation_boundary() and trainer.config.train.grad_clip:
            # what DeepSpeed did itself before the check (the trainer now tells it not to)
            clip_grad_norm_(trainer.engine.module.parameters(), max_norm=trainer.config.train.grad_clip,
                            mpu=trainer.engine.mpu)
        trainer.engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind")
    args = parser.parse_args()

    from sparsity_scaling.config import load_config
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel
    from sparsity_scaling.rundir import RunDir
    from sparsity_scaling.train.loop import Trainer

    config = load_config(args.config, args.set)
    init_parallel(1)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            trainer = Trainer(config, RunDir(scratch), RandomTokens(config.data.vocab_size, config.data.seq_len))
            kinds = {"checked": lambda i: trainer.step(i), "unchecked": lambda i: unchecked_step(trainer, i)}
            times = {kind: [] for kind in kinds}
            step = 0
            for kind, fn in kinds.items():  # warm-up
                for _ in range(3):
                    fn(step)
                    step += 1
            for _ in range(args.steps):
                for kind, fn in kinds.items():
                    sync()
                    started = time.perf_counter()
                    fn(step)
                    sync()
                    times[kind].append(time.perf_counter() - started)
                    step += 1
    finally:
        shutdown_parallel()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{config.model.name} on {device}, {trainer.batch_tokens:,} tokens per step, "
          f"{'bf16' if trainer.bf16 else 'fp32'}, {args.steps} steps of each kind, alternating")
    for kind, values in times.items():
        print(f"{kind:>10}: {statistics.median(values) * 1e3:8.2f} ms/step (median; "
              f"min {min(values) * 1e3:.2f}, max {max(values) * 1e3:.2f})")
    ratio = statistics.median(times["checked"]) / statistics.median(times["unchecked"])
    print(f"checked / unchecked: {ratio:.3f}")


if __name__ == "__main__":
    main()
