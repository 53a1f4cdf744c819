"""GGUF files (llama.cpp's format) as Hugging Face models, dequantized on load.

transformers reads a GGUF file's metadata into a config and tokenizer and its tensors,
dequantized, into the model's own parameter names (for llama it also undoes llama.cpp's
q/k row permutation). We build the model from that config and load those tensors into it,
so that every projection is an ordinary fp32 `nn.Linear` the probe can hook, then tie the
weights the config ties (a file with no `output.weight`, as most small models are written,
shares the token embedding as its output layer). `from_pretrained(gguf_file=...)` gives the
same weights (seen on SmolLM2-135M, Q4_1) but needs `accelerate`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UserError

EXTRA = "pip install 'sparsity-scaling[gguf]'"
NOT_ARCHITECTURES = {"general", "tokenizer"}  # metadata sections in transformers' table of architectures


def _require_gguf(path: Path) -> None:
    """Refuse in one line, before transformers does in its words, if the extra is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: reading GGUF files needs the gguf package; install the extra: {EXTRA}") from None


def _reader(path: Path):
    """The file's GGUF reader (metadata and memory-mapped tensors)."""
    _require_gguf(path)
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as error:
        raise UserError(f"{path}: not a readable GGUF file ({str(error).strip().splitlines()[0]})") from None


def architecture(path: Path) -> str:
    """general.architecture of a GGUF file (llama, qwen2, ...)."""
    field = _reader(path).get_field("general.architecture")
    if field is None:
        raise UserError(f"{path}: a GGUF file without general.architecture")
    return field.contents()


def _config(path: Path):
    """The Hugging Face config that transformers reads from the file's metadata."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    _require_gguf(path)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except ValueError as error:
        if "not supported" not in str(error):
            _reader(path)  # not a GGUF file: say so
            raise
        raise UserError(f"{path}: GGUF architecture {architecture(path)} is not supported (transformers reads "
                        f"{', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_ARCHITECTURES))})") from None


def gguf_model(path: Path):
    """The causal LM in a GGUF file, every weight dequantized."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = _config(path)
    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise UserError(f"{path}: GGUF architecture {architecture(path)} ({config.model_type}) is not a causal LM "
                        "that transformers builds") from None
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    model.tie_weights()  # from_config under no_init_weights leaves the config's tied weights apart
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # shared with a loaded tensor
    missing = [name for name in missing if name not in tied]
    if missing:
        raise UserError(f"{path}: the GGUF file has no tensor for {missing[0]} "
                        f"({len(missing)} parameters of {type(model).__name__} missing)")
    return model


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF file carries in its metadata."""
    from transformers import AutoTokenizer

    _require_gguf(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def gguf_config(path: Path) -> dict:
    """The Hugging Face config a GGUF file's metadata gives (model_type, sizes, ...)."""
    return _config(path).to_dict()


def tokenizer_digest(path: Path) -> str:
    """sha256 of the tokenizer a GGUF file carries (its tokenizer.* metadata)."""
    digest = hashlib.sha256()
    for name, field in sorted(_reader(path).fields.items()):
        if name.startswith("tokenizer."):
            digest.update(repr((name, field.contents())).encode())
    return digest.hexdigest()
