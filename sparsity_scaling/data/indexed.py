"""Token storage in megatron-core's indexed dataset format (.bin/.idx).

Corpora prepared for Megatron (with an end-of-document token appended) load as they are:
the .bin file is the documents' tokens back to back, which we read as one token stream.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from ..errors import UserError


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


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
    dataset = IndexedDataset(prefix)
    dtype = dataset.index.dtype
    if os.path.getsize(prefix + ".bin") == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r")
