"""From a DataConfig to tokenizer + train/validation token streams, all cached on disk, and
the epoch guard that refuses a token budget the corpus cannot honestly supply."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import SettingError, UserError
from ..files import directory_written_whole, write_json_atomic
from ..formatting import sci
from .corpus import load_documents, split_documents
from .indexed import indexed_tokens, open_token_stream, write_indexed
from .prepared import PreparedCorpus
from .sampler import BlendedSampler, WindowSampler, consecutive_windows
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

PREPARE_HINT = ("prepare a corpus with `sparsity-scaling data prepare INPUT... --out PREFIX --tokenizer train:VOCAB` "
                "and set data.train_prefix/valid_prefix/tokenizer or data.blend (README: the paper's grid on a Ray cluster)")


@dataclass(frozen=True)
class PreparedData:
    tokenizer: str  # sentencepiece .model or Hugging Face tokenizer directory
    vocab_size: int
    train: tuple[str, ...]  # indexed-dataset prefixes: one, or a blend's
    valid: tuple[str, ...]
    weights: tuple[float, ...]  # blend weights (one corpus: (1.0,))
    record: dict  # split hashes, document and token counts: saved with the run
    decay: "PreparedData | None" = None  # the decay stage's training data (train.decay_data)

    @property
    def train_tokens(self) -> list[int]:
        return [indexed_tokens(p) for p in self.train]

    def sampler(self, split: str, seq_len: int, seed: int, size: int):
        """The deterministic sampler of a split; `size`: samples a blend is mixed for."""
        prefixes = self.train if split == "train" else self.valid
        shuffle = split == "train"
        samplers = [WindowSampler(open_token_stream(p), seq_len, seed, shuffle=shuffle) for p in prefixes]
        if len(samplers) == 1:
            return samplers[0]
        return BlendedSampler(samplers, list(self.weights), size)

    def validation_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """Validation sequences of seq_len + 1 tokens for a measurement: consecutive windows
        of the split (a blend: its unshuffled mix)."""
        if len(self.valid) == 1:
            return consecutive_windows(open_token_stream(self.valid[0]), seq_len + 1, max_tokens, self.valid[0])
        count = max(1, max_tokens // seq_len)
        return self.sampler("valid", seq_len, 0, count).samples(0, count)


def cache_root(config: DataConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    default = Path(os.environ.get("SPARSITY_SCALING_CACHE", "~/.cache/sparsity-scaling"))
    return default.expanduser()


def _tokenizer(path: str) -> Tokenizer:
    """data.tokenizer, with errors that name the config field."""
    try:
        return load_tokenizer(path)
    except SettingError as error:
        raise UserError(f"data.tokenizer {path}: {error.reason}") from None


def _check_made_with(corpus: PreparedCorpus, tokenizer: Tokenizer, field: str) -> dict:
    """A `data prepare` output's manifest, refused if it was made with another tokenizer."""
    manifest = corpus.manifest()
    theirs = manifest["tokenizer"]["sha256"]
    if theirs != tokenizer.digest():
        raise UserError(f"{field} {corpus.prefix}: made with another tokenizer ({manifest['tokenizer']['path']}, "
                        f"hash {theirs}) than data.tokenizer {tokenizer.path} (hash {tokenizer.digest()})")
    return manifest


def _prepared(config: DataConfig, blend_field: str = "data.blend") -> PreparedData:
    """A Megatron-prepared corpus (train_prefix) or a blend of `data prepare` outputs."""
    tokenizer = _tokenizer(config.tokenizer)
    if config.blend:
        train, valid, records = [], [], []
        for index, part in enumerate(config.blend):
            corpus = PreparedCorpus(part.prefix)
            manifest = _check_made_with(corpus, tokenizer, f"{blend_field}[{index}].prefix")
            train.append(str(corpus.split("train")))
            valid.append(str(corpus.split("valid")))
            records.append({"prefix": str(corpus.prefix), "weight": part.weight, "splits": manifest["splits"]})
        weights = tuple(part.weight for part in config.blend)
        record = {"blend": records}
    else:
        for field in ("train_prefix", "valid_prefix"):
            corpus = PreparedCorpus.of_split(getattr(config, field))
            if corpus is not None:
                _check_made_with(corpus, tokenizer, f"data.{field}")
        train, valid, weights = [config.train_prefix], [config.valid_prefix], (1.0,)
        record = {"train_prefix": config.train_prefix, "valid_prefix": config.valid_prefix}
    for prefix in (*train, *valid):
        open_token_stream(prefix)  # exists, or a clear error
    return PreparedData(str(tokenizer.path), tokenizer.vocab_size, tuple(train), tuple(valid), weights, record)


def prepare_decay_data(config: DataConfig, parts: list, budget: int = 0) -> PreparedData:
    """train.decay_data: the corpora that replace the training data in the decay stage, a
    blend made with the run's tokenizer (validation stays the run's own); with a token
    `budget` (the decay's tokens), refused beyond data.max_epochs of them."""
    decay = config.model_copy(update={"corpus": None, "train_prefix": None, "valid_prefix": None, "blend": parts})
    data = _prepared(decay, "train.decay_data")
    if budget:
        check_epochs(decay, budget, data.train_tokens, data.weights)
    return data


def corpus_tokens(config: DataConfig) -> list[int] | None:
    """Training-split tokens of each corpus a config trains on, without tokenizing anything:
    None for a corpus not prepared yet (raw text is tokenized when its first run starts)."""
    if config.blend:
        corpora = [PreparedCorpus(part.prefix) for part in config.blend]
        if not all(c.finished() for c in corpora):
            return None
        return [c.manifest()["splits"]["train"]["tokens"] for c in corpora]
    if config.train_prefix and Path(f"{config.train_prefix}.bin").is_file():
        return [indexed_tokens(config.train_prefix)]
    return None


def check_epochs(config: DataConfig, budget: int, corpus_tokens: list[int], weights, bound: bool = False) -> None:
    """The epoch guard: refuse a budget of more than data.max_epochs passes over any corpus
    (a blend's corpus gets its weight's share of the budget). `bound`: the counts are upper
    bounds (UTF-8 bytes of untokenized text), so a refusal is certain."""
    total = float(sum(weights))
    for tokens, weight in zip(corpus_tokens, weights):
        share = budget * weight / total
        epochs = share / max(tokens, 1)
        if epochs > config.max_epochs:
            what = f"at most {sci(tokens)} tokens" if bound else f"{sci(tokens)} tokens"
            of = f"its {weight / total:.0%} share {sci(share)}" if len(weights) > 1 else f"train.tokens {sci(budget)}"
            raise UserError(
                f"{of} is {epochs:,.1f} epochs of the training split of {config.source} ({what}), more than "
                f"data.max_epochs {config.max_epochs:g}; {PREPARE_HINT}"
            )


def _token_bound(split) -> int:
    """At most this many training tokens: a tokenizer with byte fallback never makes more
    tokens than UTF-8 bytes, plus one end-of-document token per document."""
    return sum(len(d.text.encode()) + 1 for d in split.train)


def check_budget(config: DataConfig, budget: int) -> None:
    """The epoch guard without preparing anything: exact for a prepared corpus, the UTF-8
    byte bound for raw text (a launcher refuses a grid's runs with it before submitting)."""
    if config.train_prefix or config.blend:
        tokens = corpus_tokens(config)
        if tokens is None:
            raise UserError(f"data: {config.source} is not prepared; {PREPARE_HINT}")
        check_epochs(config, budget, tokens, [p.weight for p in config.blend] if config.blend else (1.0,))
    elif not config.corpus:
        raise UserError(f"data: this config names no corpus; {PREPARE_HINT}")
    else:
        split = split_documents(load_documents(config.corpus, config.max_corpus_bytes), config.val_fraction)
        check_epochs(config, budget, [_token_bound(split)], (1.0,), bound=True)


def prepare_data(config: DataConfig, budget: int = 0) -> PreparedData:
    """Build (or find in the cache) the tokenizer and indexed datasets a run needs; with a
    token `budget`, refuse it first if it exceeds data.max_epochs of the corpus."""
    if config.train_prefix or config.blend:
        data = _prepared(config)
        if budget:
            check_epochs(config, budget, data.train_tokens, data.weights)
        return data
    if not config.corpus:
        raise UserError(f"data: this config names no corpus; {PREPARE_HINT}")

    cache = cache_root(config)
    split = split_documents(load_documents(config.corpus, config.max_corpus_bytes), config.val_fraction)
    if budget:  # before tokenizing
        check_epochs(config, budget, [_token_bound(split)], (1.0,), bound=True)
    if config.tokenizer:
        tokenizer = _tokenizer(config.tokenizer)
    else:
        tokenizer = load_tokenizer(train_tokenizer(split.train, split.train_hash, config.vocab_size, cache))
    key = f"{tokenizer.digest()}-{split.train_hash}-{split.valid_hash}"
    target = cache / "datasets" / key
    if not (target / "record.json").exists():
        with directory_written_whole(target) as work:
            counts = {}
            for name, docs in (("train", split.train), ("valid", split.valid)):
                encoded = [ids + [tokenizer.eos_id] for ids in tokenizer.encode([d.text for d in docs])]
                write_indexed(work / name, encoded, tokenizer.vocab_size)
                counts[f"{name}_tokens"] = sum(len(x) for x in encoded)
            write_json_atomic(work / "record.json", {**split.record(), **counts, "corpus": config.corpus})
    record = json.loads((target / "record.json").read_text())
    if record["valid_tokens"] < config.seq_len + 1:
        raise UserError(
            f"data.corpus: the validation split has {record['valid_tokens']} tokens, fewer than "
            f"one sequence of data.seq_len {config.seq_len}; use a larger corpus or val_fraction"
        )
    if budget:
        check_epochs(config, budget, [record["train_tokens"]], (1.0,))
    return PreparedData(str(tokenizer.path), tokenizer.vocab_size, (str(target / "train"),),
                        (str(target / "valid"),), (1.0,), record)
