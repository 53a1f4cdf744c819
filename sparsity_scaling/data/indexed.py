"""Token storage in megatron-core's indexed dataset format (.bin/.idx).

Corpora prepared for Megatron (with an end-of-document token appended) load as they are:
the .bin file is the documents' tokens back to back, which we read as one token stream.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset, IndexedDatasetBuilder

from ..errors import UserError


def token_dtype(vocab_size: int) -> type:
    """The narrowest dtype megatron-core stores this vocabulary's ids in."""
    return DType.optimal_dtype(vocab_size)


def write_indexed(prefix: Path, documents: list[list[int]], vocab_size: int) -> None:
    """Write documents (token id lists) as prefix.bin / prefix.idx."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=token_dtype(vocab_size))
    for ids in documents:
        builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")


def open_token_stream(prefix: str | Path) -> np.ndarray:
    """The whole dataset as a read-only memory-mapped 1-D token array."""
    prefix = str(prefix)
    if not IndexedDataset.exists(prefix):
        raise UserError(f"{prefix}: no Megatron indexed dataset (.bin and .idx) at this prefix")
    if os.path.getsize(prefix + ".bin") == 0:  # megatron-core cannot open an empty dataset
        return np.zeros(0, dtype=np.int32)
    return np.memmap(prefix + ".bin", dtype=IndexedDataset(prefix).index.dtype, mode="r")


def indexed_tokens(prefix: str | Path) -> int:
    """Tokens in a dataset, from its files' sizes (nothing read)."""
    return len(open_token_stream(prefix))


def _replace_pair(source: str, target: str) -> None:
    os.replace(f"{source}.bin", f"{target}.bin")
    os.replace(f"{source}.idx", f"{target}.idx")


def write_indexed_atomic(prefix: Path, write) -> None:
    """`write(temporary_prefix)` then rename .bin and .idx into place: a crash leaves only
    `.tmp-` files, never a half-written dataset under `prefix`."""
    tmp = prefix.with_name(".tmp-" + prefix.name)
    write(tmp)
    _replace_pair(str(tmp), str(prefix))


def merge_indexed(prefix: Path, parts: list[str], dtype) -> None:
    """Concatenate indexed datasets, in order, into one at `prefix` (atomically).

    Streams: memory holds one part's index at a time, whatever the corpus' size. The index
    is megatron-core's (`_IndexWriter`): header, version, dtype code, sequence and document
    counts, then sequence lengths (int32), byte pointers (int64) and document indices (int64).
    """
    parts = [part for part in parts if os.path.getsize(f"{part}.bin")]  # empty ones add nothing
    indexes = [IndexedDataset(part).index for part in parts]
    itemsize = np.dtype(dtype).itemsize

    def write(tmp: Path) -> None:
        with open(f"{tmp}.bin", "wb") as out:
            for part in parts:
                with open(f"{part}.bin", "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 24)
        sequences = sum(len(ix.sequence_lengths) for ix in indexes)
        with open(f"{tmp}.idx", "wb") as out:
            out.write(_INDEX_HEADER)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", DType.code_from_dtype(dtype)))
            out.write(struct.pack("<Q", sequences))
            out.write(struct.pack("<Q", 1 + sum(len(ix.document_indices) - 1 for ix in indexes)))
            for ix in indexes:
                out.write(np.asarray(ix.sequence_lengths, dtype=np.int32).tobytes())
            offset = 0
            for ix in indexes:
                out.write((np.asarray(ix.sequence_pointers, dtype=np.int64) + offset).tobytes())
                offset += int(np.sum(ix.sequence_lengths, dtype=np.int64)) * itemsize
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            done = 0
            for ix in indexes:
                out.write((np.asarray(ix.document_indices[1:], dtype=np.int64) + done).tobytes())
                done += len(ix.sequence_lengths)

    for ix in indexes:
        if ix.dtype != dtype:
            raise ValueError(f"cannot merge {ix.dtype} tokens into a {np.dtype(dtype)} dataset")
    write_indexed_atomic(prefix, write)
