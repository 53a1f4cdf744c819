"""Export one of our checkpoints as a Hugging Face Llama directory.

Llama has no muP scalings, so they are folded into the weights: the embedding is scaled by
scale_emb, o_proj and down_proj by scale_depth / sqrt(n_layers), and the final norm weight
divided by d_model / dim_model_base. The output head is the unscaled embedding, stored
untied. Everything else (RMSNorm, rotate-half RoPE, gated FFN, as many KV heads as query
heads, no biases) is Llama's already, so the exported logits equal ours.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..config import ModelConfig, RunConfig
from ..data.tokenizer import EOS_ID
from ..errors import UserError
from ..files import directory_written_whole
from .load import read_weights

# our per-layer names -> Llama's; the residual branch outputs carry scale_depth / sqrt(L)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn.gate": "mlp.gate_proj",
    "ffn.up": "mlp.up_proj",
    "ffn.down": "mlp.down_proj",
}
RESIDUAL_OUTPUTS = {"attn.o", "ffn.down"}


def llama_config(config: RunConfig, vocab_size: int) -> LlamaConfig:
    cfg = config.model
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.activation,
        max_position_embeddings=config.data.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS_ID if config.data.tokenizer is None else None,  # ours, or unknown
        pad_token_id=None,
    )


def _our_names(cfg: ModelConfig) -> set[str]:
    layers = {f"layers.{i}.{ours}.weight" for i in range(cfg.n_layers) for ours in LAYER_NAMES}
    return {"embed.weight", "final_norm.weight", *layers}


def llama_weights(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our unsharded weights under Llama's names, with the muP scalings folded in."""
    embed = state["embed.weight"]
    residual = cfg.scale_depth / math.sqrt(cfg.n_layers)
    out = {
        "model.embed_tokens.weight": embed * cfg.scale_emb,
        "lm_head.weight": embed.clone(),
        "model.norm.weight": state["final_norm.weight"] / (cfg.d_model / cfg.dim_model_base),
    }
    for i in range(cfg.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            weight = state[f"layers.{i}.{ours}.weight"]
            scale = residual if ours in RESIDUAL_OUTPUTS else 1.0
            out[f"model.layers.{i}.{theirs}.weight"] = weight * scale
    return out


def _llama(hf_config: LlamaConfig, weights: dict[str, torch.Tensor], source: Path,
           device: str = "meta") -> LlamaForCausalLM:
    """A Llama holding `weights`; built on the meta device (no random init) to be saved, on
    the CPU to be run (its rotary tables are buffers made at construction)."""
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        raise UserError(f"{source}: weights do not fit its config.yaml "
                        f"({str(error).splitlines()[-1].strip()})") from None
    return model


def _checked_weights(checkpoint_dir: str | Path):
    """(checkpoint, Llama config, Llama weights) of one of our checkpoints."""
    ck, config, state = read_weights(checkpoint_dir)
    expected = _our_names(config.model)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{ck.path}: weights do not fit its config.yaml: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}")
    hf_config = llama_config(config, vocab_size=state["embed.weight"].shape[0])
    return ck, hf_config, llama_weights(config.model, state)


def llama_model(checkpoint_dir: str | Path) -> LlamaForCausalLM:
    """One of our checkpoints as a Llama in memory, on the CPU: the same logits as ours, with
    Hugging Face's decoding (a KV cache) on top."""
    ck, hf_config, weights = _checked_weights(checkpoint_dir)
    return _llama(hf_config, weights, ck.path, device="cpu").eval()


def export_llama(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint as a Llama directory at out_dir (atomically); return out_dir."""
    ck, hf_config, weights = _checked_weights(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose a new directory")
    tokenizer = ck.run.tokenizer
    with directory_written_whole(out) as tmp:
        _llama(hf_config, weights, ck.path).save_pretrained(tmp)
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / tokenizer.name)
        elif tokenizer.is_dir():  # a Hugging Face tokenizer: its files beside the model's
            for file in tokenizer.iterdir():
                shutil.copyfile(file, tmp / file.name)
    return out
