"""Real corpora: `data prepare` on Ray Data equals a direct tokenization, resumes, refuses bad
input; blends mix by weight; the epoch guard; runs train on prepared corpora."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import MICRO, REPO, run_cli, run_here
from megatron.core.datasets.indexed_dataset import IndexedDataset

from sparsity_scaling.config import DataConfig, load_config
from sparsity_scaling.data.corpus import in_validation
from sparsity_scaling.data.indexed import write_indexed
from sparsity_scaling.data.pipeline import PreparedData, prepare_data
from sparsity_scaling.data.prepared import (
    PreparedCorpus,
    PrepareSettings,
    merge_shards,
    tokenize_shard,
    write_manifest,
)
from sparsity_scaling.data.sources import find_inputs, plan_shards
from sparsity_scaling.data.tokenizer import load_tokenizer
from sparsity_scaling.errors import UserError
from sparsity_scaling.formatting import sci
from sparsity_scaling.rundir import RunDir

SHARD = "60000"  # bytes: every format is cut into several shards


def _texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.py"))[:150]]
    texts[3] = "caf\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001F600\n" + texts[3]  # beyond ASCII
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 2 MB in every input format, with blank lines and a whitespace-only document."""
    texts = _texts()
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "a.jsonl", "w") as f:
        for text in texts[:60]:
            f.write(json.dumps({"text": text, "id": len(text)}) + "\n\n")
        f.write(json.dumps({"text": "   \n"}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for text in texts[60:90]:
            f.write(json.dumps({"text": text}) + "\n")
    pq.write_table(pa.table({"text": texts[90:130], "n": list(range(40))}), root / "c.parquet", row_group_size=4)
    (root / "texts").mkdir()
    for i, text in enumerate(texts[130:]):
        (root / "texts" / f"{i:02d}.txt").write_text(text)
    return root


def _reference(corpus: Path, tokenizer, val_fraction: float = 0.05) -> dict[str, list[list[int]]]:
    """A direct single-process tokenization: every document in path order, one at a time."""
    texts = []
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        if path.name.endswith(".jsonl"):
            texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        elif path.name.endswith(".jsonl.gz"):
            texts += [json.loads(line)["text"] for line in gzip.open(path, "rt").read().splitlines() if line.strip()]
        elif path.suffix == ".parquet":
            texts += pq.read_table(path).column("text").to_pylist()
        elif path.suffix == ".txt":
            texts.append(path.read_text())
    return _split_tokens([text for text in texts if text.strip()], tokenizer, val_fraction)


def _split_tokens(texts: list[str], tokenizer, val_fraction: float) -> dict[str, list[list[int]]]:
    """Each text tokenized alone, with its end-of-document token, in the split its hash names."""
    splits = {"train": [], "valid": []}
    for text in texts:
        split = "valid" if in_validation(hashlib.sha256(text.encode()).hexdigest(), val_fraction) else "train"
        splits[split].append(tokenizer.encode([text])[0] + [tokenizer.eos_id])
    return splits


def _read_back(prefix: Path) -> dict[str, list[list[int]]]:
    out = {}
    for split in ("train", "valid"):
        dataset = IndexedDataset(f"{prefix}_{split}")
        out[split] = [dataset[i].tolist() for i in range(len(dataset))]
    return out


def _prepare(*args, address: str, here: bool = False):
    """`data prepare ARGS` as a command of its own, or (here) in this process: a refusal."""
    return (run_here if here else run_cli)("data", "prepare", *map(str, args), "--shard-bytes", SHARD,
                                           "--address", address)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory, ray_address) -> Path:
    """The corpus prepared with a tokenizer trained on a sample of it (train:VOCAB)."""
    prefix = tmp_path_factory.mktemp("prepared") / "corpus"
    result = _prepare(corpus, "--out", prefix, "--tokenizer", "train:400", "--sample-bytes", "5e5", address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s" in result.stdout and "ETA" in result.stdout  # progress a person can follow
    return prefix


@pytest.fixture(scope="module")
def parquet(corpus, trained, tmp_path_factory, ray_address) -> Path:
    """The corpus' parquet file alone, prepared with the trained tokenizer: a second corpus
    to blend with the first or to train on in the decay stage."""
    prefix = tmp_path_factory.mktemp("parquet") / "parquet"
    result = _prepare(corpus / "c.parquet", "--out", prefix, "--tokenizer", f"{trained}.model", address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    return prefix


@pytest.fixture(scope="module")
def parquet_hf(corpus, hf_tokenizer, tmp_path_factory, ray_address) -> Path:
    """The same, prepared with the Hugging Face tokenizer: a corpus another tokenizer made."""
    prefix = tmp_path_factory.mktemp("parquet_hf") / "parquet"
    result = _prepare(corpus / "c.parquet", "--out", prefix, "--tokenizer", hf_tokenizer, address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    return prefix


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE Hugging Face tokenizer, trained here (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts()[:40], trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf") / "tokenizer"
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


def test_trained_tokenizer_output_equals_a_direct_tokenization(corpus, trained):
    manifest = json.loads(PreparedCorpus(trained).manifest_file.read_text())
    tokenizer = load_tokenizer(f"{trained}.model")
    expected = _reference(corpus, tokenizer)
    assert _read_back(trained) == expected  # token for token, every format, in corpus order
    for split in ("train", "valid"):
        assert manifest["splits"][split]["documents"] == len(expected[split])
        assert manifest["splits"][split]["tokens"] == sum(map(len, expected[split]))
    assert manifest["tokenizer"]["sha256"] == tokenizer.digest() and manifest["dtype"] == "uint16"
    assert manifest["empty_records"] == 1 and manifest["skipped_records"] == 0  # a.jsonl's whitespace-only one
    inputs = {Path(i["path"]).name: i for i in manifest["inputs"]}
    assert len(inputs) == 3 + 20 and inputs["c.parquet"]["kind"] == "parquet"
    assert inputs["a.jsonl"]["sha256"] == hashlib.sha256((corpus / "a.jsonl").read_bytes()).hexdigest()
    assert not PreparedCorpus(trained).parts.exists()


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_given_tokenizer_output_equals_a_direct_tokenization(corpus, trained, hf_tokenizer, tmp_path, ray_address, kind):
    tokenizer = f"{trained}.model" if kind == "sentencepiece" else hf_tokenizer
    result = _prepare(corpus, "--out", tmp_path / "out", "--tokenizer", tokenizer, "--workers", "2",
                      address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _read_back(tmp_path / "out") == _reference(corpus, load_tokenizer(tokenizer))
    if kind == "sentencepiece":  # the same tokenizer as train:400 made: the same bytes
        for split in ("train", "valid"):
            for ext in (".bin", ".idx"):
                assert Path(f"{tmp_path}/out_{split}{ext}").read_bytes() == Path(f"{trained}_{split}{ext}").read_bytes()


def test_interrupted_preparation_resumes_to_the_same_bytes(corpus, trained, tmp_path, ray_address):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sparsity_scaling.cli", "data", "prepare", str(corpus), "--out", str(out),
               "--tokenizer", f"{trained}.model", "--shard-bytes", "20000", "--workers", "1", "--address", ray_address]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    corpus_out = PreparedCorpus(out)
    deadline = time.time() + 300
    while len(list(corpus_out.parts.glob("shard_*.json"))) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(corpus_out.parts.glob("shard_*.json")))
    assert done >= 3 and not corpus_out.finished(), "the preparation was not killed half-way"
    # a half-written shard of a worker that died with it:
    (corpus_out.parts / ".tmp-1-shard_000099_train.bin").write_bytes(b"half")
    with pytest.raises(UserError, match="was interrupted"):
        corpus_out.manifest()  # never taken for a finished output

    result = run_cli("data", "prepare", *command[5:])
    assert result.returncode == 0, result.stderr[-3000:]
    # the driver's death reaches its Ray task a moment later: it may have finished one more shard
    resumed = re.search(r"resuming: (\d+) of (\d+) shards already done", result.stdout)
    assert resumed and done <= int(resumed[1]) < int(resumed[2]), result.stdout
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            assert Path(f"{out}_{split}{ext}").read_bytes() == Path(f"{trained}_{split}{ext}").read_bytes()
    stamp = corpus_out.manifest_file.stat().st_mtime_ns
    again = run_here("data", "prepare", *command[5:])
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert corpus_out.manifest_file.stat().st_mtime_ns == stamp


def _bad_jsonl(root: Path) -> None:
    (root / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')


@pytest.mark.parametrize("setup, inputs, options, message", [
    (_bad_jsonl, [], [], "bad.jsonl:2: not valid JSON"),
    (lambda r: (r / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n'), [], [],
     "bad.jsonl:2: expected an object with a string 'text' field"),
    (lambda r: (r / "bad.parquet").write_bytes(b"PAR1 not really"), [], [], "bad.parquet: not a readable parquet file"),
    (lambda r: pq.write_table(pa.table({"body": ["x"]}), r / "bad.parquet"), [], [], "bad.parquet: no column 'text'"),
    (lambda r: (r / "empty.jsonl").write_text(""), [], [], "no documents in the train split"),
    (lambda r: (r / "sub").mkdir(), ["{root}/sub"], [], "sub: holds no .jsonl.gz, .jsonl, .parquet, .txt files"),
    (_bad_jsonl, [], ["--tokenizer", "{root}/bad.jsonl"], "--tokenizer {root}/bad.jsonl: not a sentencepiece model"),
    (_bad_jsonl, [], ["--tokenizer", "train:12"], "--tokenizer train:12: train:VOCAB needs a vocabulary of at least 64"),
    (_bad_jsonl, [], ["--out", "{root}/bad.jsonl/sub/corpus"],  # a directory to make inside a file
     "--out {root}/bad.jsonl/sub/corpus: {root}/bad.jsonl is not a directory"),
], ids=["bad-json", "no-text", "bad-parquet", "no-column", "empty", "empty-dir", "bad-tokenizer", "bad-vocab", "bad-out"])
def test_bad_input_is_one_line_and_leaves_nothing_finished(tmp_path, trained, ray_address, setup, inputs, options,
                                                           message):
    root = tmp_path / "in"
    root.mkdir()
    setup(root)
    options = [o.format(root=root) for o in options]
    for flag, value in (("--tokenizer", f"{trained}.model"), ("--out", str(tmp_path / "out"))):
        if flag not in options:
            options += [flag, value]
    result = _prepare(*([i.format(root=root) for i in inputs] or [root]), *options, address=ray_address, here=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message.format(root=root) in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out_train.bin").exists()


def test_bad_lines_and_empty_records_are_counted_apart(tmp_path, trained, ray_address):
    """--skip-bad-lines counts and skips malformed records; a record whose text is empty or
    whitespace only is no document, counted and reported as empty (with or without the flag);
    and --out in directories that do not exist yet makes them."""
    root = tmp_path / "in"
    root.mkdir()
    _bad_jsonl(root)  # "one", a bad line, "three"
    texts = _texts()[:40]
    # 3 empty JSON-lines records among the documents, and a blank line (no record)
    records = texts[:10] + ["", "   "] + texts[10:30] + ["\n\t"]
    (root / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records) + "\n")
    pq.write_table(pa.table({"text": texts[30:36] + ["", ""]}), root / "rows.parquet", row_group_size=3)  # 2 empty
    (root / "texts").mkdir()
    for i, text in enumerate(texts[36:] + [" \n"]):  # 1 empty file
        (root / "texts" / f"{i:02d}.txt").write_text(text)
    planted = 3 + 2 + 1
    out = tmp_path / "new" / "deeper" / "out"
    result = _prepare(root, "--out", out, "--tokenizer", f"{trained}.model", "--skip-bad-lines",
                      "--val-fraction", "0.4", address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 bad records (the first: " in result.stdout and "bad.jsonl:2: not valid JSON" in result.stdout
    manifest = json.loads(out.with_name("out.json").read_text())
    assert manifest["skipped_records"] == 1 and manifest["empty_records"] == planted
    final = result.stdout.strip().splitlines()[-1]
    assert final.startswith("data prepare: done: ") and f"; {planted} empty records (no text) dropped;" in final
    # the documents held: the non-empty ones, in corpus order (bad.jsonl, more.jsonl, rows.parquet, texts/)
    expected = _split_tokens(["one", "three", *texts], load_tokenizer(f"{trained}.model"), 0.4)
    assert _read_back(out) == expected


def _prepare_here(inputs: list[Path], out: Path, tokenizer, shard_bytes: int, **options) -> dict:
    """`data prepare`'s own steps in this process, without Ray (which only spreads the
    shards over workers): plan, tokenize each shard, merge, write the manifest."""
    settings = PrepareSettings(inputs=tuple(map(str, inputs)), out=str(out), tokenizer=str(tokenizer.path), **options)
    corpus = PreparedCorpus(out)
    corpus.parts.mkdir(parents=True)
    files = find_inputs(list(settings.inputs))
    shards = plan_shards(files, shard_bytes, settings.text_field)
    records = [tokenize_shard(corpus, shard, tokenizer, settings) for shard in shards]
    merge_shards(corpus, shards, tokenizer.vocab_size)
    return write_manifest(corpus, settings, files, {f.path: "-" for f in files}, tokenizer, records)


def _word_tokenizer(root: Path, vocab: int) -> Path:
    """A Hugging Face word-level tokenizer of `vocab` entries: word wN is id N, <eos> id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    root.mkdir()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return root


@pytest.mark.parametrize("vocab, dtype", [(65_499, "uint16"), (65_500, "int32"), (70_000, "int32")])
def test_token_ids_are_uint16_below_a_vocabulary_of_65500_else_int32(tmp_path, vocab, dtype):
    """The README's rule (megatron-core's DType.optimal_dtype), at its boundary, and ids
    beyond uint16's range kept whole where the vocabulary has them."""
    from megatron.core.datasets.indexed_dataset import DType

    assert DType.optimal_dtype(vocab).__name__ == dtype
    tokenizer = load_tokenizer(_word_tokenizer(tmp_path / "tokenizer", vocab))
    assert tokenizer.vocab_size == vocab
    high = [vocab - 1, vocab - 2, 65_535, 65_536] if vocab > 65_536 else [vocab - 1, vocab - 2]
    documents = [[1 + k, 7 * k + 2, *high, vocab - 3 - k] for k in range(60)]  # ids by construction
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n"
                                              for ids in documents))
    manifest = _prepare_here([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer, shard_bytes=1500,
                             val_fraction=0.3)
    assert manifest["dtype"] == dtype and manifest["shards"] > 1
    held = []
    for split in ("train", "valid"):
        dataset = IndexedDataset(f"{tmp_path}/out_{split}")
        assert dataset.index.dtype == np.dtype(dtype)  # what megatron-core reads the ids as
        held += [dataset[i].tolist() for i in range(len(dataset))]
    assert sorted(held) == sorted(ids + [0] for ids in documents)


def test_tokenizing_a_shard_holds_one_batch_of_documents_not_the_shard(tmp_path):
    """Memory does not grow with the corpus: a worker tokenizing a shard four times larger
    peaks at the same memory (Python's and numpy's allocations, as tracemalloc counts them:
    the documents read, their ids, the writers' arrays; not the tokenizer's own)."""
    import tracemalloc

    tokenizer = load_tokenizer(_word_tokenizer(tmp_path / "tokenizer", 1000))
    peaks = {}
    for scale in (1, 4):
        root = tmp_path / f"x{scale}"
        root.mkdir()
        documents = 2048 * scale  # 1024 documents a batch: 2 batches, then 8
        words = (" ".join(f"w{(7 * n + j) % 999 + 1}" for j in range(20)) for n in range(documents))
        (root / "c.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in words))
        settings = PrepareSettings(inputs=(str(root / "c.jsonl"),), out=str(root / "out"),
                                   tokenizer=str(tokenizer.path))
        corpus = PreparedCorpus(settings.out)
        corpus.parts.mkdir()
        [shard] = plan_shards(find_inputs(list(settings.inputs)), 1 << 40, "text")
        tracemalloc.start()
        try:
            record = tokenize_shard(corpus, shard, tokenizer, settings)
            peaks[scale] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert sum(record["documents"].values()) == documents
        assert sum(record["tokens"].values()) == 21 * documents
    assert peaks[4] < 1.3 * peaks[1], peaks


def _stream(prefix: Path, value: int, tokens: int) -> str:
    write_indexed(prefix, [[value] * tokens], 512)
    return str(prefix)


def test_a_blend_samples_each_corpus_in_proportion_to_its_weight(tmp_path):
    a, b = _stream(tmp_path / "a", 7, 20_000), _stream(tmp_path / "b", 9, 5_000)
    data = PreparedData("tok", 512, (a, b), (a, b), (3.0, 1.0), {})
    sampler = data.sampler("train", 8, seed=1, size=4000)
    batch = sampler.samples(0, 4000)
    share = (batch[:, 0] == 7).float().mean().item()
    assert share == pytest.approx(0.75, abs=0.002)
    assert {int(v) for v in batch.unique()} == {7, 9}
    # a pure function of the sample index: any slice equals the same rows of the whole
    assert (sampler.samples(1234, 16) == batch[1234:1250]).all()
    # the first 100 samples are already mixed in proportion (megatron-core's greedy blending)
    assert (batch[:100, 0] == 7).sum().item() == 75


def test_the_epoch_guard_refuses_and_accepts_at_the_boundary(tmp_path):
    tokenizer = load_tokenizer(prepare_data(load_config(MICRO).data).tokenizer)  # the micro run's (cached)
    train, valid = _stream(tmp_path / "x_train", 5, 10_000), _stream(tmp_path / "x_valid", 5, 1_000)
    config = DataConfig(train_prefix=train, valid_prefix=valid, tokenizer=str(tokenizer.path), max_epochs=2.5,
                        seq_len=16)
    prepare_data(config, budget=25_000)  # exactly 2.5 epochs: accepted
    with pytest.raises(UserError, match=r"train.tokens \S+ is 2.5 epochs of the training split .* more than "
                                        r"data.max_epochs 2.5; prepare a corpus with `sparsity-scaling data prepare"):
        prepare_data(config, budget=25_001)


def test_a_paper_scale_config_on_the_builtin_corpus_is_refused_with_the_epoch_message(tmp_path):
    result = run_here("train", str(REPO / "configs" / "models" / "0.1b.yaml"), "--out", str(tmp_path / "run"),
                     "--set", "data.corpus=stdlib")
    assert result.returncode == 2
    assert "train.tokens 4.20e+10 is" in result.stderr and "more than data.max_epochs 1" in result.stderr
    assert "sparsity-scaling data prepare" in result.stderr and not (tmp_path / "run").exists()
    plain = run_here("train", str(REPO / "configs" / "models" / "0.1b.yaml"), "--out", str(tmp_path / "run"))
    assert plain.returncode == 2 and "names no corpus" in plain.stderr and "data prepare" in plain.stderr


def _first_windows(prefix: str, seq_len: int, count: int) -> list[list[int]]:
    """A split's first `count` validation windows of seq_len + 1 tokens, each starting seq_len
    tokens after the one before (read back through megatron-core, documents end to end)."""
    dataset = IndexedDataset(prefix)
    stream = [token for i in range(len(dataset)) for token in dataset[i].tolist()]
    assert len(stream) > count * seq_len, f"{prefix}: too few tokens for {count} windows"
    return [stream[j * seq_len: j * seq_len + seq_len + 1] for j in range(count)]


def test_a_run_trains_on_a_blend_of_prepared_corpora(trained, parquet, parquet_hf, hf_tokenizer, tmp_path):
    """A blend's run validates, and its checkpoints are measured, on the blend's validation
    mix: of 40 windows at weights 0.7 and 0.3, the first 28 of one corpus' validation split
    and the first 12 of the other's (megatron-core's blending is exact at multiples of 10)."""
    import torch

    from sparsity_scaling.evaluation.inputs import ModelRef, load_eval_data
    from sparsity_scaling.evaluation.settings import DataSettings
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel

    seq_len, windows = 64, 40  # micro.yaml's seq_len; a multiple of its micro-batch, 8
    blend = f"[{{prefix: {trained}, weight: 0.7}}, {{prefix: {parquet}, weight: 0.3}}]"
    out = tmp_path / "run"
    result = run_cli("train", str(MICRO), "--out", str(out), "--set", f"data.blend={blend}",
                     "--set", f"data.tokenizer={trained}.model", "--set", "train.tokens=1024",
                     "--set", "checkpoint.first_tokens=1024", "--set", f"data.val_tokens={windows * seq_len}")
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(out)
    checkpoint = run.checkpoints()[-1]
    assert checkpoint.tokens == 1024
    record = json.loads(run.data_record.read_text())
    assert [p["weight"] for p in record["blend"]] == [0.7, 0.3]
    assert run.tokenizer.read_bytes() == Path(f"{trained}.model").read_bytes()

    mix = _first_windows(f"{trained}_valid", seq_len, 28) + _first_windows(f"{parquet}_valid", seq_len, 12)
    # the windows `evaluate` measures the checkpoint on: the mix, in megatron-core's order
    measured = load_eval_data(ModelRef(checkpoint=str(checkpoint.path)), DataSettings(eval_tokens=windows * seq_len))
    assert sorted(measured.sequences.tolist()) == sorted(mix)
    # the validation loss the run logged at its checkpoint: the model's mean token loss on the mix
    one_corpus = _first_windows(f"{trained}_valid", seq_len, windows)
    init_parallel(1)  # in this process, ended before the next command starts
    try:
        model = load_target(checkpoint=checkpoint.path)
        with torch.no_grad():
            loss = {name: model.token_losses(batch[:, :-1], batch[:, 1:]).double().mean().item()
                    for name, batch in (("mix", torch.tensor(mix)), ("one", torch.tensor(one_corpus)))}
    finally:
        shutdown_parallel()
    assert abs(loss["one"] - loss["mix"]) > 1e-3, loss  # the loss tells the mix from one corpus
    assert checkpoint.manifest["val_loss"] == pytest.approx(loss["mix"], rel=1e-5), loss

    hf = parquet_hf
    hf_run = run_cli("train", str(MICRO), "--out", str(tmp_path / "hf-run"), "--set", f"data.train_prefix={hf}_train",
                     "--set", f"data.valid_prefix={hf}_valid", "--set", f"data.tokenizer={hf_tokenizer}",
                     "--set", "train.tokens=1024", "--set", "checkpoint.first_tokens=1024")
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]
    assert (RunDir(tmp_path / "hf-run").tokenizer / "tokenizer.json").is_file()
    # refused before training: a blend of corpora made with two tokenizers, a missing corpus
    # (in this process: the command's one line for such errors is the decay test's)
    mixed = f"data.blend=[{{prefix: {trained}, weight: 1}}, {{prefix: {hf}, weight: 1}}]"
    with pytest.raises(UserError, match=r"data.blend\[1\].prefix .* made with another tokenizer"):
        prepare_data(load_config(MICRO, [mixed, f"data.tokenizer={trained}.model"]).data)
    missing = f"data.blend=[{{prefix: {tmp_path / 'nope'}, weight: 1}}]"
    with pytest.raises(UserError, match="is not a `sparsity-scaling data prepare` output"):
        prepare_data(load_config(MICRO, [missing, f"data.tokenizer={trained}.model"]).data)


def test_the_decay_stage_trains_on_its_own_data(trained, parquet, parquet_hf, tmp_path):
    """train.decay_data replaces the training data from the first decay step on: the run
    equals the one without it up to there, and differs after."""
    decay = parquet
    common = ["--set", f"data.blend=[{{prefix: {trained}, weight: 1}}]", "--set", f"data.tokenizer={trained}.model",
              "--set", "train.tokens=8192", "--set", "train.decay_fraction=0.5", "--set", "train.log_every=1",
              "--set", "checkpoint.first_tokens=4096"]
    runs = {}
    for name, extra in (("plain", []), ("decay", ["--set", f"train.decay_data=[{{prefix: {decay}, weight: 1}}]"])):
        result = run_cli("train", str(MICRO), "--out", str(tmp_path / name), *common, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [(p["step"], p["loss"]) for p in RunDir(tmp_path / name).metric_points() if p["kind"] == "train"]
    start = 4  # 8 steps, half of them decay
    assert runs["decay"][:start] == runs["plain"][:start]
    assert all(a[1] != b[1] for a, b in zip(runs["decay"][start:], runs["plain"][start:]))
    assert json.loads(RunDir(tmp_path / "decay").data_record.read_text())["decay"]["blend"][0]["prefix"] == str(decay)

    refused = run_here("train", str(MICRO), "--out", str(tmp_path / "mixed"), *common,
                       "--set", f"train.decay_data=[{{prefix: {parquet_hf}, weight: 1}}]")
    assert refused.returncode == 2 and "train.decay_data[0].prefix" in refused.stderr
    assert "made with another tokenizer" in refused.stderr and refused.stderr.count("\n") == 1


def test_grid_plan_tells_the_cost_and_the_corpus_before_anything_runs():
    result = run_here("grid", "plan", str(REPO / "configs" / "grids" / "sparsing_law.yaml"), "--mfu", "0.5",
                     "--peak-tflops", "1000")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("run "))
    for column in ("FLOPs", "GPU-h", "storage GB", "corpus tokens", "epochs"):
        assert column in header
    row = next(line for line in result.stdout.splitlines() if line.startswith("1.2b-relu "))
    # PaLM's count: (6 (N + V d) + 12 L d T) per token, 1.2B: d 1792, 32 layers, T 4096, V 16384
    config = load_config(REPO / "configs" / "models" / "1.2b.yaml")
    tokens = config.train.tokens // config.train.batch_tokens * config.train.batch_tokens
    flops = tokens * (6 * (config.model.non_embedding_params() + 16384 * 1792) + 12 * 32 * 1792 * 4096)
    assert sci(flops) in row
    assert f"{flops / (0.5 * 1000e12) / 3600:,.0f}" in row
    # measuring it: a forward pass is a third of a trained token; 28 checkpoints x 6 passes, the
    # stabilising search over the last 5 (6 each, then 1 each), the other 23 once (dense + sparse)
    forward = 2 * (config.model.non_embedding_params() + 16384 * 1792) + 4 * 32 * 1792 * 4096
    evaluation = (28 * 6 + 5 * 7 + 23 * 2) * 1048576 * forward
    assert f"{sci(evaluation)}  " in row and f"{evaluation / (0.5 * 1000e12) / 3600:.2g}  " in row
    for column in ("eval FLOPs", "eval GPU-h"):
        assert column in header
    assert "measuring them: " in result.stdout and "over the last 5" in result.stdout
    assert "not prepared (/shared/corpora/pretrain_train)" in row
    assert "GPU-hours at MFU 0.5 of 1000 TFLOP/s" in result.stdout


def test_checkpoint_storage_estimate_matches_a_real_run(micro_run):
    from sparsity_scaling.costs import RunCost

    checkpoints = RunDir(micro_run).checkpoints()
    written = sum(f.stat().st_size for c in checkpoints for f in c.path.rglob("*") if f.is_file())
    estimate = RunCost.of(checkpoints[-1].config(), vocab_size=512, bf16=False).storage_bytes
    assert estimate == pytest.approx(written, rel=0.05)


def test_grid_plan_shows_a_prepared_corpus_tokens_and_epochs(trained, tmp_path):
    manifest = PreparedCorpus(trained).manifest()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
name: prepared
base: {MICRO}
overrides:
  data.train_prefix: {trained}_train
  data.valid_prefix: {trained}_valid
  data.tokenizer: {trained}.model
  train.tokens: 65536
""")
    result = run_here("grid", "plan", str(grid))
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[3]
    corpus = manifest["splits"]["train"]["tokens"]
    assert sci(corpus) in row
    assert f"{65536 / corpus:.2f}" in row.split()[-1]
