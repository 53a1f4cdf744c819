"""`data prepare`: a corpus tokenized in parallel on Ray Data into megatron-core indexed
datasets (layout and per-shard work: `sparsity_scaling.data.prepared`).

The driver plans shards, trains the tokenizer if asked (on a sample, in this process), then
maps the unfinished shards over a pool of Ray Data workers (one CPU each) and, when all are
done, merges them in corpus order and writes the manifest. A rerun skips finished shards;
a rerun of a finished preparation with the same inputs and settings does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from sparsity_scaling.data.prepared import (
    PreparedCorpus,
    PrepareSettings,
    auto_shard_bytes,
    merge_shards,
    plan_record,
    sample_for_tokenizer,
    tokenize_shard,
    write_manifest,
)
from sparsity_scaling.data.sources import Shard, find_inputs, plan_shards
from sparsity_scaling.data.tokenizer import (
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from sparsity_scaling.errors import SettingError, UserError
from sparsity_scaling.files import json_text, sha256_file, write_json_atomic
from sparsity_scaling.formatting import duration, short_count


def say(message: str) -> None:
    print(f"data prepare: {message}", flush=True)


class _ShardWorker:
    """A Ray Data actor: tokenizes whole shards on one core, loading the tokenizer once.

    Each row carries the settings and the tokenizer's path (JSON), so the actor needs no
    constructor arguments (which Ray would keep in its object store for restarts)."""

    def __init__(self):
        os.environ["RAYON_NUM_THREADS"] = "1"  # a Hugging Face tokenizer's pool: one core
        self.tokenizers: dict[str, Tokenizer] = {}

    def __call__(self, row: dict) -> dict:
        settings = PrepareSettings(**json.loads(row["settings"]))
        path = row["tokenizer"]
        try:
            if path not in self.tokenizers:
                self.tokenizers[path] = load_tokenizer(path)
            shard = Shard.from_row(json.loads(row["shard"]))
            record = tokenize_shard(PreparedCorpus(settings.out), shard, self.tokenizers[path], settings)
            return {"record": json.dumps(record)}
        except UserError as error:  # reported by the driver, as one line
            return {"error": str(error)}


def _same_output(manifest: dict, settings: PrepareSettings, stamps: dict) -> bool:
    return manifest.get("settings", {}) == {**settings.identity(), "inputs": list(settings.inputs)} \
        and manifest.get("input_stamps") == stamps


def _tokenizer(corpus: PreparedCorpus, settings: PrepareSettings, shards: list[Shard]) -> Tokenizer:
    """The tokenizer named by --tokenizer, or the one trained on a sample (kept in the parts)."""
    vocab = settings.trained_vocab
    if vocab is None:
        return load_tokenizer(settings.tokenizer)
    if not corpus.parts_tokenizer.is_file():
        started = time.time()
        say(f"training a sentencepiece BPE of {vocab} tokens on a {short_count(settings.sample_bytes)}B sample")
        work = corpus.parts / ".tmp-tokenizer"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        train_sentencepiece(sample_for_tokenizer(shards, settings), work / "tokenizer", vocab, "tokenizer train:VOCAB")
        os.replace(work / "tokenizer.model", corpus.parts_tokenizer)
        shutil.rmtree(work, ignore_errors=True)
        say(f"tokenizer trained in {duration(time.time() - started)}")
    return load_tokenizer(corpus.parts_tokenizer)


class _Progress:
    """Documents and tokens done, MB/s and ETA, at most every few seconds."""

    def __init__(self, total_bytes: int, shards: int, done_bytes: int, every: float = 5.0):
        self.total, self.shards, self.every = total_bytes, shards, every
        self.start_bytes = self.bytes = done_bytes
        self.documents = self.tokens = self.done = 0
        self.started = self.last = time.time()

    def add(self, record: dict) -> None:
        self.done += 1
        self.bytes += record["bytes"]
        self.documents += sum(record["documents"].values())
        self.tokens += sum(record["tokens"].values())
        now = time.time()
        if now - self.last >= self.every or self.done == self.shards:
            self.last = now
            rate = (self.bytes - self.start_bytes) / max(now - self.started, 1e-9)
            eta = max(0, self.total - self.bytes) / rate if rate > 0 else 0
            say(f"{self.done}/{self.shards} shards, {short_count(self.documents)} documents, "
                f"{short_count(self.tokens)} tokens, {rate / 1e6:.1f} MB/s, "
                f"{self.tokens / max(now - self.started, 1e-9) / 1e3:.0f}k tokens/s, ETA {duration(eta)}")


def _tokenize(shards: list[Shard], settings: PrepareSettings, tokenizer: Tokenizer, progress: _Progress) -> None:
    """Run the shards on Ray Data; stop at the first shard that reports bad input."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours says more: documents, tokens, MB/s, ETA
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    workers = min(settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1))), len(shards))
    common = {"settings": json.dumps(asdict(settings)), "tokenizer": str(tokenizer.path)}
    rows = [{"shard": json.dumps(s.row()), **common} for s in shards]
    dataset = ray.data.from_items(rows, override_num_blocks=len(shards))
    results = dataset.map(_ShardWorker, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=workers))
    say(f"tokenizing {len(shards)} shards on {workers} workers")
    for row in results.iter_rows():
        if row.get("error"):
            raise UserError(row["error"])
        progress.add(json.loads(row["record"]))


def prepare_corpus(settings: PrepareSettings, address: str | None = None) -> dict:
    """Prepare (or finish, or find finished) the corpus; return its manifest."""
    corpus = PreparedCorpus(settings.out)
    inputs = find_inputs(list(settings.inputs))
    stamps = {f.path: [f.size, f.mtime_ns] for f in inputs}
    if corpus.finished():
        manifest = corpus.manifest()
        if _same_output(manifest, settings, stamps):
            say(f"{corpus.manifest_file} is already prepared from these inputs and settings; nothing to do")
            return manifest
        raise SettingError("out", settings.out, f"already holds a preparation of other inputs or settings "
                           f"({corpus.manifest_file.name}); choose another --out or remove it")
    _check_out_directory(corpus, settings)
    shard_bytes = settings.shard_bytes or auto_shard_bytes(sum(f.size for f in inputs))
    shards = plan_shards(inputs, shard_bytes, settings.text_field)
    plan = plan_record(settings, inputs, shards)
    if corpus.plan_file.is_file() and corpus.plan_file.read_text() != json_text(plan):
        say(f"{corpus.parts} holds an unfinished preparation of other inputs or settings; starting over")
        shutil.rmtree(corpus.parts)
    try:
        corpus.parts.mkdir(parents=True, exist_ok=True)  # and --out's directories, as `mkdir -p`
    except OSError as error:
        raise SettingError("out", settings.out, f"cannot make directory {corpus.parts}: {error.strerror}") from None
    for leftover in corpus.parts.glob(".tmp-*"):  # pieces of shards an interrupted run did not finish
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    write_json_atomic(corpus.plan_file, plan)

    total_bytes = sum(s.size for s in shards)  # parquet: uncompressed
    say(f"{len(inputs)} input files, {total_bytes / 1e6:.1f} MB of text, {len(shards)} shards")
    with ThreadPoolExecutor(1) as hasher:  # checksums of the inputs, while the workers tokenize
        hashes = hasher.map(sha256_file, [f.path for f in inputs])
        tokenizer = _tokenizer(corpus, settings, shards)
        records = {}
        for shard in shards:
            if corpus.shard_record(shard.index).is_file():
                records[shard.index] = _read_record(corpus, shard)
        todo = [s for s in shards if s.index not in records]
        if records:
            say(f"resuming: {len(records)} of {len(shards)} shards already done")
        progress = _Progress(total_bytes, len(todo), sum(r["bytes"] for r in records.values()))
        if todo:
            from .cluster import connect_ray

            connect_ray(address)
            _tokenize(todo, settings, tokenizer, progress)
        records.update({s.index: _read_record(corpus, s) for s in todo})
        input_hashes = dict(zip([f.path for f in inputs], hashes))
    ordered = [records[s.index] for s in shards]
    skipped = sum(r["skipped"] for r in ordered)
    if skipped:
        first = next(r["first_skipped"] for r in ordered if r["first_skipped"])
        say(f"skipped {skipped} bad records (the first: {first})")
    for split in ("train", "valid"):
        if not sum(r["documents"][split] for r in ordered):
            raise UserError(f"{', '.join(settings.inputs)}: no documents in the {split} split "
                            f"({sum(sum(r['documents'].values()) for r in ordered)} documents in all, "
                            f"{sum(r['empty'] for r in ordered)} empty records)")
    say("merging shards")
    merge_shards(corpus, shards, tokenizer.vocab_size)
    manifest = write_manifest(corpus, settings, inputs, input_hashes, tokenizer, ordered)
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    empty = manifest["empty_records"]
    dropped = f"; {empty} empty records (no text) dropped" if empty else ""
    say(f"done: {corpus.prefix}_train {short_count(train['tokens'])} tokens ({train['documents']} documents), "
        f"_valid {short_count(valid['tokens'])} tokens ({valid['documents']} documents){dropped}; "
        f"{corpus.manifest_file}")
    return manifest


def _check_out_directory(corpus: PreparedCorpus, settings: PrepareSettings) -> None:
    """Refuse, before any work, an --out whose directory cannot be made: the nearest part of
    it that exists is a file, or (for directories still to make) not writable. The missing
    directories themselves are made with the output's parts, once the inputs are checked."""
    existing = corpus.prefix.parent
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError("out", settings.out, f"{existing} is not a directory")
    if existing != corpus.prefix.parent and not os.access(existing, os.W_OK | os.X_OK):
        raise SettingError("out", settings.out, f"cannot make directory {corpus.prefix.parent}: "
                           f"{existing} is not writable")


def _read_record(corpus: PreparedCorpus, shard: Shard) -> dict:
    return json.loads(corpus.shard_record(shard.index).read_text())
