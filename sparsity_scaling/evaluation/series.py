"""A series of existing checkpoints (ours, Hugging Face directories such as Pythia's
`step1000` ... `step143000` revisions, or GGUF files) as `evaluate-series` takes it: each member's trained
tokens, the members in training order, and the checks that they are one model's history
(same shape, same tokenizer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import SettingError, UserError
from ..files import sha256_file
from ..hf.gguf import gguf_config, tokenizer_digest
from ..hf.paths import model_kind
from ..rundir import read_checkpoint
from .inputs import ModelRef
from .jobs import SeriesMember

# the step number in a checkpoint's name: step1000, checkpoint-1000, global_step1000, iter_0001000
STEP = re.compile(r"(?:step|checkpoint-|iter_?)(\d+)", re.IGNORECASE)
HF_SHAPE = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size", "hidden_act")


def _signature(path: Path, kind: str) -> tuple[dict, str | None]:
    """(shape, tokenizer digest) of a checkpoint of ours, a Hugging Face directory or a GGUF file."""
    if kind == "checkpoint":
        ck = read_checkpoint(path)
        m = ck.config().model
        shape = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                 "activation": m.activation, "vocab_size": ck.manifest.get("vocab_size")}
        tokenizer = ck.run.tokenizer
        tokenizer = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    elif kind == "gguf":
        config = gguf_config(path)
        return {key: config.get(key) for key in HF_SHAPE}, tokenizer_digest(path)
    else:
        config = json.loads((path / "config.json").read_text())
        shape = {key: config.get(key) for key in HF_SHAPE}
        tokenizer = next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()),
                         None)
    return shape, sha256_file(tokenizer) if tokenizer is not None and tokenizer.is_file() else None


def series_members(paths: list[str], tokens: list[int] | None, tokens_per_step: int | None,
                   last: int) -> list[SeriesMember]:
    """The series in training order, each with its trained tokens: from --tokens (one per
    path, in the order given), from --tokens-per-step times the step in the name, or, for
    our checkpoints, from their manifests. Refuses a series that is not one model's history."""
    if tokens is not None and tokens_per_step is not None:
        raise UserError("give --tokens or --tokens-per-step, not both")
    if tokens is not None and len(tokens) != len(paths):
        raise SettingError("tokens", " ".join(f"{t:.0f}" for t in tokens), f"{len(tokens)} counts for {len(paths)} models")
    if last > len(paths):
        raise SettingError("last", last, f"the series has only {len(paths)} models")
    members, first = [], None
    for index, given in enumerate(paths):
        path = Path(given)
        kind = model_kind(path)
        ours = kind == "checkpoint"
        if kind not in ("checkpoint", "hf", "gguf"):
            raise UserError(f"{path}: neither a checkpoint of ours (manifest.json), a Hugging Face model "
                            "directory (config.json) nor a GGUF file")
        step_match = STEP.search(path.name)
        step = int(step_match.group(1)) if step_match else None
        if tokens is not None:
            trained = tokens[index]
        elif tokens_per_step is not None:
            if step is None:
                raise UserError(f"{path}: no step number in its name (step1000, checkpoint-1000, iter_1000) for "
                                "--tokens-per-step; give --tokens")
            trained = step * tokens_per_step
        elif ours:
            manifest = read_checkpoint(path).manifest
            trained, step = manifest["tokens"], manifest["step"]
        else:
            raise UserError(f"{path}: a Hugging Face model does not say how many tokens it was trained on; "
                            "give --tokens or --tokens-per-step")
        signature = _signature(path, kind)
        if first is None:
            first = (path, signature)
        elif signature[0] != first[1][0]:
            raise UserError(f"{path}: its shape {signature[0]} differs from {first[0]}'s {first[1][0]}")
        elif signature[1] != first[1][1]:
            raise UserError(f"{path}: its tokenizer differs from {first[0]}'s")
        model = ModelRef(checkpoint=str(path)) if ours else ModelRef(hf_model=str(path))
        members.append(SeriesMember(model, path.name, int(trained), step))
    members.sort(key=lambda m: m.tokens)
    repeated = {m.tokens for m in members if sum(n.tokens == m.tokens for n in members) > 1}
    if repeated:
        raise UserError(f"two models of the series share the trained-token count {min(repeated):,}")
    return members
