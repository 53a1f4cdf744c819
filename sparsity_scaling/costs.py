"""What a run costs before it runs: training FLOPs, GPU-hours and checkpoint storage.

FLOPs follow the PaLM convention (Chowdhery et al. 2022, appendix B), the one MFU figures
are quoted in: per trained token, 6 N for the matrix multiplies of the N parameters that
multiply activations (non-embedding weights plus the tied output projection, V x d; the
input embedding is a lookup), plus 12 L d T for attention scores and their weighting
(L layers, width d, sequence length T; causal masking is not subtracted).

    training FLOPs = D (6 (N_non_embedding + V d) + 12 L d T)
    GPU-hours      = FLOPs / (MFU x peak FLOP/s) / 3600

Checkpoint storage: every checkpoint keeps its fp32 weights (4 bytes per parameter); only
the newest `checkpoint.keep_engine` also keep DeepSpeed's state: the module weights (fp32, or
bf16 on GPUs) plus AdamW's fp32 moments (8 bytes) and, in bf16, its fp32 master copy (4).
Measured on the micro run (fp32): engine state 3.03x the weights file; estimate 3.0x.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig, checkpoint_tokens

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


def ffn_flop_fraction(activation_ratio: float, relu_family: bool) -> float:
    """The share of a gated FFN's multiply-adds that the sparse decoding FFN
    (`sparse_ffn.SparseFFN`) does at the intermediate site and activation ratio r: the gate
    projection runs dense, the down projection for the kept neurons, the up projection dense
    or, in the ReLU family, for the neurons whose gate is positive, at least the kept ones.
    So (1 + 2r) / 3 for ReLU (a lower bound) and (2 + r) / 3 otherwise; its inverse bounds
    the FFN's speedup."""
    return (1 + 2 * activation_ratio) / 3 if relu_family else (2 + activation_ratio) / 3
