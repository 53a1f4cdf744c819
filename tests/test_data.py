"""Data pipeline: corpus split, tokenizer cache, Megatron indexed format, sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset

from sparsity_scaling.config import DataConfig
from sparsity_scaling.data.pipeline import prepare_data
from sparsity_scaling.data.corpus import load_documents, split_documents
from sparsity_scaling.data.indexed import open_token_stream
from sparsity_scaling.data.sampler import WindowSampler
from sparsity_scaling.data.tokenizer import load_tokenizer
from sparsity_scaling.errors import UserError

SMALL = dict(max_corpus_bytes=1_500_000, vocab_size=512)


def test_default_corpus_has_code_and_docs_split_disjointly():
    docs = load_documents("stdlib")
    kinds = {d.kind for d in docs}
    assert kinds == {"code", "doc"}
    split = split_documents(docs, 0.05)
    train_ids, valid_ids = {d.id for d in split.train}, {d.id for d in split.valid}
    assert not train_ids & valid_ids
    assert not {d.digest for d in split.train} & {d.digest for d in split.valid}
    assert len(train_ids) + len(valid_ids) == len(docs)
    assert 0.02 < len(valid_ids) / len(docs) < 0.1
    # the split is a pure function of the documents
    again = split_documents(list(reversed(docs)), 0.05)
    assert again.train_hash == split.train_hash and again.valid_hash == split.valid_hash


def test_the_default_corpus_as_code_or_prose_for_data_prepare(tmp_path, capsys):
    """`data stdlib --subset`: the decay demo's two kinds of text, as JSONL `data prepare` reads."""
    import itertools

    from sparsity_scaling.cli import main
    from sparsity_scaling.data.corpus import stdlib_documents, stdlib_subset
    from sparsity_scaling.data.sources import corpus_documents

    prose = list(itertools.islice(stdlib_subset("prose"), 20))
    assert all(d.id.startswith("prose/code/") for d in prose)  # docstrings first, documentation topics last
    source = next(d for d in stdlib_documents() if d.id == prose[0].id.removeprefix("prose/"))
    lines = [line for paragraph in prose[0].text.split("\n\n") for line in paragraph.splitlines()]
    assert all(line.strip() in source.text for line in lines)  # its docstrings (dedented), nothing else
    out = tmp_path / "code.jsonl"
    assert main(["data", "stdlib", str(out), "--subset", "code"]) == 0
    written = corpus_documents([str(out)])
    assert [next(written) for _ in range(3)] == [d.text for d in itertools.islice(stdlib_subset("code"), 3)]
    assert "documents" in capsys.readouterr().out
    assert main(["data", "stdlib", str(tmp_path / "code.txt"), "--subset", "code"]) == 2
    assert not (tmp_path / "code.txt").exists()


def test_prepared_data_is_megatron_format_and_records_the_split(tmp_path):
    data = prepare_data(DataConfig(**SMALL))
    for prefix, key in ((data.train[0], "train_tokens"), (data.valid[0], "valid_tokens")):
        dataset = IndexedDataset(prefix)  # megatron-core reads it as it is
        stream = open_token_stream(prefix)
        assert len(stream) == data.record[key] == int(dataset.sequence_lengths.sum())
        assert stream.max() < data.vocab_size
    tokenizer = load_tokenizer(data.tokenizer)
    valid = IndexedDataset(data.valid[0])
    first_doc = np.array(valid[0])  # copy: the array views the dataset's mmap
    assert first_doc[-1] == tokenizer.eos_id  # every document ends with EOS
    valid_docs = set(data.record["valid_documents"])
    assert valid_docs and not valid_docs & set(data.record["train_documents"])
    text = "def f(x):\n    return x  # indentation survives\n"
    assert tokenizer.decode(tokenizer.encode([text])[0]) == text


def test_tokenizer_is_cached_by_input_and_settings(monkeypatch):
    first = prepare_data(DataConfig(**SMALL))

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer retrained despite a cache hit")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", refuse)
    again = prepare_data(DataConfig(**SMALL))
    assert again.tokenizer == first.tokenizer and again.train[0] == first.train[0]
    with pytest.raises(AssertionError, match="retrained"):
        prepare_data(DataConfig(**{**SMALL, "vocab_size": 600}))  # new settings: new tokenizer


def test_user_corpora_txt_and_jsonl(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "neuron", "token", "layer"]
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 400)) + "\n")
    with (corpus / "more.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 300)), "id": i}) + "\n")
    docs = load_documents(str(corpus))
    assert len(docs) == 80
    data = prepare_data(DataConfig(corpus=str(corpus), vocab_size=320, seq_len=16, val_fraction=0.2))
    assert data.record["train_tokens"] > 0 and data.record["valid_tokens"] > 0


@pytest.mark.parametrize(
    "setup, config, message",
    [
        (lambda p: None, {"corpus": "{p}/missing"}, "does not exist"),
        (lambda p: (p / "empty").mkdir(), {"corpus": "{p}/empty"}, "no non-empty documents"),
        (lambda p: (p / "bad.jsonl").write_text('{"txt": "x"}\n'), {"corpus": "{p}/bad.jsonl"}, "bad.jsonl:1"),
        (None, {"vocab_size": 60000, "max_corpus_bytes": 800_000}, "data.vocab_size 60000"),
    ],
)
def test_bad_data_gets_a_clear_error(tmp_path, setup, config, message):
    if setup:
        setup(tmp_path)
    config = {k: v.format(p=tmp_path) if isinstance(v, str) else v for k, v in config.items()}
    with pytest.raises(UserError, match=message) as error:
        prepare_data(DataConfig(**config))
    assert "\n" not in str(error.value)


def test_sampler_batch_depends_only_on_consumed_count():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = WindowSampler(tokens, seq_len=32, seed=7)
    b = WindowSampler(tokens, seq_len=32, seed=7)
    late = a.samples(700, 16)  # crosses into the third epoch (312 windows an epoch)
    b.samples(0, 5)
    assert np.array_equal(b.samples(700, 16), late)
    assert np.array_equal(late[:, 1:], late[:, :-1] + 1)  # contiguous windows
    epoch = a.samples(0, a.num_windows)[:, 0] // 32
    assert sorted(epoch.tolist()) == list(range(a.num_windows))  # each window once per epoch
    assert not np.array_equal(WindowSampler(tokens, 32, seed=8).samples(0, 16), a.samples(0, 16))
