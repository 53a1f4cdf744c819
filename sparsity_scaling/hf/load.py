"""Load what the sparsity metrics measure: one of our checkpoints, or a Hugging Face model."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from ..config import RunConfig
from ..errors import NonFiniteError, SettingError, UserError
from ..model import MiniCPM
from ..parallel import device, load_full_state_dict
from ..rundir import Checkpoint, read_checkpoint
from .causal_lm import HFCausalLM
from .gguf import gguf_tokenizer
from .paths import model_kind


def read_weights(checkpoint: str | Path) -> tuple[Checkpoint, RunConfig, dict[str, torch.Tensor]]:
    """A complete checkpoint's manifest, run config and unsharded fp32 weights."""
    ck = read_checkpoint(checkpoint)
    config = ck.config()
    file = ck.weights
    if not file.is_file():
        raise UserError(f"{ck.path}: not a complete checkpoint (no {file.name})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"{file}: cannot read weights ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: not a state dict of named tensors")
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{file}: weight {name} holds NaN or infinite values; a model with non-finite "
                                 "weights cannot be measured")
    return ck, config, state


def load_minicpm(checkpoint: str | Path) -> MiniCPM:
    """Our model at the current TP size (init_parallel first), re-sharded from a checkpoint."""
    ck, config, state = read_weights(checkpoint)
    tp = ps.get_tensor_model_parallel_world_size()
    for field in ("n_heads", "d_ff"):
        if getattr(config.model, field) % tp:
            raise UserError(f"{ck.path}: TP size {tp} does not divide model.{field} "
                            f"{getattr(config.model, field)}")
    model = MiniCPM(config.model, ck.manifest.get("vocab_size", config.data.vocab_size), initialize=False)
    try:
        load_full_state_dict(model, state)  # every weight, or refused
    except UserError as error:
        raise UserError(f"{ck.path}: {error}") from None
    return model.to(device()).eval()


def hf_tokenizer(path: str | Path):
    """The tokenizer of a local Hugging Face directory or of a GGUF file (never downloaded)."""
    if model_kind(path) == "gguf":
        return gguf_tokenizer(Path(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_target(checkpoint: str | Path | None = None, hf_model: str | Path | None = None,
                tp: int = 1, trust_remote_code: bool = False):
    """A `SparsityTarget`: our checkpoint at TP size `tp`, or a local Hugging Face model
    (a directory or a GGUF file).

    For a checkpoint the caller must have run `init_parallel(tp)`. A Hugging Face model is
    not tensor parallel, so it needs tp 1.
    """
    if (checkpoint is None) == (hf_model is None):
        raise UserError("give either a checkpoint or a Hugging Face model (directory or GGUF file)")
    if hf_model is not None:
        if tp != 1:
            raise SettingError("tp", tp, "a Hugging Face model runs unsharded; use 1")
        return HFCausalLM.load(hf_model, device=device(), trust_remote_code=trust_remote_code)
    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() != tp:
        raise RuntimeError(f"call init_parallel({tp}) before loading a checkpoint at TP size {tp}")
    return load_minicpm(checkpoint)
