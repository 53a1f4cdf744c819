"""Typed run configuration: model, data, training, checkpoints and parallelism.

A run is described by one YAML file (see configs/), validated into `RunConfig` before any
work starts; `--set section.field=value` overrides are applied to the raw YAML first so
they are validated the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from .errors import SettingError, UserError


def _count(value: Any) -> Any:
    """Accept token counts written as 2e6, "2e6" or 2_000_000 (YAML reads "2e6" as a string)."""
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            return value  # let pydantic report the field
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_count)]


class Identity:
    """How a field takes part in a run's identity (`RunConfig.hash`), as a mark in its
    annotation: `Annotated[int, NOT_IDENTITY]`. A field without a mark is part of it."""

    def __init__(self, rule: str):
        self.rule = rule

    def __repr__(self) -> str:
        return f"Identity({self.rule!r})"


NOT_IDENTITY = Identity("never")
"""Changes nothing a run trains (storage, the epoch guard, recomputation, what may be skipped)."""
WHEN_SET = Identity("when set")
"""Part of the identity only when it differs from its default: how a field added after runs
existed joins, so that their directories keep their hashes."""


def _identity(section: BaseModel) -> dict:
    """A section's fields as they enter the run's hash, by their `Identity` marks."""
    kept = {}
    for name, field in type(section).model_fields.items():
        rule = next((m.rule for m in field.metadata if isinstance(m, Identity)), "always")
        value = getattr(section, name)
        if rule == "never" or (rule == "when set" and value == field.default):
            continue
        kept[name] = section.model_dump(mode="json", include={name})[name]
    return kept


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """A MiniCPM-style decoder (muP scalings as in the Sparsing Law paper)."""

    name: str = "custom"
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    activation: Literal["relu", "silu", "gelu"] = "relu"
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    init_std: float = 0.1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for field in ("d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension d_model/n_heads must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def width_depth_ratio(self) -> float:
        return self.d_model / self.n_layers

    def non_embedding_params(self) -> int:
        """Attention q,k,v,o + gated FFN (gate, up, down) + two RMSNorms per layer, final norm."""
        h, f = self.d_model, self.d_ff
        per_layer = 4 * h * h + 3 * h * f + 2 * h
        return self.n_layers * per_layer + h


class BlendPart(_Section):
    """One corpus of a blend: a `data prepare` output and its share of the training samples."""

    prefix: str  # PREFIX of `sparsity-scaling data prepare --out PREFIX`
    weight: float

    @model_validator(mode="after")
    def _check(self) -> "BlendPart":
        if not self.weight > 0:
            raise ValueError(f"weight of {self.prefix} must be positive")
        return self


class DataConfig(_Section):
    """Where tokens come from: a corpus tokenized on the fly and cached (`corpus`; `stdlib`
    is the embedded default, no download), a Megatron-prepared corpus (`train_prefix`,
    `valid_prefix`, `tokenizer`), or a blend of `data prepare` outputs (`blend`, `tokenizer`)."""

    corpus: Optional[str] = "stdlib"
    vocab_size: int = 4096
    tokenizer: Optional[str] = None  # sentencepiece .model or Hugging Face tokenizer directory
    train_prefix: Optional[str] = None  # a Megatron .bin/.idx prefix prepared elsewhere
    valid_prefix: Optional[str] = None
    blend: Annotated[Optional[list[BlendPart]], WHEN_SET] = None  # megatron-core's blended-dataset semantics
    max_epochs: Annotated[float, NOT_IDENTITY] = 1.0  # the epoch guard: train.tokens may be at most this many epochs
    seq_len: int = 256
    val_fraction: float = 0.05
    val_tokens: Count = 65536
    max_corpus_bytes: Count = 0  # 0 = the whole corpus
    cache_dir: Optional[str] = None  # default: $SPARSITY_SCALING_CACHE or ~/.cache/sparsity-scaling

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError("val_fraction must be in (0, 0.5)")
        if self.vocab_size < 64:
            raise ValueError("vocab_size must be at least 64")
        if self.seq_len < 8:
            raise ValueError("seq_len must be at least 8")
        if not self.max_epochs > 0:
            raise ValueError("max_epochs must be positive")
        if (self.train_prefix is None) != (self.valid_prefix is None):
            raise ValueError("train_prefix and valid_prefix go together")
        if self.blend is not None and self.train_prefix:
            raise ValueError("give blend or train_prefix, not both")
        if self.blend is not None and not self.blend:
            raise ValueError("blend needs at least one corpus")
        if (self.train_prefix or self.blend) and not self.tokenizer:
            raise ValueError("a prepared corpus needs the tokenizer it was made with (data.tokenizer)")
        return self

    @property
    def source(self) -> str:
        """What the run trains on, in a few words (for plans and errors)."""
        if self.blend:
            return "blend of " + ", ".join(Path(part.prefix).name for part in self.blend)
        return self.train_prefix or self.corpus or "no corpus"


class TrainConfig(_Section):
    """Optimisation: AdamW with the paper's betas and a WSD (warm-up, stable, decay) schedule."""

    tokens: Count
    batch_tokens: Count  # global batch, in tokens
    micro_batch_size: int = 4  # sequences per rank per micro-step
    lr: float = 0.01
    warmup_fraction: float = 0.01
    decay_fraction: float = 0.1
    decay_shape: Literal["linear", "cosine", "exp"] = "exp"
    final_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mup_lr_scaling: bool = True
    zero_stage: Literal[0, 1, 2] = 0  # bf16 trains with at least 1 (`zero_stage_for`)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: Annotated[bool, NOT_IDENTITY] = False  # recompute each block in backward: less memory, ~1/3 more compute
    decay_data: Annotated[Optional[list[BlendPart]], WHEN_SET] = None  # the decay stage's data: `data prepare` outputs (data.tokenizer's)
    seed: int = 1234
    log_every: int = 10  # steps
    skip_nonfinite_steps: Annotated[int, NOT_IDENTITY] = 0  # steps with a non-finite loss or gradient norm skipped (no update) before failing

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.tokens <= 0 or self.batch_tokens <= 0:
            raise ValueError("tokens and batch_tokens must be positive")
        if self.warmup_fraction < 0 or self.decay_fraction < 0:
            raise ValueError("warmup_fraction and decay_fraction must be >= 0")
        if self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError("warmup_fraction + decay_fraction must be at most 1")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError("final_lr_ratio must be in [0, 1]")
        if self.skip_nonfinite_steps < 0:
            raise ValueError("skip_nonfinite_steps must be >= 0")
        if self.decay_data is not None and not (self.decay_data and self.decay_fraction > 0):
            raise ValueError("decay_data needs at least one corpus and a decay_fraction above 0")
        return self

    def zero_stage_for(self, bf16: bool) -> int:
        """The ZeRO stage DeepSpeed trains with. bf16 accumulates gradients in fp32, which
        DeepSpeed 0.19 does only under ZeRO >= 1 (`data_types.grad_accum_dtype`; at stage 0
        it would all-reduce and accumulate bf16 gradients), so stage 0 becomes 1 there."""
        return max(self.zero_stage, 1) if bf16 else self.zero_stage


class CheckpointConfig(_Section):
    """Checkpoints at log-spaced token counts, plus a dense final stretch.

    The stabilising strategy of the paper averages the PPL ratio over a run's last five
    checkpoints, so `final_count` of them are placed evenly in the last `final_fraction`.
    """

    first_tokens: Count
    count: int = 16
    final_count: int = 5
    final_fraction: float = 0.1
    keep_engine: Annotated[int, NOT_IDENTITY] = 2  # checkpoints that keep their DeepSpeed state (the newest); all keep weights

    @model_validator(mode="after")
    def _check(self) -> "CheckpointConfig":
        if self.first_tokens <= 0 or self.count < 1 or self.final_count < 0:
            raise ValueError("first_tokens and count must be positive, final_count >= 0")
        if self.keep_engine < 1:
            raise ValueError("keep_engine must be at least 1 (resuming needs the newest engine state)")
        if not 0 < self.final_fraction < 1:
            raise ValueError("final_fraction must be in (0, 1)")
        return self


class ParallelConfig(_Section):
    tp: int = 1


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig
    checkpoint: CheckpointConfig
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        tp = self.parallel.tp
        if tp < 1:
            raise ValueError("parallel.tp must be at least 1")
        if self.model.n_heads % tp:
            raise ValueError(f"parallel.tp {tp} does not divide model.n_heads {self.model.n_heads}")
        if self.model.d_ff % tp:
            raise ValueError(f"parallel.tp {tp} does not divide model.d_ff {self.model.d_ff}")
        if self.train.batch_tokens % self.data.seq_len:
            raise ValueError(
                f"train.batch_tokens {self.train.batch_tokens} is not a multiple of "
                f"data.seq_len {self.data.seq_len}"
            )
        if self.checkpoint.first_tokens > self.train.tokens:
            raise ValueError("checkpoint.first_tokens exceeds train.tokens")
        if self.train.decay_data and not self.data.tokenizer:
            raise ValueError("train.decay_data: its corpora are made with data.tokenizer, which this run must name")
        return self

    def hash(self) -> str:
        """Identity of a run: the same config always trains the same model. Each field says
        whether it is part of it (`Identity`): unmarked fields are; `NOT_IDENTITY` ones
        change nothing a run trains (storage retention, the epoch guard, recomputing
        activations, and `train.skip_nonfinite_steps`, which only decides whether a run may
        go on past a non-finite step, so a run that stopped there can be resumed with steps to
        skip); `WHEN_SET` ones count only away from their default. Some unmarked fields do
        not change the model either (`model.name`, `data.cache_dir`, `train.log_every`):
        they were hashed from the start, and leaving them out now would change the hash of
        every run directory made since. A new field must be `WHEN_SET` or `NOT_IDENTITY`
        for the same reason; `tests/test_config.py` pins the shipped configs' hashes."""
        text = json.dumps({name: _identity(getattr(self, name)) for name in type(self).model_fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise SettingError("set", repr(assignment), "expected section.field=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SettingError("set", key, f"{part} is not a section")
    node[leaf] = yaml.safe_load(text)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_config(raw: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (model, data, train, ...)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {_describe(error)}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config; raise UserError naming file and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read YAML ({str(error).splitlines()[0]})") from None
    raw = raw if raw is not None else {}
    for assignment in overrides:
        if isinstance(raw, dict):
            _apply_override(raw, assignment)
    return parse_config(raw, str(path))


def checkpoint_tokens(config: RunConfig) -> list[int]:
    """Token counts at which checkpoints are written, snapped to whole optimizer steps."""
    step = config.train.batch_tokens
    total_steps = max(1, config.train.tokens // step)
    ck = config.checkpoint
    first = max(1, round(ck.first_tokens / step))
    steps = set()
    if ck.count == 1 or first >= total_steps:
        steps.add(total_steps)
    else:
        ratio = math.log(total_steps / first) / (ck.count - 1)
        steps.update(round(first * math.exp(ratio * i)) for i in range(ck.count))
    final_start = total_steps * (1 - ck.final_fraction)
    for i in range(ck.final_count):
        steps.add(round(final_start + (total_steps - final_start) * (i + 1) / ck.final_count))
    steps.add(total_steps)
    return sorted(s * step for s in steps if 1 <= s <= total_steps)
