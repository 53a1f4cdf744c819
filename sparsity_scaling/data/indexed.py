"""Token storage in megatron-core's indexed dataset format (.bin/.idx).

Corpora prepared for Megatron (with an end-of-document token appended) load as they are:
the .bin file is the documents' tokens back to back, which we read as one token stream.

Writing needs no megatron-core (its import costs seconds in every tokenizing worker): the
format is small, and `IndexedWriter` writes it exactly as megatron-core's `_IndexWriter`
does (the tests read every output back through megatron-core's `IndexedDataset`):

    .idx  b"MMIDIDX\\0\\0", version 1 (<Q), dtype code (<B), sequence count (<Q), document
          count + 1 (<Q), then sequence lengths (int32), byte pointers into .bin (int64) and
          document indices (int64: 0, then the sequence count after each document)
    .bin  the tokens of every sequence back to back
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

from ..errors import UserError

_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
          np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype megatron-core stores this vocabulary's ids in (DType.optimal_dtype)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def _write_index(path: str, dtype: np.dtype, sequences: int, documents: int, sections) -> None:
    """The .idx file; `sections` yields its arrays (lengths, pointers, document indices) in order."""
    with open(path, "wb") as out:
        out.write(_HEADER)
        out.write(struct.pack("<Q", 1))
        out.write(struct.pack("<B", _CODES[np.dtype(dtype)]))
        out.write(struct.pack("<Q", sequences))
        out.write(struct.pack("<Q", documents + 1))
        for array in sections:
            out.write(array.tobytes())


class IndexedWriter:
    """Documents appended one at a time to prefix.bin; prefix.idx written by `close`.
    Memory: the documents' lengths only."""

    def __init__(self, prefix: str | Path, dtype):
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        self.bin = open(f"{self.prefix}.bin", "wb")
        self.lengths: list[int] = []

    def add(self, ids) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        self.bin.write(tokens.tobytes())
        self.lengths.append(len(tokens))

    def close(self) -> None:
        self.bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int64)
        pointers = (np.cumsum(lengths) - lengths) * self.dtype.itemsize
        _write_index(f"{self.prefix}.idx", self.dtype, len(lengths), len(lengths),
                     [lengths.astype(np.int32), pointers, np.arange(len(lengths) + 1, dtype=np.int64)])


def write_indexed(prefix: Path, documents: list[list[int]], vocab_size: int) -> None:
    """Write documents (token id lists) as prefix.bin / prefix.idx."""
    writer = IndexedWriter(prefix, token_dtype(vocab_size))
    for ids in documents:
        writer.add(ids)
    writer.close()


def read_index(prefix: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, byte pointers, document indices) of a dataset, memory-mapped."""
    path = f"{prefix}.idx"
    with open(path, "rb") as f:
        head = f.read(len(_HEADER) + 8 + 1 + 8 + 8)
    if len(head) < 34 or not head.startswith(_HEADER):
        raise UserError(f"{path}: not a megatron-core index file")
    code, sequences, documents = struct.unpack("<BQQ", head[17:34])
    lengths = np.memmap(path, dtype=np.int32, mode="r", offset=34, shape=(sequences,)) if sequences else np.zeros(0, np.int32)
    offset = 34 + 4 * sequences
    pointers = np.memmap(path, dtype=np.int64, mode="r", offset=offset, shape=(sequences,)) if sequences else np.zeros(0, np.int64)
    offset += 8 * sequences
    indices = np.memmap(path, dtype=np.int64, mode="r", offset=offset, shape=(documents,))
    return _DTYPES[code], lengths, pointers, indices


def open_token_stream(prefix: str | Path) -> np.ndarray:
    """The whole dataset as a read-only memory-mapped 1-D token array."""
    prefix = str(prefix)
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise UserError(f"{prefix}: no Megatron indexed dataset (.bin and .idx) at this prefix")
    if os.path.getsize(prefix + ".bin") == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.int32)
    return np.memmap(prefix + ".bin", dtype=read_index(prefix)[0], mode="r")


def indexed_tokens(prefix: str | Path) -> int:
    """Tokens in a dataset, from its files' sizes (nothing read)."""
    return len(open_token_stream(prefix))


def merge_indexed(prefix: Path, parts: list[str], dtype) -> None:
    """Concatenate indexed datasets, in order, into one at `prefix`, atomically: written
    under `.tmp-` names and renamed into place. Streams: the parts' indexes are memory-mapped
    and written section by section."""
    dtype = np.dtype(dtype)
    indexes = [read_index(part) for part in parts]  # memory-mapped: nothing read yet
    for part, (part_dtype, *_) in zip(parts, indexes):
        if part_dtype != dtype:
            raise UserError(f"{part}: holds {part_dtype} tokens, not {dtype}")
    tmp = prefix.with_name(".tmp-" + prefix.name)
    with open(f"{tmp}.bin", "wb") as out:
        for part in parts:
            with open(f"{part}.bin", "rb") as source:
                shutil.copyfileobj(source, out, 1 << 24)

    def sections():
        for _, lengths, _, _ in indexes:
            yield np.asarray(lengths)
        offset = 0
        for _, lengths, pointers, _ in indexes:
            yield np.asarray(pointers) + offset
            offset += int(np.sum(lengths, dtype=np.int64)) * dtype.itemsize
        yield np.zeros(1, dtype=np.int64)
        done = 0
        for _, lengths, _, documents in indexes:
            yield np.asarray(documents[1:]) + done
            done += len(lengths)

    sequences = sum(len(lengths) for _, lengths, _, _ in indexes)
    documents = sum(len(documents) - 1 for _, _, _, documents in indexes)
    _write_index(f"{tmp}.idx", dtype, sequences, documents, sections())
    for ext in (".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
