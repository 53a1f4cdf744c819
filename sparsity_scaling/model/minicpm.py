"""A MiniCPM-style decoder on megatron-core tensor-parallel layers, in the spirit of nanoGPT.

Architecture (the Sparsing Law paper's): tied vocab-parallel embedding scaled by scale_emb;
pre-RMSNorm blocks whose residual branches are scaled by scale_depth / sqrt(num_layers);
multi-head attention with RoPE (as many KV heads as query heads); a gated FFN
a = act(W_gate x) * (W_in x), FFN(x) = W_out a; logits from h / (d_h / dim_model_base).

Tensors inside the model are [seq, batch, hidden], megatron's layout. Column-parallel
layers split their outputs (heads, FFN neurons) across ranks; row-parallel layers take the
split inputs and all-reduce their outputs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from ..config import ModelConfig
from .probe import FFNTrace, Probe

ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}
VOCAB_MULTIPLE = 128  # padding that any power-of-two TP size up to 128 divides


def padded_vocab_size(vocab_size: int) -> int:
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _normal(std: float | None):
    """Megatron's init method: a normal draw, or nothing (std None: the weights will be loaded)."""
    if std is None:
        return lambda weight: weight
    return lambda weight: torch.nn.init.normal_(weight, mean=0.0, std=std)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [seq, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [batch, heads, seq, head_dim] (Llama convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, std: float | None):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.n_heads // mp.tensor_model_parallel_size
        column = dict(config=mp, init_method=_normal(std), bias=False, gather_output=False)
        self.q = ColumnParallelLinear(d, d, **column)
        self.k = ColumnParallelLinear(d, d, **column)
        self.v = ColumnParallelLinear(d, d, **column)
        self.o = RowParallelLinear(
            d, d, config=mp, init_method=_normal(std), bias=False,
            input_is_parallel=True, skip_bias_add=True,
        )

    def forward(self, x, cos, sin):
        seq, batch, _ = x.shape

        def heads(t):  # [seq, batch, local] -> [batch, heads, seq, head_dim]
            return t.view(seq, batch, self.local_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(self.q(x)[0]), heads(self.k(x)[0]), heads(self.v(x)[0])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.permute(2, 0, 1, 3).reshape(seq, batch, self.local_heads * self.head_dim)
        return self.o(y)[0]


class FFN(torch.nn.Module):
    """Gated FFN; neuron i outputs W_out[:, i] * a_i. Exposes a probe (see probe.py)."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, std: float | None, layer: int):
        super().__init__()
        self.layer = layer
        self.act = ACTIVATIONS[cfg.activation]
        column = dict(config=mp, init_method=_normal(std), bias=False, gather_output=False)
        self.gate = ColumnParallelLinear(cfg.d_model, cfg.d_ff, **column)
        self.up = ColumnParallelLinear(cfg.d_model, cfg.d_ff, **column)
        self.down = RowParallelLinear(
            cfg.d_ff, cfg.d_model, config=mp, init_method=_normal(std), bias=False,
            input_is_parallel=True, skip_bias_add=True,
        )
        self.local_neurons = cfg.d_ff // mp.tensor_model_parallel_size
        self.neuron_offset = ps.get_tensor_model_parallel_rank() * self.local_neurons
        self.probe: Probe | None = None

    def output_weight(self) -> torch.Tensor:
        """W_out over the local neurons, [d_model, local_neurons]: neuron i writes column i."""
        return self.down.weight.detach().float()

    def output_weight_norms(self) -> torch.Tensor:
        """||W_out[:, i]|| for each local neuron i: neuron i's output norm is |a_i| times this."""
        return self.output_weight().norm(dim=0)

    def forward(self, x):
        probe = self.probe
        if probe is not None:
            x = _or(probe.on_input(self, x), x)
        gate = self.act(self.gate(x)[0])
        up = self.up(x)[0]
        a = gate * up
        if probe is not None:
            a = _or(probe.on_activation(self, FFNTrace(self.layer, x, gate, up, a)), a)
        return self.down(a)[0]


def _or(replacement, original):
    return original if replacement is None else replacement


class Block(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, std: float | None, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, mp, std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FFN(cfg, mp, std, layer)
        self.residual_scale = cfg.scale_depth / math.sqrt(cfg.n_layers)

    def forward(self, h, cos, sin):
        h = h + self.attn(self.attn_norm(h), cos, sin) * self.residual_scale
        return h + self.ffn(self.ffn_norm(h)) * self.residual_scale


class MiniCPM(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, params_dtype=torch.float32, initialize: bool = True):
        """`initialize=False` leaves the weights unset, for a caller that loads every one of
        them (a checkpoint): the random initialisation would be thrown away."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = padded_vocab_size(vocab_size)
        mp = ModelParallelConfig(
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            use_cpu_initialization=True,  # TP-invariant init, and it runs on CPU
            perform_initialization=True,  # also without `initialize`: it marks the weights' TP sharding
            params_dtype=params_dtype,
        )
        self.width_mult = cfg.d_model / cfg.dim_model_base
        hidden_std = cfg.init_std / math.sqrt(self.width_mult) if initialize else None  # muP: shrinks with width
        self.embed = VocabParallelEmbedding(
            self.vocab_size, cfg.d_model, init_method=_normal(cfg.init_std if initialize else None), config=mp
        )
        self.layers = torch.nn.ModuleList(Block(cfg, mp, hidden_std, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self._rope_cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None
        self.checkpoint_blocks = False  # activation checkpointing: recompute blocks in backward

    @property
    def ffns(self) -> list[FFN]:
        return [block.ffn for block in self.layers]

    @contextmanager
    def probing(self, probe: Probe):
        """Run forward passes with `probe` set on every FFN."""
        for ffn in self.ffns:
            ffn.probe = probe
        try:
            yield probe
        finally:
            for ffn in self.ffns:
                ffn.probe = None

    def _rope(self, seq_len: int, device):
        cache = self._rope_cache
        if cache is None or cache[0] < seq_len or cache[1] != device:
            cos, sin = rope_tables(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)
            self._rope_cache = cache = (seq_len, device, cos, sin)
        return cache[2][:seq_len], cache[3][:seq_len]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq] -> this rank's slice of the logits [seq, batch, vocab / TP]."""
        h = self.embed(tokens).transpose(0, 1) * self.cfg.scale_emb
        cos, sin = self._rope(tokens.shape[1], tokens.device)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.layers:
            h = checkpoint(block, h, cos, sin, use_reentrant=False) if recompute else block(h, cos, sin)
        h = self.final_norm(h) / self.width_mult
        h = copy_to_tensor_model_parallel_region(h)
        return F.linear(h, self.embed.weight)  # tied output embedding

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [batch, seq, padded vocab], fp32, gathered from every TP rank."""
        return gather_from_tensor_model_parallel_region(self(tokens)).transpose(0, 1).float()

    def token_losses(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq], in fp32, computed across the vocab shards."""
        logits = self(tokens).float()
        return vocab_parallel_cross_entropy(logits, targets.t().contiguous()).t()
