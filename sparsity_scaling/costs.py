"""What a run costs before it runs: training FLOPs, GPU-hours and checkpoint storage.

FLOPs follow the PaLM convention (Chowdhery et al. 2022, appendix B), the one MFU figures
are quoted in: per trained token, 6 N for the matrix multiplies of the N parameters that
multiply activations (non-embedding weights plus the tied output projection, V x d; the
input embedding is a lookup), plus 12 L d T for attention scores and their weighting
(L layers, width d, sequence length T; causal masking is not subtracted).

    training FLOPs = D (6 (N_non_embedding + V d) + 12 L d T)
    GPU-hours      = FLOPs / (MFU x peak FLOP/s) / 3600

Evaluation (`EvaluationCost`): a forward pass costs a third of a trained token's FLOPs.
Each checkpoint's PPL-p% search is counted at EVAL_FORWARD_PASSES forward passes over the
evaluation tokens (the dense pass, three or four sparse ones, the threshold searches: 4.6 to
5.8 measured by `tools/bench/ppl_p_speed.py` on the README's models; up to 8.4 where the PPL
ratio is flat and noisy near the target); the stabilising strategy searches once more over
the `last` newest (EVAL_FORWARD_PASSES for each of them) and then measures every checkpoint
at its CETT (a sparse pass for those it holds, a dense and a sparse pass for the others):

    evaluation forward passes = C x F + last x (F + 1) + (C - last) x 2      (C checkpoints, F = 6)
    evaluation FLOPs          = passes x eval_tokens x training FLOPs per token / 3

Checkpoint storage: every checkpoint keeps its fp32 weights (4 bytes per parameter); only
the newest `checkpoint.keep_engine` also keep DeepSpeed's state: the module weights (fp32, or
bf16 on GPUs) plus AdamW's fp32 moments (8 bytes) and, in bf16, its fp32 master copy (4).
Measured on the micro run (fp32): engine state 3.03x the weights file; estimate 3.0x.

How a run lays out (`BatchSplit`): the global batch of batch_tokens / seq_len sequences
splits over dp data-parallel ranks into micro-batches of train.micro_batch_size, so dp x
micro must divide it. Peak memory of one rank (`MemoryEstimate`): its share of the weights,
gradients and optimizer state under its ZeRO stage, the activations its backward pass keeps
(counted tensor by tensor for this model, below), the logits and loss, and an allowance for
the CUDA runtime. The README's "Preflight" section writes the formula out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig, TrainConfig, checkpoint_tokens

H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16
DEFAULT_MFU = 0.4

# Dense bf16 peaks (vendor datasheets, no sparsity), by a name torch.cuda.get_device_name contains.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": H100_BF16_PEAK_TFLOPS, "A100": 312.0,
               "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.0}


def device_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (the first key it contains), or None."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def total_params(config: RunConfig, vocab_size: int) -> int:
    return config.model.non_embedding_params() + vocab_size * config.model.d_model


def flops_per_token(config: RunConfig, vocab_size: int) -> float:
    m = config.model
    return 6.0 * (m.non_embedding_params() + vocab_size * m.d_model) + 12.0 * m.n_layers * m.d_model * config.data.seq_len


def engine_bytes_per_param(bf16: bool) -> int:
    return 2 + 4 + 8 if bf16 else 4 + 8


@dataclass(frozen=True)
class RunCost:
    tokens: int  # trained tokens (the budget snapped to whole steps)
    flops: float
    gpu_hours: float
    checkpoints: int
    storage_bytes: int  # all checkpoints under the retention policy

    @classmethod
    def of(cls, config: RunConfig, vocab_size: int, bf16: bool, mfu: float = DEFAULT_MFU,
           peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> "RunCost":
        schedule = checkpoint_tokens(config)
        tokens = schedule[-1]
        flops = tokens * flops_per_token(config, vocab_size)
        params = total_params(config, vocab_size)
        engines = min(config.checkpoint.keep_engine, len(schedule))
        storage = len(schedule) * 4 * params + engines * engine_bytes_per_param(bf16) * params
        return cls(tokens, flops, flops / (mfu * peak_tflops * 1e12) / 3600, len(schedule), storage)


EVAL_FORWARD_PASSES = 6.0  # a PPL-p% search, in forward passes over the evaluation tokens (see above)


@dataclass(frozen=True)
class EvaluationCost:
    """What measuring a run costs beside its training (formula in the module docstring)."""

    forward_passes: float  # over the evaluation tokens, all jobs of the run together
    flops: float
    gpu_hours: float

    @classmethod
    def of(cls, config: RunConfig, vocab_size: int, eval_tokens: int, last: int, mfu: float = DEFAULT_MFU,
           peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> "EvaluationCost":
        checkpoints = len(checkpoint_tokens(config))
        kept = min(last, checkpoints)
        passes = checkpoints * EVAL_FORWARD_PASSES + kept * (EVAL_FORWARD_PASSES + 1) + (checkpoints - kept) * 2
        flops = passes * eval_tokens * flops_per_token(config, vocab_size) / 3
        return cls(passes, flops, flops / (mfu * peak_tflops * 1e12) / 3600)


def ffn_flop_fraction(activation_ratio: float, relu_family: bool) -> float:
    """The share of a gated FFN's multiply-adds that the sparse decoding FFN
    (`sparse_ffn.SparseFFN`) does at the intermediate site and activation ratio r: the gate
    projection runs dense, the down projection for the kept neurons, the up projection dense
    or, in the ReLU family, for the neurons whose gate is positive, at least the kept ones.
    So (1 + 2r) / 3 for ReLU (a lower bound) and (2 + r) / 3 otherwise; its inverse bounds
    the FFN's speedup."""
    return (1 + 2 * activation_ratio) / 3 if relu_family else (2 + activation_ratio) / 3


def trains_in_bf16(train: TrainConfig, on_gpu: bool) -> bool:
    """Whether a run trains in bf16: `train.dtype`, where `auto` means bf16 on GPUs."""
    return train.dtype == "bf16" or (train.dtype == "auto" and on_gpu)


@dataclass(frozen=True)
class BatchSplit:
    """How one global batch splits over the data-parallel ranks and their micro-batches: the
    arithmetic `train.loop.Layout` trains with, here without process groups, so that a grid
    can be checked before anything starts."""

    batch_tokens: int
    seq_len: int
    dp: int
    micro: int

    @classmethod
    def of(cls, config: RunConfig, dp: int) -> "BatchSplit":
        return cls(config.train.batch_tokens, config.data.seq_len, dp, config.train.micro_batch_size)

    @property
    def sequences(self) -> int:
        """Sequences of one global batch."""
        return self.batch_tokens // self.seq_len

    @property
    def divides(self) -> bool:
        return self.sequences % (self.dp * self.micro) == 0

    @property
    def accumulation(self) -> int:
        """Micro-steps of each rank per optimizer step."""
        return self.sequences // (self.dp * self.micro)

    def micro_sizes(self) -> list[int]:
        """Every micro-batch size that splits the batch at this dp (none where dp does not divide it)."""
        if self.sequences % self.dp:
            return []
        per_rank = self.sequences // self.dp
        return [m for m in range(1, per_rank + 1) if per_rank % m == 0]

    def refusal(self) -> str:
        """Why the batch does not split, in the run config's fields."""
        return (f"train.batch_tokens {self.batch_tokens} gives {self.sequences} sequences per batch, not divisible "
                f"by data-parallel size {self.dp} x train.micro_batch_size {self.micro}")


GB = 1e9
# What a CUDA process holds beside its tensors: the context, cuBLAS workspaces, NCCL's buffers
# and DeepSpeed's communication buckets. A rough allowance, on GPUs only.
RUNTIME_BYTES = int(2 * GB)

# Memory of one GPU by Ray's accelerator type (node resource `accelerator_type:NAME`), nominal
# GB as sold. Types whose memory varies (A100, V100) are left out: the flag gives it.
DEFAULT_GPU_MEMORY_GB = 80  # an H100: what `grid plan` checks against, and a GPU of unknown type
GPU_MEMORY_GB = {"H200": 141, "H100": 80, "H20": 96, "B200": 180, "A100-80G": 80, "A100-40G": 40,
                 "L40S": 48, "L4": 24, "A10G": 24, "T4": 16}


def activation_bytes_per_token(config: RunConfig, vocab_size: int, bf16: bool) -> tuple[float, float, float]:
    """What one token of a micro-batch keeps for the backward pass, in bytes on one rank:
    (one transformer block, what a checkpointed block keeps, the final norm with the logits
    and loss). Counted tensor by tensor for `model.MiniCPM` (d = d_model, f = d_ff, t = tp,
    a = 2 bytes in bf16, 4 in fp32), without sequence parallelism (norms are not split):

    - each RMSNorm 12 d: it computes in fp32 (its input upcast for the square and again for
      the scaling, 4 + 4 in bf16, or the fp32 input itself, once) and keeps its scaled value
      and output in the model's precision;
    - attention 5 a d / t: q and k after RoPE, v, SDPA's output and the output projection's
      input, a copy of it where SDPA's output is laid out batch-first, as CUDA's kernels
      write it (on CPU a view: one tensor less). SDPA runs flash or memory-efficient kernels:
      no seq x seq matrix is kept, only a log-sum-exp, 4 bytes per head;
    - the gated FFN 3 a f / t for ReLU (gate, up, their product) and 4 a f / t for SiLU and
      GELU, which also keep the gate before the activation;
    - checkpointed, a block keeps only its input, a d;
    - the head: the final norm (12 d) and the logits, which the loss keeps in fp32 (4 V / t),
      beside their bf16 original while it is cast (2 V / t).
    """
    m, t = config.model, config.parallel.tp
    a = 2 if bf16 else 4
    d, f = m.d_model, m.d_ff
    block = 2 * 12 * d + 5 * a * d / t + 4 * m.n_heads / t + (3 if m.activation == "relu" else 4) * a * f / t
    return block, a * d, 12 * d + (4 + (2 if bf16 else 0)) * vocab_size / t


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak bytes one training rank holds: its shares of the model state and the
    activations of one micro-batch (see `of`). A count of the large tensors, not a
    measurement: allocator fragmentation and transient buffers of the backward pass come on
    top, which is why `RUNTIME_BYTES` is added on GPUs and the device's nominal size is the
    limit."""

    weights: int
    gradients: int
    optimizer: int  # AdamW's two fp32 moments, and the fp32 master weights in bf16 or under ZeRO
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.runtime

    def describe(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits), ("runtime", self.runtime)]
        return " + ".join(f"{name} {value / GB:.1f}" for name, value in parts if value) + " GB"

    @classmethod
    def of(cls, config: RunConfig, vocab_size: int, dp: int, bf16: bool, on_gpu: bool) -> "MemoryEstimate":
        """Per parameter, over tp ranks (the vocabulary and every matrix are split):
        weights a; gradients 4, or in bf16 2 plus the fp32 copy the optimizer steps on (4),
        split over dp under ZeRO 2; optimizer 8 (moments) plus 4 (fp32 master) in bf16 or
        under ZeRO, split over dp under ZeRO 1 and 2. Activations: micro x seq tokens times
        the blocks' bytes per token (`activation_bytes_per_token`): every block's, or with
        activation checkpointing every block's input plus the one block recomputed."""
        t, zero = config.parallel.tp, config.train.zero_stage_for(bf16)
        params = total_params(config, vocab_size) / t
        a = 2 if bf16 else 4
        gradients = (2 + 4 if bf16 else 4) / (dp if zero >= 2 else 1)
        optimizer = (8 + (4 if bf16 or zero >= 1 else 0)) / (dp if zero >= 1 else 1)
        block, kept, head = activation_bytes_per_token(config, vocab_size, bf16)
        layers = config.model.n_layers
        per_token = layers * kept + block if config.train.activation_checkpointing else layers * block
        tokens = config.train.micro_batch_size * config.data.seq_len
        return cls(weights=round(params * a), gradients=round(params * gradients), optimizer=round(params * optimizer),
                   activations=round(tokens * per_token), logits=round(tokens * head),
                   runtime=RUNTIME_BYTES if on_gpu else 0)
