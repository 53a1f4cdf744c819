"""Benchmark: training throughput and MFU of our stack against a plain PyTorch reference.

Ours is the real training path: `train.loop.Trainer` (MiniCPM on megatron-core layers, the
DeepSpeed engine, the run's micro-batching, learning-rate schedule and gradient clipping)
fed synthetic tokens. The reference is the same model and batch as one plain module
(`torch.nn.Linear`, the same scaled-dot-product attention), `torch.optim.AdamW` (fused on a
GPU) and `clip_grad_norm_`, no DeepSpeed, no megatron layers; in bf16 it runs under
`torch.autocast` with fp32 weights, as DeepSpeed keeps fp32 master weights.

    python tools/bench/train_throughput.py configs/models/tiny.yaml --steps 20
    python tools/bench/train_throughput.py configs/models/0.4b.yaml --set train.micro_batch_size=1 \\
        --set train.batch_tokens=32768 --steps 20

MFU = tokens/s x FLOPs per token / peak FLOP/s. FLOPs per token follow PaLM's convention
(`sparsity_scaling.costs.flops_per_token`): 6 (N + V d) + 12 L d T, N non-embedding
parameters, V d the tied output projection, L layers, width d, sequence length T. The peak
comes from `costs.PEAK_TFLOPS` by device name, or `--peak-tflops`; on a CPU MFU is printed
only with `--peak-tflops`. Runs on one device (tp 1, dp 1).
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]


class RandomTokens:
    """Synthetic data with what `Trainer` asks of prepared data: throughput does not depend
    on which tokens are trained on."""

    def __init__(self, vocab_size: int, seq_len: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_windows = 1 << 30
        self.decay = None  # no separate decay-stage data

    def sampler(self, split: str, seq_len: int, seed: int, size: int) -> "RandomTokens":
        return self

    def samples(self, first: int, count: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(first)
        return torch.randint(0, self.vocab_size, (count, self.seq_len + 1), generator=generator)


# ------------------------------------------------------------------ the plain reference


class ReferenceBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, activation):
        super().__init__()
        self.heads, self.act = heads, activation
        self.attn_norm, self.ffn_norm = torch.nn.RMSNorm(d, eps=1e-5), torch.nn.RMSNorm(d, eps=1e-5)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate_up = torch.nn.Linear(d, 2 * d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d, bias=False)

    def forward(self, h, cos, sin):
        batch, seq, d = h.shape
        q, k, v = self.qkv(self.attn_norm(h)).view(batch, seq, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, d)
        h = h + self.o(y)
        gate, up = self.gate_up(self.ffn_norm(h)).chunk(2, dim=-1)
        return h + self.down(self.act(gate) * up)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class ReferenceModel(torch.nn.Module):
    """The MiniCPM shapes as nanoGPT would write them: tied embedding, pre-norm blocks,
    RoPE, causal SDPA, gated FFN."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        from sparsity_scaling.model.minicpm import ACTIVATIONS, rope_tables

        m = config.model
        self.embed = torch.nn.Embedding(vocab_size, m.d_model)
        self.blocks = torch.nn.ModuleList(ReferenceBlock(m.d_model, m.n_heads, m.d_ff, ACTIVATIONS[m.activation])
                                          for _ in range(m.n_layers))
        self.norm = torch.nn.RMSNorm(m.d_model, eps=1e-5)
        # MiniCPM's initialisation (muP: hidden weights shrink with width); PyTorch's default
        # init would train into other values, and on a CPU into slow denormal floats
        hidden_std = m.init_std / math.sqrt(m.d_model / m.dim_model_base)
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=hidden_std)
        torch.nn.init.normal_(self.embed.weight, std=m.init_std)
        cos, sin = rope_tables(config.data.seq_len, m.head_dim, m.rope_theta, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        cos, sin = self.cos[: tokens.shape[1]].to(h.dtype), self.sin[: tokens.shape[1]].to(h.dtype)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = F.linear(self.norm(h), self.embed.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step after warm-up, peak memory in bytes: device memory, or RSS on CPU)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated()
    import psutil  # (a CUDA image may lack it; it is needed only here)

    return seconds, psutil.Process().memory_info().rss


def ours(config, run_dir: Path, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    from sparsity_scaling.rundir import RunDir
    from sparsity_scaling.train.loop import Trainer

    trainer = Trainer(config, RunDir(run_dir), RandomTokens(config.data.vocab_size, config.data.seq_len))

    def step(i: int) -> None:
        trainer.lr_factor(i)
        trainer.step(i)

    try:
        return _timed(step, steps, warmup, device)
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def reference(config, steps: int, warmup: int, device: torch.device, bf16: bool) -> tuple[float, float]:
    from sparsity_scaling.model.minicpm import padded_vocab_size
    from sparsity_scaling.train.loop import Layout

    torch.manual_seed(config.train.seed)
    model = ReferenceModel(config, padded_vocab_size(config.data.vocab_size)).to(device)
    t = config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    layout = Layout.of(config)
    data = RandomTokens(config.data.vocab_size, config.data.seq_len)

    def step(i: int) -> None:
        for first, count in layout.micro_batches(i * layout.global_samples):
            batch = data.samples(first, count).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch[:, :-1], batch[:, 1:]) / layout.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, steps, warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a run config, e.g. configs/models/tiny.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: known GPUs' dense bf16)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from sparsity_scaling.config import load_config
    from sparsity_scaling.costs import device_peak_tflops, flops_per_token
    from sparsity_scaling.parallel import device as current_device
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel

    config = load_config(args.config, args.set)
    init_parallel(1)
    device = current_device()
    bf16 = config.train.dtype == "bf16" or (config.train.dtype == "auto" and device.type == "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (device_peak_tflops(name) if device.type == "cuda" else None)
    batch_tokens = (config.train.batch_tokens // config.data.seq_len) * config.data.seq_len
    per_token = flops_per_token(config, config.data.vocab_size)
    print(f"{config.model.name}: {config.model.non_embedding_params() / 1e6:.1f}M non-embedding parameters, "
          f"{batch_tokens:,} tokens per step (micro-batch {config.train.micro_batch_size} x {config.data.seq_len}), "
          f"{'bf16' if bf16 else 'fp32'} on {name}; {args.steps} timed steps after {args.warmup}", flush=True)
    print(f"FLOPs per token 6 (N + V d) + 12 L d T = {per_token:.4g}; peak "
          + (f"{peak:g} TFLOP/s" if peak else "unknown (give --peak-tflops for MFU)"), flush=True)

    figures = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for label, run in (("ours", lambda: ours(config, Path(run_dir), args.steps, args.warmup, device)),
                           ("reference", lambda: reference(config, args.steps, args.warmup, device, bf16))):
            seconds, memory = run()
            rate = batch_tokens / seconds
            mfu = rate * per_token / (peak * 1e12) if peak else math.nan
            figures[label] = {"tokens_per_s": rate, "step_s": seconds, "mfu": mfu, "peak_memory_gb": memory / 1e9}
            print(f"{label:>9}: {rate:12,.0f} tokens/s  {seconds * 1e3:9.1f} ms/step  MFU "
                  f"{'n/a' if math.isnan(mfu) else f'{mfu:.1%}'}  peak {'memory' if device.type == 'cuda' else 'RSS'} "
                  f"{memory / 1e9:.2f} GB", flush=True)
    ratio = figures["ours"]["tokens_per_s"] / figures["reference"]["tokens_per_s"]
    print(f"ours / reference tokens/s: {ratio:.3f}")
    if args.json:
        from sparsity_scaling.files import write_json_atomic

        # strict JSON: an unknown MFU is null
        write_json_atomic(args.json, {"config": args.config, "overrides": args.set, "device": name,
                                      "dtype": "bf16" if bf16 else "fp32", "batch_tokens": batch_tokens,
                                      "flops_per_token": per_token, "peak_tflops": peak, "ratio": ratio, **figures})
    shutdown_parallel()


if __name__ == "__main__":
    main()
