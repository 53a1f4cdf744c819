"""From a DataConfig to tokenizer + train/validation token streams, all cached on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from ..files import directory_written_whole, write_json_atomic
from .corpus import load_documents, split_documents
from .indexed import open_token_stream, write_indexed
from .tokenizer import Tokenizer, train_tokenizer


@dataclass(frozen=True)
class PreparedData:
    tokenizer: str  # path of the sentencepiece model
    vocab_size: int
    train_prefix: str
    valid_prefix: str
    record: dict  # split hashes, document and token counts: saved with the run


def cache_root(config: DataConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    default = Path(os.environ.get("SPARSITY_SCALING_CACHE", "~/.cache/sparsity-scaling"))
    return default.expanduser()


def prepare_data(config: DataConfig) -> PreparedData:
    """Build (or find in the cache) the tokenizer and indexed datasets a run needs."""
    if config.train_prefix:
        tokenizer = Tokenizer(config.tokenizer)
        record = {"train_prefix": config.train_prefix, "valid_prefix": config.valid_prefix}
        data = PreparedData(
            str(tokenizer.path), tokenizer.vocab_size, config.train_prefix, config.valid_prefix, record
        )
        for prefix in (data.train_prefix, data.valid_prefix):
            open_token_stream(prefix)
        return data

    cache = cache_root(config)
    split = split_documents(load_documents(config.corpus, config.max_corpus_bytes), config.val_fraction)
    if config.tokenizer:
        tokenizer = Tokenizer(config.tokenizer)
    else:
        tokenizer = Tokenizer(
            train_tokenizer(split.train, split.train_hash, config.vocab_size, cache)
        )
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
    return PreparedData(
        str(tokenizer.path),
        tokenizer.vocab_size,
        str(target / "train"),
        str(target / "valid"),
        record,
    )
