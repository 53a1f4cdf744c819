"""A sentencepiece tokenizer trained on the training split, cached by input and settings.

BPE with byte fallback, so any text (code included) encodes without unknown tokens, and the
identity normalisation, so indentation survives a round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

from ..errors import UserError
from ..files import directory_written_whole
from .corpus import Document

EOS_ID = 1
_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=0,
    eos_id=EOS_ID,
    bos_id=-1,
    pad_id=-1,
    character_coverage=0.9995,
    input_sentence_size=400_000,
    shuffle_input_sentence=True,
    max_sentence_length=8192,
    hard_vocab_limit=True,
    minloglevel=2,
)


def _lines(docs: list[Document]) -> Iterator[str]:
    for doc in docs:
        for line in doc.text.splitlines():
            if line.strip():
                yield line


def tokenizer_key(train_hash: str, vocab_size: int) -> str:
    settings = json.dumps({**_SETTINGS, "vocab_size": vocab_size}, sort_keys=True)
    return hashlib.sha256(f"{train_hash}\n{settings}".encode()).hexdigest()[:16]


def train_tokenizer(docs: list[Document], train_hash: str, vocab_size: int, cache: Path) -> Path:
    """Return the cached model for this training split and vocabulary, training it if absent."""
    target = cache / "tokenizers" / tokenizer_key(train_hash, vocab_size)
    model = target / "tokenizer.model"
    if model.exists():
        return model
    with directory_written_whole(target) as work:  # another process may finish first: fine
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(docs),
                model_prefix=str(work / "tokenizer"),
                vocab_size=vocab_size,
                num_threads=os.cpu_count() or 1,
                **_SETTINGS,
            )
        except RuntimeError as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else "training failed"
            raise UserError(
                f"data.vocab_size {vocab_size}: the training split cannot support it ({message})"
            ) from None
    return model


class Tokenizer:
    """Thin wrapper so the rest of the code never touches sentencepiece directly."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"data.tokenizer: {path} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.eos_id = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
