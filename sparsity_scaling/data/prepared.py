"""A corpus prepared by `sparsity-scaling data prepare`: the one owner of its files.

    PREFIX_train.bin/.idx, PREFIX_valid.bin/.idx   megatron-core indexed datasets; an
                                                   end-of-document token after each document
    PREFIX.model                                   the tokenizer, when it was trained (train:VOCAB)
    PREFIX.json                                    the manifest: inputs (sizes, hashes), tokenizer
                                                   and its hash, documents and tokens per split,
                                                   records dropped as bad and as empty, settings.
                                                   Written last: it marks the output whole
    PREFIX.parts/                                  while preparing: plan.json, the tokenizer being
                                                   used, and each finished shard (shard_N_train,
                                                   shard_N_valid, shard_N.json written last)

The work of one shard (`tokenize_shard`) and of the end (`merge_shards`, `write_manifest`)
is here; running the shards in parallel is the launcher's (`launcher/prepare.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SettingError, UserError
from ..files import write_bytes_atomic, write_json_atomic
from .corpus import in_validation, text_digest
from .indexed import IndexedWriter, indexed_tokens, merge_indexed, token_dtype
from .sources import DroppedRecords, InputFile, Shard, shard_documents
from .tokenizer import Tokenizer

FORMAT = 2  # 2: shard records and the manifest count empty records
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class PrepareSettings:
    """What `data prepare` makes, and how."""

    inputs: tuple[str, ...]
    """Corpus files or directories (.jsonl, .jsonl.gz, .parquet, .txt)."""
    out: str
    """The output PREFIX."""
    tokenizer: str
    """A sentencepiece .model, a Hugging Face tokenizer directory, or train:VOCAB."""
    text_field: str = "text"
    """The field (jsonl) or column (parquet) holding each document's text."""
    val_fraction: float = 0.05
    """Share of documents (by a hash of their text) in the validation split."""
    sample_bytes: int = 100_000_000
    """Text the train:VOCAB tokenizer is trained on (a sample of the training split)."""
    shard_bytes: int = 0
    """Input bytes per shard, the unit of parallel work and of resuming (0: `auto_shard_bytes`)."""
    skip_bad_lines: bool = False
    """Count and skip malformed records instead of stopping at the first."""
    workers: int = 0
    """Parallel tokenizing workers, one CPU each (0: every CPU of the cluster)."""

    def __post_init__(self):
        if not self.inputs:
            raise SettingError("inputs", None, "name at least one corpus file or directory")
        if not 0 < self.val_fraction < 0.5:
            raise SettingError("val_fraction", self.val_fraction, "must be in (0, 0.5)")
        if self.sample_bytes < 1:
            raise SettingError("sample_bytes", self.sample_bytes, "must be positive")
        if self.shard_bytes < 0:
            raise SettingError("shard_bytes", self.shard_bytes, "must be positive (or 0 for automatic)")
        if self.workers < 0:
            raise SettingError("workers", self.workers, "must be positive (or 0 for every CPU)")
        self.trained_vocab  # checks the train:VOCAB form

    @property
    def trained_vocab(self) -> int | None:
        """VOCAB of `train:VOCAB`, or None for an existing tokenizer."""
        if not self.tokenizer.startswith("train:"):
            return None
        text = self.tokenizer.removeprefix("train:")
        if not text.isdigit() or int(text) < 64:
            raise SettingError("tokenizer", self.tokenizer, "train:VOCAB needs a vocabulary of at least 64")
        return int(text)

    def identity(self) -> dict:
        """The settings that decide the output's bytes."""
        fields = {"text_field": self.text_field, "val_fraction": self.val_fraction, "shard_bytes": self.shard_bytes,
                  "skip_bad_lines": self.skip_bad_lines, "tokenizer": self.tokenizer}
        if self.trained_vocab:
            fields["sample_bytes"] = self.sample_bytes
        return fields


def auto_shard_bytes(total_bytes: int) -> int:
    """About 64 shards, each 1 MB to 64 MB: enough to keep a pool of workers evenly busy to
    the end, few enough files for a corpus of terabytes. It depends on the inputs alone, so
    a resumed preparation cuts the same shards whatever the cluster's size."""
    return int(min(max(total_bytes / 64, 1e6), 6.4e7))


class PreparedCorpus:
    """The files of one `data prepare` output (see the module docstring)."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix).expanduser().absolute()

    def _beside(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix)

    def split(self, name: str) -> Path:
        """PREFIX_train or PREFIX_valid (a megatron-core dataset prefix)."""
        return self._beside(f"_{name}")

    @property
    def manifest_file(self) -> Path:
        return self._beside(".json")

    @property
    def trained_tokenizer(self) -> Path:
        return self._beside(".model")

    @property
    def parts(self) -> Path:
        return self._beside(".parts")

    @property
    def plan_file(self) -> Path:
        return self.parts / "plan.json"

    @property
    def parts_tokenizer(self) -> Path:
        return self.parts / "tokenizer.model"

    def shard_split(self, index: int, split: str) -> Path:
        return self.parts / f"shard_{index:06d}_{split}"

    def shard_record(self, index: int) -> Path:
        return self.parts / f"shard_{index:06d}.json"

    def finished(self) -> bool:
        return self.manifest_file.is_file()

    def manifest(self) -> dict:
        """The manifest of a finished preparation; a clear error for anything less."""
        if not self.finished():
            state = "was interrupted (rerun the same `data prepare` to finish it)" if self.parts.is_dir() \
                else "is not a `sparsity-scaling data prepare` output"
            raise UserError(f"{self.prefix}: {state}; no {self.manifest_file.name}")
        try:
            return json.loads(self.manifest_file.read_text())
        except ValueError:
            raise UserError(f"{self.manifest_file}: not valid JSON") from None

    @classmethod
    def of_split(cls, split_prefix: str | Path) -> "PreparedCorpus | None":
        """The preparation a PREFIX_train / PREFIX_valid belongs to, if `data prepare` made it."""
        name = Path(split_prefix).name
        for split in SPLITS:
            if name.endswith(f"_{split}"):
                corpus = cls(Path(split_prefix).with_name(name.removesuffix(f"_{split}")))
                if corpus.finished() or corpus.parts.is_dir():
                    return corpus
        return None


def tokenize_shard(corpus: PreparedCorpus, shard: Shard, tokenizer: Tokenizer, settings: PrepareSettings) -> dict:
    """Tokenize one shard into its two indexed datasets, then write its record (last, so a
    shard with a record is whole). Streams: memory holds one batch of documents."""
    started = time.time()
    dropped = DroppedRecords(settings.skip_bad_lines)
    documents = {split: 0 for split in SPLITS}
    tokens = {split: 0 for split in SPLITS}
    # per-process names: a worker of an interrupted run may still be finishing the same shard
    tmp = {split: corpus.parts / f".tmp-{os.getpid()}-{corpus.shard_split(shard.index, split).name}" for split in SPLITS}
    writers = {split: IndexedWriter(tmp[split], token_dtype(tokenizer.vocab_size)) for split in SPLITS}

    def write(batch: list[str]) -> None:
        for text, ids in zip(batch, tokenizer.encode(batch, threads=1)):
            split = "valid" if in_validation(text_digest(text), settings.val_fraction) else "train"
            ids.append(tokenizer.eos_id)
            writers[split].add(ids)
            documents[split] += 1
            tokens[split] += len(ids)

    batch, size = [], 0
    for text in shard_documents(shard, settings.text_field, dropped):
        batch.append(text)
        size += len(text)
        if size >= 1 << 20 or len(batch) >= 1024:
            write(batch)
            batch, size = [], 0
    write(batch)
    for split, writer in writers.items():
        writer.close()
        for ext in (".bin", ".idx"):
            os.replace(f"{tmp[split]}{ext}", f"{corpus.shard_split(shard.index, split)}{ext}")
    record = {"index": shard.index, "documents": documents, "tokens": tokens, "bytes": shard.size,
              "skipped": dropped.bad_count, "first_skipped": dropped.first_bad, "empty": dropped.empty_count,
              "seconds": time.time() - started}
    write_json_atomic(corpus.shard_record(shard.index), record)
    return record


def sample_for_tokenizer(shards: list[Shard], settings: PrepareSettings) -> list[str]:
    """About `sample_bytes` of training-split text, taken from every shard in proportion to
    its size (the start of each), so the tokenizer sees the whole corpus' mix."""
    total = sum(s.size for s in shards) or 1
    texts, dropped = [], DroppedRecords(skip=True)  # bad records are reported by the tokenizing pass
    for shard in shards:
        share, taken = settings.sample_bytes * shard.size / total, 0
        for text in shard_documents(shard, settings.text_field, dropped):
            if taken >= share:
                break
            if not in_validation(text_digest(text), settings.val_fraction):
                texts.append(text)
                taken += len(text.encode("utf-8", "surrogatepass"))
    if not texts:
        raise UserError(f"{', '.join(settings.inputs)}: no documents to train a tokenizer on")
    return texts


def merge_shards(corpus: PreparedCorpus, shards: list[Shard], vocab_size: int) -> None:
    """PREFIX_train and PREFIX_valid from the shards' pieces, in corpus order."""
    for split in SPLITS:
        parts = [str(corpus.shard_split(s.index, split)) for s in shards]
        merge_indexed(corpus.split(split), parts, token_dtype(vocab_size))


def write_manifest(corpus: PreparedCorpus, settings: PrepareSettings, inputs: list[InputFile],
                   input_hashes: dict[str, str], tokenizer: Tokenizer, records: list[dict]) -> dict:
    """Finish: keep a trained tokenizer as PREFIX.model, write PREFIX.json, drop the parts."""
    if settings.trained_vocab:
        write_bytes_atomic(corpus.trained_tokenizer, corpus.parts_tokenizer.read_bytes())
        tokenizer_path = corpus.trained_tokenizer
    else:
        tokenizer_path = Path(settings.tokenizer).expanduser().absolute()
    splits = {}
    for split in SPLITS:
        splits[split] = {
            "prefix": str(corpus.split(split)),
            "documents": sum(r["documents"][split] for r in records),
            "tokens": sum(r["tokens"][split] for r in records),
        }
        assert splits[split]["tokens"] == indexed_tokens(corpus.split(split)), "merged tokens differ from the shards'"
    manifest = {
        "format": FORMAT,
        "inputs": [{"path": f.path, "kind": f.kind, "bytes": f.size, "sha256": input_hashes[f.path]} for f in inputs],
        "tokenizer": {"path": str(tokenizer_path), "kind": type(tokenizer).__name__, "sha256": tokenizer.digest(),
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "splits": splits,
        "skipped_records": sum(r["skipped"] for r in records),  # bad records --skip-bad-lines skipped
        "empty_records": sum(r["empty"] for r in records),  # records whose text is empty or whitespace
        "settings": {**settings.identity(), "inputs": list(settings.inputs)},
        "shards": len(records),
        "input_stamps": {f.path: [f.size, f.mtime_ns] for f in inputs},
    }
    write_json_atomic(corpus.manifest_file, manifest)
    shutil.rmtree(corpus.parts, ignore_errors=True)
    return manifest


def plan_record(settings: PrepareSettings, inputs: list[InputFile], shards: list[Shard]) -> dict:
    """What plan.json holds: a resumed preparation reuses finished shards only if it matches."""
    return {"format": FORMAT, "settings": settings.identity(), "inputs": [asdict(f) for f in inputs],
            "shards": [s.row() for s in shards]}
