"""A corpus on disk as documents: finding its files, cutting them into shards that workers
read independently, and reading the documents of one shard in the corpus' order.

    .jsonl        one JSON object per line, text in a field (`text_field`); cut by byte ranges
    .jsonl.gz     the same, gzip-compressed; one shard per file (gzip cannot seek)
    .parquet      a text column; cut by row groups
    .txt          one document per file; consecutive files grouped into shards

A shard's documents, shard after shard, are the corpus' documents in order: files sorted by
path, lines and rows in file order. A record whose text is empty or whitespace only (a
JSON line's text, a parquet row, a whole .txt file) is no document: it is counted as an
empty record (`DroppedRecords`). Blank lines of a JSON-lines file are not records.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError

KINDS = {".jsonl.gz": "jsonl.gz", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}


def _kind(path: Path) -> str | None:
    return next((kind for suffix, kind in KINDS.items() if path.name.endswith(suffix)), None)


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute, so every node of a cluster reads the same file
    kind: str
    size: int
    mtime_ns: int


def find_inputs(inputs: list[str]) -> list[InputFile]:
    """The corpus files named by `inputs` (files, or directories searched recursively)."""
    found: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not files:
                raise UserError(f"{text}: holds no {', '.join(KINDS)} files")
            found.extend(files)
        elif path.is_file():
            if not _kind(path):
                raise UserError(f"{text}: not a {', '.join(KINDS)} file")
            found.append(path)
        else:
            raise UserError(f"{text}: no such file or directory")
    files, seen = [], set()
    for path in found:
        path = path.resolve()
        if path not in seen:
            seen.add(path)
            stat = path.stat()
            files.append(InputFile(str(path), _kind(path), stat.st_size, stat.st_mtime_ns))
    return files


@dataclass(frozen=True)
class Shard:
    """A piece of the corpus one worker tokenizes: byte range of a .jsonl file, row groups of
    a .parquet file, a whole .jsonl.gz file, or consecutive .txt files."""

    index: int
    kind: str
    files: tuple[str, ...]
    start: int = 0  # jsonl: first byte; parquet: first row group
    stop: int = 0  # jsonl: end byte; parquet: end row group
    size: int = 0  # input bytes (for progress)

    def row(self) -> dict:
        return {**asdict(self), "files": list(self.files)}

    @classmethod
    def from_row(cls, row: dict) -> "Shard":
        return cls(**{**row, "files": tuple(row["files"])})


def _parquet_file(path: str, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    schema = file.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); see --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_field!r} holds {kind}, not text")
    return file


def plan_shards(inputs: list[InputFile], shard_bytes: int, text_field: str) -> list[Shard]:
    """Cut the corpus into shards of about `shard_bytes` of input each, in corpus order."""
    shards: list[Shard] = []

    def add(kind, files, start=0, stop=0, size=0):
        shards.append(Shard(len(shards), kind, tuple(files), start, stop, size))

    texts: list[InputFile] = []

    def flush_texts():
        if texts:
            add("txt", [f.path for f in texts], size=sum(f.size for f in texts))
            texts.clear()

    for file in inputs:
        if file.kind != "txt":
            flush_texts()
        if file.kind == "txt":
            texts.append(file)
            if sum(f.size for f in texts) >= shard_bytes:
                flush_texts()
        elif file.kind == "jsonl":
            for start in range(0, max(file.size, 1), shard_bytes):
                stop = min(start + shard_bytes, file.size)
                add("jsonl", [file.path], start, stop, stop - start)
        elif file.kind == "jsonl.gz":
            add("jsonl.gz", [file.path], size=file.size)
        else:
            metadata = _parquet_file(file.path, text_field).metadata
            first, size = 0, 0
            for group in range(metadata.num_row_groups):
                size += metadata.row_group(group).total_byte_size
                if size >= shard_bytes or group == metadata.num_row_groups - 1:
                    add("parquet", [file.path], first, group + 1, size)
                    first, size = group + 1, 0
    flush_texts()
    return shards


class DroppedRecords:
    """Records that give no document, so that none is dropped without a word: bad ones (bad
    JSON, no text: an error, or with `skip` counted and skipped) and empty ones (a text that
    is empty or whitespace only: counted)."""

    def __init__(self, skip: bool):
        self.skip, self.bad_count, self.first_bad, self.empty_count = skip, 0, None, 0

    def bad(self, where: str, reason: str) -> None:
        if not self.skip:
            raise UserError(f"{where}: {reason} (--skip-bad-lines skips such lines)")
        self.bad_count += 1
        self.first_bad = self.first_bad or f"{where}: {reason}"

    def document(self, text: str) -> str | None:
        """`text` as a document; None (counted) if it is empty or whitespace only."""
        if text.strip():
            return text
        self.empty_count += 1
        return None


def _line_number(path: str, offset: int) -> int:
    """The 1-based line that starts at byte `offset` (counted only when reporting an error)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def _line_document(line: bytes, text_field: str, dropped: DroppedRecords, where: Callable[[], str]) -> str | None:
    """The document of a JSON line; None for a blank line, or an empty or bad record
    (reported to `dropped`, a bad one at `where()`, computed only then)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as error:
        dropped.bad(where(), f"not valid JSON ({getattr(error, 'msg', None) or type(error).__name__})")
        return None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        dropped.bad(where(), f"expected an object with a string {text_field!r} field")
        return None
    return dropped.document(text)


def _jsonl_range(shard: Shard, text_field: str, dropped: DroppedRecords) -> Iterator[str]:
    """The lines that start in [start, stop) of a .jsonl file."""
    path = shard.files[0]
    with open(path, "rb") as f:
        position = shard.start
        if position > 0:  # the line that starts at `start` is ours only if a line ended just before
            f.seek(position - 1)
            position += len(f.readline()) - 1
        while position < shard.stop:
            line = f.readline()
            if not line:
                break
            text = _line_document(line, text_field, dropped, lambda at=position: f"{path}:{_line_number(path, at)}")
            if text is not None:
                yield text
            position += len(line)


def _jsonl_gz(shard: Shard, text_field: str, dropped: DroppedRecords) -> Iterator[str]:
    path = shard.files[0]
    try:
        with gzip.open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                text = _line_document(line, text_field, dropped, lambda at=number: f"{path}:{at}")
                if text is not None:
                    yield text
    except (OSError, EOFError) as error:
        raise UserError(f"{path}: not a readable gzip file ({error})") from None


def _parquet_rows(shard: Shard, text_field: str, dropped: DroppedRecords) -> Iterator[str]:
    path = shard.files[0]
    file = _parquet_file(path, text_field)
    row = sum(file.metadata.row_group(g).num_rows for g in range(shard.start))
    for batch in file.iter_batches(batch_size=4096, row_groups=range(shard.start, shard.stop), columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                dropped.bad(f"{path}: row {row}", f"{text_field!r} is null")
            elif dropped.document(text) is not None:
                yield text
            row += 1


def _text_files(shard: Shard, text_field: str, dropped: DroppedRecords) -> Iterator[str]:
    for path in shard.files:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if dropped.document(text) is not None:
            yield text


_READERS = {"jsonl": _jsonl_range, "jsonl.gz": _jsonl_gz, "parquet": _parquet_rows, "txt": _text_files}


def shard_documents(shard: Shard, text_field: str, dropped: DroppedRecords) -> Iterator[str]:
    """The shard's documents, in corpus order."""
    return _READERS[shard.kind](shard, text_field, dropped)


def corpus_documents(inputs: list[str], text_field: str = "text", skip_bad_lines: bool = False) -> Iterator[str]:
    """Every document of a corpus in order, in one process (for references and samples)."""
    files = find_inputs(inputs)
    dropped = DroppedRecords(skip_bad_lines)
    for shard in plan_shards(files, max(f.size for f in files) + 1 if files else 1, text_field):
        yield from shard_documents(shard, text_field, dropped)

