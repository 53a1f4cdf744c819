"""What a measurement runs on: the model (one of our checkpoints, a local Hugging Face
directory or a GGUF file), its tokenizer, and the validation tokens (`DataSettings`)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..config import DataConfig
from ..data.corpus import Document, file_documents, load_documents, split_documents
from ..data.sampler import consecutive_windows
from ..errors import SettingError, UserError
from ..metrics.measure import EvalData
from ..rundir import Checkpoint, read_checkpoint
from .settings import DataSettings

HF_SEQ_LEN = 512  # a Hugging Face model's default validation sequence length

Encoder = tuple[Callable[[str], list[int]], int]  # (text -> ids, end-of-document id)


@dataclass(frozen=True)
class ModelRef:
    """One model to measure: one of our checkpoints, or (`hf_model`) a local Hugging Face
    directory or GGUF file."""

    checkpoint: str | None = None
    hf_model: str | None = None

    def __post_init__(self):
        if (self.checkpoint is None) == (self.hf_model is None):
            raise UserError("give either a checkpoint or a Hugging Face model directory")

    @property
    def name(self) -> str:
        return str(self.checkpoint or self.hf_model)

    def read_checkpoint(self) -> Checkpoint:
        return read_checkpoint(self.checkpoint)

    def load(self, tp: int = 1):
        """The model as a `SparsityTarget` at TP size `tp` (call init_parallel(tp) first)."""
        from ..hf import load_target

        return load_target(checkpoint=self.checkpoint, hf_model=self.hf_model, tp=tp)

    def activation(self, target) -> str | None:
        """The FFN's activation function by name (relu, silu, ...), if the model says."""
        if self.checkpoint:
            return self.read_checkpoint().config().model.activation
        config = getattr(getattr(target, "model", None), "config", None)
        return getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)

    def run_tokenizer(self):
        """The tokenizer of a checkpoint's run (sentencepiece or Hugging Face)."""
        from ..data.tokenizer import load_tokenizer

        path = self.read_checkpoint().run.tokenizer
        if not path.exists():
            raise UserError(f"{self.checkpoint}: no {path.name} in its run directory; give validation tokens")
        return load_tokenizer(path)

    def hf_tokenizer(self):
        """A local Hugging Face model's tokenizer, or a GGUF file's (never downloaded)."""
        from ..hf import hf_tokenizer

        try:
            return hf_tokenizer(self.hf_model)
        except (OSError, ValueError) as error:
            raise SettingError("hf_model", self.hf_model, f"no usable tokenizer ({str(error).splitlines()[0]}); "
                               "give validation tokens") from None

    def encoder(self) -> Encoder:
        """(encode text -> ids, end-of-document id) of the model's tokenizer."""
        if self.checkpoint:
            tok = self.run_tokenizer()
            return (lambda text: tok.encode([text])[0]), tok.eos_id
        tok = self.hf_tokenizer()
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), eos


def tokenize_documents(docs: Iterable[Document], encoder: Encoder, seq_len: int, max_tokens: int) -> torch.Tensor | None:
    """Documents joined by end-of-document tokens, cut into sequences of seq_len + 1;
    None if the documents hold no text."""
    encode, eos = encoder
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(doc.text))
        ids.append(eos)
        if len(ids) > max_tokens + seq_len + 1:
            break
    return consecutive_windows(np.asarray(ids), seq_len + 1, max_tokens) if ids else None


def _token_file(path: str) -> torch.Tensor:
    try:
        array = np.load(path)
    except (OSError, ValueError) as error:
        raise SettingError("tokens", path, f"cannot read ({error})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise SettingError("tokens", path, f"expected an int array (sequences, length), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def _text_file(path: str, model: ModelRef, seq_len: int, max_tokens: int) -> torch.Tensor:
    sequences = tokenize_documents(file_documents(path), model.encoder(), seq_len, max_tokens)
    if sequences is None:
        raise SettingError("text_file", path, "no text")
    return sequences


_shared_windows: dict[tuple, torch.Tensor] | None = None  # inside validation_read_once() only


@contextlib.contextmanager
def validation_read_once():
    """Within the block (one series: evaluate-run, evaluate-series, the grid's stabilised
    job), the checkpoints of a run share its validation windows, read once: finding the
    split reads the whole corpus again (seconds on the built-in one). Outside it every read
    is fresh, so a long-lived worker never serves a corpus prepared again since."""
    global _shared_windows
    outer = _shared_windows
    _shared_windows = {} if outer is None else outer
    try:
        yield
    finally:
        _shared_windows = outer


def _run_validation(data: DataConfig, seq_len: int, max_tokens: int) -> torch.Tensor:
    from ..data.pipeline import prepare_data

    key = (data.model_dump_json(), seq_len, max_tokens)
    if _shared_windows is not None and key in _shared_windows:
        return _shared_windows[key]
    windows = prepare_data(data).validation_windows(seq_len, max_tokens)
    if _shared_windows is not None:
        _shared_windows[key] = windows
    return windows


def load_eval_data(model: ModelRef, data: DataSettings) -> EvalData:
    """Validation tokens, validation text, or (our checkpoints) the run's own validation split."""
    if data.tokens:
        return EvalData(_token_file(data.tokens), data.batch_size)
    if model.checkpoint:
        config = model.read_checkpoint().config()
        seq_len = data.seq_len or config.data.seq_len
        if data.text_file:
            return EvalData(_text_file(data.text_file, model, seq_len, data.eval_tokens), data.batch_size)
        return EvalData(_run_validation(config.data, seq_len, data.eval_tokens), data.batch_size)
    if not data.text_file:
        raise SettingError("text_file", None, "a Hugging Face model needs validation text or tokens")
    return EvalData(_text_file(data.text_file, model, data.seq_len or HF_SEQ_LEN, data.eval_tokens), data.batch_size)


def validation_by_kind(model: ModelRef, data: DataSettings) -> dict[str, EvalData]:
    """A checkpoint's validation documents, one dataset per kind (code and doc for the
    default corpus), tokenized as in training."""
    ck = model.read_checkpoint()
    config = ck.config()
    if config.data.train_prefix or config.data.blend:  # a prepared corpus: no documents to tell apart
        return {"validation": load_eval_data(model, data)}
    run = ck.run
    split = split_documents(load_documents(config.data.corpus, config.data.max_corpus_bytes), config.data.val_fraction)
    if run.data_record.is_file() and json.loads(run.data_record.read_text()).get("valid_hash") != split.valid_hash:
        raise UserError(f"{run.path}: corpus {config.data.corpus} no longer gives the run's validation split; "
                        f"give validation text or tokens")
    kinds: dict[str, list[Document]] = {}
    for doc in split.valid:
        kinds.setdefault(doc.kind, []).append(doc)
    seq_len = data.seq_len or config.data.seq_len
    encoder = model.encoder()
    out = {}
    for kind, docs in sorted(kinds.items()):
        what = f"{run.name}: validation {kind} documents"
        try:
            sequences = tokenize_documents(docs, encoder, seq_len, data.eval_tokens)
        except UserError as error:
            raise UserError(f"{what}: {error}") from None
        if sequences is None:
            raise UserError(f"{what}: no text")
        out[kind] = EvalData(sequences, data.batch_size)
    return out
