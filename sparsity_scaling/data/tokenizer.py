"""Tokenizers: a sentencepiece model trained on the training split (cached by input and
settings), or an existing one, or a local Hugging Face tokenizer (`tokenizer.json`).

The trained model is BPE with byte fallback, so any text (code included) encodes without
unknown tokens, and the identity normalisation, so indentation survives a round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from ..errors import SettingError, UserError
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


def tokenizer_key(train_hash: str, vocab_size: int) -> str:
    settings = json.dumps({**_SETTINGS, "vocab_size": vocab_size}, sort_keys=True)
    return hashlib.sha256(f"{train_hash}\n{settings}".encode()).hexdigest()[:16]


def train_sentencepiece(texts: Iterable[str], model_prefix: Path, vocab_size: int, setting: str) -> None:
    """Train our sentencepiece BPE on `texts` into model_prefix.model; `setting` names the
    vocabulary setting in the error if the texts cannot support that vocabulary."""
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,
            **_SETTINGS,
        )
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "training failed"
        raise UserError(f"{setting} {vocab_size}: the training text cannot support it ({message})") from None


def train_tokenizer(docs: list[Document], train_hash: str, vocab_size: int, cache: Path) -> Path:
    """Return the cached model for this training split and vocabulary, training it if absent."""
    target = cache / "tokenizers" / tokenizer_key(train_hash, vocab_size)
    model = target / "tokenizer.model"
    if model.exists():
        return model
    with directory_written_whole(target) as work:  # another process may finish first: fine
        train_sentencepiece((d.text for d in docs), work / "tokenizer", vocab_size, "data.vocab_size")
    return model


class Tokenizer:
    """What the rest of the code needs of a tokenizer; `load_tokenizer` picks the kind."""

    path: Path
    eos_id: int
    vocab_size: int

    def encode(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Token ids of each text, no special tokens added (`threads`: default all cores)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def digest(self) -> str:
        """A hash of the tokenizer's definition: corpora and runs that share it agree."""
        return hashlib.sha256(self.definition.read_bytes()).hexdigest()[:16]

    @property
    def definition(self) -> Path:
        return self.path


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:
            raise SettingError("tokenizer", path, f"not a sentencepiece model ({_first_line(error)})") from None
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise SettingError("tokenizer", path, "defines no end-of-document token (eos)")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads or os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# End-of-document tokens of common Hugging Face tokenizers, tried when tokenizer_config.json
# names none.
_HF_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer from a local directory (never downloaded). Its threads
    are Rayon's: RAYON_NUM_THREADS, set before the first encode, bounds them."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        try:
            self.tok = RustTokenizer.from_file(str(self.definition))
        except Exception as error:  # the Rust side raises plain Exception
            raise SettingError("tokenizer", path, f"not a Hugging Face tokenizer.json ({_first_line(error)})") from None
        config = path / "tokenizer_config.json"
        named = None
        if config.is_file():
            try:
                named = json.loads(config.read_text()).get("eos_token")
            except (ValueError, AttributeError):
                raise SettingError("tokenizer", config, "not valid JSON") from None
            named = named.get("content") if isinstance(named, dict) else named
        ids = [self.tok.token_to_id(t) for t in ([named] if named else _HF_EOS)]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise SettingError("tokenizer", path, "has no end-of-document token (eos_token in tokenizer_config.json)")
        self.eos_id = ids[0]
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def definition(self) -> Path:
        return self.path / "tokenizer.json"

    def encode(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece `.model` file, or a directory holding a Hugging Face `tokenizer.json`."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise SettingError("tokenizer", path, "holds no tokenizer.json (a Hugging Face fast tokenizer)")
        return HFTokenizer(path)
    if path.name == "tokenizer.json" and path.is_file():
        return HFTokenizer(path.parent)
    if not path.is_file():
        raise SettingError("tokenizer", path, "does not exist")
    return SentencePieceTokenizer(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
