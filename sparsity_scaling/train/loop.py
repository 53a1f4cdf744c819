"""The training loop: one DeepSpeed engine over a tensor x data parallel MiniCPM.

Every rank runs `train()`. The global batch at consumed-sample count s is samples
s .. s+B-1 of the deterministic sampler; data-parallel rank r takes its contiguous share and
splits it into micro-batches, so any data-parallel size trains on the same global batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state as ps

from ..config import RunConfig, checkpoint_tokens
from ..costs import BatchSplit
from ..data.pipeline import PreparedData
from ..data.sampler import BlendedSampler, WindowSampler
from ..errors import NonFiniteError, UserError
from ..model import MiniCPM
from ..parallel import DeepSpeedMPU, all_reduce, broadcast_from_rank_zero, device
from ..rundir import Checkpoint, RunDir, read_checkpoint
from .callbacks import Callback, TrainPlan, TrainPoint
from .checkpoint import CheckpointState, save_checkpoint
from .health import Health, finite
from .schedule import decay_start, wsd_factor


@dataclass(frozen=True)
class Layout:
    """How the global batch maps onto ranks and micro-steps."""

    global_samples: int
    micro: int
    accumulation: int
    dp: int
    dp_rank: int

    @classmethod
    def of(cls, config: RunConfig) -> "Layout":
        split = BatchSplit.of(config, ps.get_data_parallel_world_size())
        if not split.divides:
            raise UserError(split.refusal())
        return cls(split.sequences, split.micro, split.accumulation, split.dp, ps.get_data_parallel_rank())

    def micro_batches(self, consumed: int) -> list[tuple[int, int]]:
        """(first sample, count) of this rank's micro-batches in the batch at `consumed`."""
        start = consumed + self.dp_rank * self.micro * self.accumulation
        return [(start + i * self.micro, self.micro) for i in range(self.accumulation)]


def _param_groups(model: MiniCPM, config: RunConfig) -> list[dict]:
    """muP: hidden matrices get lr / width_mult; norms get no weight decay."""
    cfg = config.train
    hidden_lr = cfg.lr / model.width_mult if cfg.mup_lr_scaling else cfg.lr
    matrices, embedding, norms = [], [], []
    for name, param in model.named_parameters():
        if name.startswith("embed."):
            embedding.append(param)
        elif param.dim() == 1:
            norms.append(param)
        else:
            matrices.append(param)
    return [
        {"params": matrices, "lr": hidden_lr, "weight_decay": cfg.weight_decay},
        {"params": embedding, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": norms, "lr": cfg.lr, "weight_decay": 0.0},
    ]


def _deepspeed_config(config: RunConfig, layout: Layout, bf16: bool, clips_itself: bool) -> dict:
    cfg = config.train
    return {
        "train_batch_size": layout.global_samples,
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": 0.0 if clips_itself else cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage_for(bf16)},
        "bf16": {"enabled": bf16},
        # bf16 weights, fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at ZeRO 1)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [cfg.beta1, cfg.beta2],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
                **({"fused": True} if torch.cuda.is_available() else {}),  # one kernel per step on a GPU
            },
        },
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


@torch.no_grad()
def validation_loss(model: MiniCPM, sampler: WindowSampler | BlendedSampler, num_samples: int, micro: int) -> float:
    """Mean token loss over the first `num_samples` validation windows, split over DP ranks."""
    model.eval()
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(rank, num_samples, dp))
    total = torch.zeros(2, dtype=torch.float64)
    dev = next(model.parameters()).device
    for i in range(0, len(mine), micro):
        chunk = mine[i : i + micro]
        batch = torch.cat([sampler.samples(s, 1) for s in chunk]).to(dev)
        losses = model.token_losses(batch[:, :-1], batch[:, 1:])
        total += torch.tensor([losses.double().sum().item(), losses.numel()], dtype=torch.float64)
    all_reduce(total, "dp")  # on the CPU, whoever created the default group
    model.train()
    return (total[0] / total[1]).item()


class Trainer:
    """One run's engine, data and schedule on this rank."""

    def __init__(self, config: RunConfig, run: RunDir, data: PreparedData):
        self.config, self.run, self.data = config, run, data
        self.is_main = dist.get_rank() == 0
        self.layout = Layout.of(config)
        self.bf16 = config.train.dtype == "bf16" or (config.train.dtype == "auto" and torch.cuda.is_available())
        torch.manual_seed(config.train.seed)
        model = MiniCPM(config.model, data.vocab_size).to(device())
        model.checkpoint_blocks = config.train.activation_checkpointing
        groups = _param_groups(model, config)
        self.base_lrs = [g["lr"] for g in groups]
        # DeepSpeed's bf16 and ZeRO optimizers take the global gradient norm and skip a
        # non-finite step themselves; its plain fp32 path keeps the norm to itself, so
        # there the loop clips (the same function, before the same update) and decides.
        self.clips_itself = not self.bf16 and config.train.zero_stage == 0
        # DeepSpeed's initialize compiles a shared-memory all-reduce for CPU ranks (half a
        # minute of C++, again whenever another ninja version finds the build) that only its
        # inference all-reduce uses, which training never calls: it is left out.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=groups,
            config=_deepspeed_config(config, self.layout, self.bf16, self.clips_itself), mpu=DeepSpeedMPU(),
        )
        seq_len = config.data.seq_len
        self.schedule = checkpoint_tokens(config)
        self.batch_tokens = self.layout.global_samples * seq_len
        self.total_steps = self.schedule[-1] // self.batch_tokens
        self.train_sampler = data.sampler("train", seq_len, config.train.seed, self.total_steps * self.layout.global_samples)
        # the decay stage trains on train.decay_data, if given, from its first sample on
        self.decay_start = decay_start(self.total_steps, config.train)
        self.decay_sampler = None if data.decay is None else data.decay.sampler(
            "train", seq_len, config.train.seed, (self.total_steps - self.decay_start) * self.layout.global_samples)
        val_samples = max(1, config.data.val_tokens // seq_len)
        self.valid_sampler = data.sampler("valid", seq_len, 0, val_samples)
        self.val_samples = min(self.valid_sampler.num_windows, val_samples)

    def _resume_point(self) -> Checkpoint | None:
        """The newest complete checkpoint, if any; UserError if it cannot be resumed from."""
        done = self.run.checkpoints()
        if not done:
            return None
        latest = done[-1]
        if not latest.has_engine:
            raise UserError(f"{latest.path}: holds no engine state (removed by checkpoint.keep_engine), "
                            "cannot resume from it")
        for key, expected in (("tp", self.config.parallel.tp), ("dp", self.layout.dp)):
            if latest.manifest.get(key) != expected:
                raise UserError(f"{latest.path}: written with {key}={latest.manifest.get(key)}, cannot resume "
                                f"with {key}={expected}")
        return latest

    def resume(self) -> Checkpoint | None:
        """Load the newest complete checkpoint, if any, and forget metrics logged after it.
        Rank 0 chooses it for every rank: ranks listing a shared directory themselves can
        disagree (a file system's caches after a node was lost)."""
        choice: tuple[str | None, str | None] = (None, None)  # (checkpoint, error)
        if self.is_main:
            try:
                point = self._resume_point()
                choice = (None if point is None else str(point.path), None)
            except UserError as error:
                choice = (None, str(error))
        path, error = broadcast_from_rank_zero(choice)
        if error is not None:
            raise UserError(error)
        if path is None:
            return None
        latest = read_checkpoint(path)
        self.engine.load_checkpoint(str(latest.path), tag=Checkpoint.ENGINE_TAG)
        if self.is_main:
            self.run.truncate_metrics_after(latest.tokens)
        return latest

    def plan(self, start_step: int, resumed_from: Checkpoint | None) -> TrainPlan:
        return TrainPlan(
            model=self.config.model.name, non_embedding_params=self.config.model.non_embedding_params(),
            total_steps=self.total_steps, batch_tokens=self.batch_tokens, tp=self.config.parallel.tp,
            dp=self.layout.dp, dtype="bf16" if self.bf16 else "fp32", checkpoints=len(self.schedule),
            start_step=start_step, resumed_from=resumed_from,
        )

    def lr_factor(self, step: int) -> float:
        """Set the WSD learning rate of every parameter group for this step; return its factor."""
        factor = wsd_factor(step, self.total_steps, self.config.train)
        for group, base in zip(self.engine.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return factor

    def step(self, step: int) -> tuple[float, float | None]:
        """One optimizer step over this rank's micro-batches: (the global batch's mean loss,
        the global gradient norm before clipping, None where DeepSpeed does not say).

        A step whose loss or norm is not finite updates nothing. Its verdict costs one read
        of two numbers per step (the GPU waits for it): every rank reaches the same one,
        since the loss is summed over data-parallel ranks and the norm is global."""
        sampler, consumed = self.train_sampler, step * self.layout.global_samples
        if self.decay_sampler is not None and step >= self.decay_start:
            sampler, consumed = self.decay_sampler, (step - self.decay_start) * self.layout.global_samples
        losses = []
        dev = device()
        batches = self.layout.micro_batches(consumed)
        for index, (first, count) in enumerate(batches):
            batch = sampler.samples(first, count).to(dev, non_blocking=True)
            loss = self.engine.module.token_losses(batch[:, :-1], batch[:, 1:]).mean()
            self.engine.backward(loss)
            losses.append(loss.detach())
            if index < len(batches) - 1:
                self.engine.step()  # inside the accumulation: no update
        loss_sum = torch.stack(losses).double().sum()
        if self.clips_itself:  # decide before the update
            norm = clip_grad_norm_(self.engine.module.parameters(), max_norm=self.config.train.grad_clip or math.inf,
                                   mpu=self.engine.mpu)
            loss, grad_norm = self._global(loss_sum, norm)
            if not finite(loss, grad_norm):
                for param in self.engine.module.parameters():
                    param.grad = None  # AdamW leaves a parameter without a gradient as it is
            self.engine.step()
            return loss, grad_norm
        self.engine.step()  # DeepSpeed's optimizer skips a non-finite gradient norm itself
        norm = self.engine.get_global_grad_norm()
        loss, grad_norm = self._global(loss_sum, torch.as_tensor(0.0 if norm is None else norm, device=dev))
        return loss, None if norm is None else grad_norm

    def _global(self, loss_sum: torch.Tensor, norm: torch.Tensor) -> tuple[float, float]:
        """(mean loss of the global batch, gradient norm) in one collective and one read."""
        both = torch.stack([loss_sum, norm.double().reshape(())])
        all_reduce(both, "dp")
        loss_total, norm_total = both.tolist()
        return loss_total / (self.layout.accumulation * self.layout.dp), norm_total / self.layout.dp

    def validate(self) -> float:
        return validation_loss(self.engine.module, self.valid_sampler, self.val_samples, self.layout.micro)

    def save(self, step: int, train_loss: float, val_loss: float, health: Health) -> Checkpoint:
        state = CheckpointState(
            tokens=step * self.batch_tokens, step=step, consumed_samples=step * self.layout.global_samples,
            config_hash=self.config.hash(), tp=self.config.parallel.tp, dp=self.layout.dp,
            vocab_size=self.data.vocab_size, activation=self.config.model.activation,
            train_loss=train_loss, val_loss=val_loss, health=health.record(),
        )
        return save_checkpoint(self.engine, self.config, self.run, state)


def train(config: RunConfig, run: RunDir, data: PreparedData, callbacks: Sequence[Callback] = ()) -> Checkpoint:
    """Train (or resume) one run into its directory; return its newest checkpoint.

    Every rank calls it inside the run's process groups, after rank 0 has claimed the
    directory (`start.train_on_rank` does both). Callbacks run on rank 0.

    A step whose loss or gradient norm is not finite is skipped (no update) while
    `train.skip_nonfinite_steps` allows, and otherwise stops the run with NonFiniteError
    before anything after it is saved; the run directory records the reason (failed.json).
    """
    trainer = Trainer(config, run, data)
    callbacks = callbacks if trainer.is_main else ()

    def log(point: TrainPoint) -> None:
        if trainer.is_main:
            run.append_metric(point.record())
        for callback in callbacks:
            callback.on_log(point)

    resumed = trainer.resume()
    step = resumed.step if resumed else 0
    health = Health.from_manifest(resumed.manifest if resumed else None)
    if trainer.is_main:
        run.clear_failure()
    for callback in callbacks:
        callback.on_start(trainer.plan(step, resumed))
    started, start_step = time.time(), step
    try:
        while step < trainer.total_steps:
            factor = trainer.lr_factor(step)
            train_loss, grad_norm = trainer.step(step)
            step += 1
            tokens = step * trainer.batch_tokens
            at_checkpoint = tokens in trainer.schedule
            step_finite = finite(train_loss, grad_norm)
            if step_finite:
                health.finite_step(train_loss)
            else:
                warning = health.nonfinite_step(step, tokens, train_loss, grad_norm, config.train.skip_nonfinite_steps)
                if trainer.is_main:
                    print(warning, flush=True)
            if step % config.train.log_every == 0 or at_checkpoint:
                rate = (step - start_step) * trainer.batch_tokens / max(time.time() - started, 1e-9)
                log(TrainPoint("train", step, tokens, train_loss, lr=trainer.base_lrs[1] * factor, tokens_per_s=rate,
                               grad_norm=grad_norm, loss_spikes=health.loss_spikes,
                               skipped_steps=health.skipped_steps, skipped=None if step_finite else True))
            if at_checkpoint:
                val_loss = trainer.validate()
                if not finite(val_loss):
                    raise NonFiniteError(f"training diverged at step {step} (tokens {tokens:,}): validation loss "
                                         f"{val_loss:.4g} (not finite); no checkpoint written after the last "
                                         "finite one")
                log(TrainPoint("val", step, tokens, val_loss))
                checkpoint = trainer.save(step, train_loss, val_loss, health)
                for callback in callbacks:
                    callback.on_checkpoint(checkpoint)
    except NonFiniteError as error:
        if trainer.is_main:
            run.mark_failed(str(error))
        raise
    dist.barrier()
    return run.checkpoints()[-1]
