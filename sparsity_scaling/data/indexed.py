"""Token storage in megatron-core's indexed dataset format (.bin/.idx).

Corpora prepared for Megatron (with an end-of-document token appended) load as they are:
the .bin file is the documents' tokens back to back, which we read as one token stream.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from ..errors import UserError


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed_pair(target: Path, splits: dict[str, list[list[int]]], vocab_size: int) -> None:
    """Write {name: documents} as name.bin/name.idx into `target`, atomically as a directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        for name, documents in splits.items():
            builder = IndexedDatasetBuilder(str(work / f"{name}.bin"), dtype=token_dtype(vocab_size))
            for ids in documents:
                builder.add_document(np.asarray(ids), [len(ids)])
            builder.finalize(str(work / f"{name}.idx"))
        os.rename(work, target)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        if not target.exists():
            raise


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
