"""The training loop: one DeepSpeed engine over a tensor x data parallel MiniCPM.

Every rank runs `train()`. The global batch at consumed-sample count s is samples
s .. s+B-1 of the deterministic sampler; data-parallel rank r takes its contiguous share and
splits it into micro-batches, so any data-parallel size trains on the same global batches.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import RunConfig, checkpoint_tokens
from ..data import PreparedData
from ..data.indexed import open_token_stream
from ..data.sampler import WindowSampler
from ..errors import UserError
from ..model import MiniCPM
from ..parallel import DeepSpeedMPU, device, full_state_dict, init_parallel
from .checkpoint import (
    TMP_PREFIX,
    checkpoint_name,
    claim_run_dir,
    finish_checkpoint,
    list_checkpoints,
    remove_partial_checkpoints,
    start_checkpoint,
    write_json_atomic,
)
from .schedule import wsd_factor


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
        dp = ps.get_data_parallel_world_size()
        global_samples = config.train.batch_tokens // config.data.seq_len
        micro = config.train.micro_batch_size
        if global_samples % (dp * micro):
            raise UserError(
                f"train.batch_tokens {config.train.batch_tokens} gives {global_samples} "
                f"sequences per batch, not divisible by data-parallel size {dp} x "
                f"train.micro_batch_size {micro}"
            )
        return cls(global_samples, micro, global_samples // (dp * micro), dp, ps.get_data_parallel_rank())

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


def _deepspeed_config(config: RunConfig, layout: Layout, bf16: bool) -> dict:
    cfg = config.train
    return {
        "train_batch_size": layout.global_samples,
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [cfg.beta1, cfg.beta2],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


class Metrics:
    """metrics.jsonl of a run: appended by rank 0, cut back to a checkpoint on resume."""

    def __init__(self, run_dir: Path, active: bool):
        self.path = run_dir / "metrics.jsonl"
        self.active = active

    def truncate_after(self, tokens: int) -> None:
        """Drop points logged after the checkpoint we resume from: no point appears twice."""
        if not self.active or not self.path.exists():
            return
        keep = [
            line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["tokens"] <= tokens
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, **point) -> None:
        if self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(point) + "\n")


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@torch.no_grad()
def validation_loss(model: MiniCPM, sampler: WindowSampler, num_samples: int, micro: int) -> float:
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
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    model.train()
    return (total[0] / total[1]).item()


def train(config: RunConfig, run_dir: str | Path, data: PreparedData, on_event=None) -> Path:
    """Train (or resume) one run into run_dir; return the newest checkpoint's path.

    `on_event(kind, path)` is called on rank 0 after points are logged ("log") and after a
    checkpoint is complete ("checkpoint"): the launcher delivers metrics and queues
    evaluations from it.
    """
    notify = on_event if (on_event is not None and dist.get_rank() == 0) else (lambda kind, path: None)
    init_parallel(config.parallel.tp)
    run_dir = Path(run_dir)
    is_main = dist.get_rank() == 0
    if is_main:
        claim_run_dir(run_dir, config.hash(), config.to_yaml())
        remove_partial_checkpoints(run_dir)
        shutil.copyfile(data.tokenizer, run_dir / "tokenizer.model")
        write_json_atomic(run_dir / "data.json", data.record)
    dist.barrier()

    layout = Layout.of(config)
    bf16 = config.train.dtype == "bf16" or (config.train.dtype == "auto" and torch.cuda.is_available())
    torch.manual_seed(config.train.seed)
    model = MiniCPM(config.model, data.vocab_size).to(device())
    groups = _param_groups(model, config)
    base_lrs = [g["lr"] for g in groups]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups, config=_deepspeed_config(config, layout, bf16),
        mpu=DeepSpeedMPU(),
    )

    train_sampler = WindowSampler(open_token_stream(data.train_prefix), config.data.seq_len, config.train.seed)
    valid_sampler = WindowSampler(open_token_stream(data.valid_prefix), config.data.seq_len, 0, shuffle=False)
    val_samples = max(1, min(valid_sampler.num_windows, config.data.val_tokens // config.data.seq_len))
    schedule = checkpoint_tokens(config)
    batch_tokens = layout.global_samples * config.data.seq_len
    total_steps = schedule[-1] // batch_tokens
    metrics = Metrics(run_dir, is_main)

    step = 0
    done = list_checkpoints(run_dir)
    if done:
        latest = done[-1]
        for key, expected in (("tp", config.parallel.tp), ("dp", layout.dp)):
            if latest.manifest.get(key) != expected:
                raise UserError(
                    f"{latest.path}: written with {key}={latest.manifest.get(key)}, cannot resume "
                    f"with {key}={expected}"
                )
        engine.load_checkpoint(str(latest.path), tag="engine")
        step = latest.step
        metrics.truncate_after(latest.tokens)
        if is_main and step >= total_steps:
            print(f"already complete: {latest.path.name}; nothing to train", flush=True)
        elif is_main:
            print(f"resuming from {latest.path.name} (step {step})", flush=True)
    if is_main:
        params = config.model.non_embedding_params()
        print(
            f"training {config.model.name}: {params / 1e6:.2f}M non-embedding parameters, "
            f"{total_steps} steps of {batch_tokens:,} tokens, tp={config.parallel.tp} dp={layout.dp}, "
            f"{'bf16' if bf16 else 'fp32'}, {len(schedule)} checkpoints",
            flush=True,
        )

    dev = device()
    started, start_step = time.time(), step
    while step < total_steps:
        factor = wsd_factor(step, total_steps, config.train)
        for group, base in zip(engine.optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        consumed = step * layout.global_samples
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for first, count in layout.micro_batches(consumed):
            batch = train_sampler.samples(first, count).to(dev)
            loss = engine.module.token_losses(batch[:, :-1], batch[:, 1:]).mean()
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
        step += 1
        tokens = step * batch_tokens
        if step % config.train.log_every == 0 or tokens in schedule:
            dist.all_reduce(loss_sum, group=ps.get_data_parallel_group())
            train_loss = (loss_sum / (layout.accumulation * layout.dp)).item()
            rate = (step - start_step) * batch_tokens / max(time.time() - started, 1e-9)
            lr = base_lrs[1] * factor
            metrics.log(kind="train", step=step, tokens=tokens, loss=train_loss, lr=lr, tokens_per_s=rate)
            notify("log", run_dir)
            if is_main:
                eta = (total_steps - step) * batch_tokens / max(rate, 1e-9)
                print(
                    f"step {step}/{total_steps} | tokens {tokens:,} | loss {train_loss:.4f} | "
                    f"lr {lr:.2e} | {rate:,.0f} tok/s | ETA {_format_duration(eta)}",
                    flush=True,
                )
        if tokens in schedule:
            val = validation_loss(engine.module, valid_sampler, val_samples, layout.micro)
            metrics.log(kind="val", step=step, tokens=tokens, loss=val)
            path = _save(engine, config, run_dir, layout, data, step, tokens, train_loss, val)
            if is_main:
                print(f"checkpoint {path.name} | val loss {val:.4f}", flush=True)
            notify("checkpoint", path)
    final = list_checkpoints(run_dir)[-1].path
    dist.barrier()
    return final


def _save(engine, config, run_dir, layout, data, step, tokens, train_loss, val_loss) -> Path:
    """All ranks write DeepSpeed shards into one temporary directory; rank 0 seals it."""
    is_main = dist.get_rank() == 0
    manifest = {
        "format": 1,
        "tokens": tokens,
        "step": step,
        "consumed_samples": step * layout.global_samples,
        "config_hash": config.hash(),
        "tp": config.parallel.tp,
        "dp": layout.dp,
        "vocab_size": data.vocab_size,
        "activation": config.model.activation,
        "train_loss": train_loss,
        "val_loss": val_loss,
    }
    weights = full_state_dict(engine.module)  # collective: every rank takes part
    tmp = run_dir / "checkpoints" / f"{TMP_PREFIX}{checkpoint_name(tokens)}"
    if is_main:
        start_checkpoint(run_dir, tokens)
    dist.barrier()
    try:
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        dist.barrier()
        if is_main:
            torch.save(weights, tmp / "model.pt")
            (tmp / "config.yaml").write_text(config.to_yaml())
            finish_checkpoint(tmp, manifest)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return run_dir / "checkpoints" / checkpoint_name(tokens)
