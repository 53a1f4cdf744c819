"""Documents for pretraining: the embedded default corpus and user corpora.

The default corpus is the Python standard library installed on this machine: its source
files (code) and pydoc's documentation topics (prose). Every machine has it, so nothing is
downloaded. Documents are split into train and validation by a hash of their text, so a
document (or an identical copy of it) is never in both splits.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UserError


def text_digest(text: str) -> str:
    """The sha256 of a text's UTF-8 bytes: what the train/validation split is drawn from."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Document:
    id: str  # "code/json/decoder.py", "doc/assert", "file.txt", "file.jsonl:12"
    text: str

    @property
    def digest(self) -> str:
        return text_digest(self.text)

    @property
    def kind(self) -> str:
        """The subset a document belongs to (code or doc for the default corpus)."""
        return self.id.split("/", 1)[0] if "/" in self.id else "text"


def stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately undecodable
        if text.strip():
            yield Document(f"code/{rel.as_posix()}", text)
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"doc/{name}", topics[name])


def prose_paragraphs(doc: Document) -> list[str]:
    """The natural-language text of a default-corpus document: a documentation topic whole,
    or a code file's docstrings (module, class and function), cut into paragraphs."""
    texts = [doc.text]
    if doc.kind == "code":
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            return []
        texts = [ast.get_docstring(node) or "" for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [p for text in texts for p in text.split("\n\n") if p.strip()]


def stdlib_subset(subset: str) -> Iterator[Document]:
    """One side of the default corpus, for training on one kind of text (the decay demo: code,
    then prose): `code`, the source files; `prose`, the documentation topics and each source
    file's docstrings as one document."""
    for doc in stdlib_documents():
        if subset == "code" and doc.kind == "code":
            yield doc
        elif subset == "prose":
            paragraphs = prose_paragraphs(doc)
            if paragraphs:
                yield Document(f"prose/{doc.id}", "\n\n".join(paragraphs))


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: expected an object with a string 'text' field")
            if text.strip():
                yield Document(f"{path.name}:{number}", text)


def file_documents(corpus: str) -> Iterator[Document]:
    """Plain text files (one document each) and JSONL files (one document per line)."""
    root = Path(corpus)
    if not root.exists():
        raise UserError(f"data.corpus: {corpus} does not exist")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()
    )
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(str(path.relative_to(root) if root.is_dir() else path.name), text)


def load_documents(corpus: str, max_bytes: int = 0) -> list[Document]:
    """All documents of a corpus, in a fixed order; with max_bytes, a fixed hash-ordered sample."""
    source = stdlib_documents() if corpus == "stdlib" else file_documents(corpus)
    docs = list(source)
    if not docs:
        raise UserError(f"data.corpus: {corpus} holds no non-empty documents")
    if max_bytes:
        # Order by a hash unrelated to the split's, so the sample keeps the split's proportions.
        docs.sort(key=lambda d: hashlib.sha256(f"sample:{d.digest}".encode()).hexdigest())
        kept, size = [], 0
        for doc in docs:
            if size >= max_bytes:
                break
            kept.append(doc)
            size += len(doc.text.encode())
        docs = kept
    return docs


@dataclass(frozen=True)
class Split:
    train: list[Document]
    valid: list[Document]

    @staticmethod
    def hash_of(docs: Iterable[Document]) -> str:
        h = hashlib.sha256()
        for doc in sorted(docs, key=lambda d: d.id):
            h.update(f"{doc.id}\0{doc.digest}\n".encode())
        return h.hexdigest()[:16]

    @property
    def train_hash(self) -> str:
        return self.hash_of(self.train)

    @property
    def valid_hash(self) -> str:
        return self.hash_of(self.valid)

    def record(self) -> dict:
        """What goes on disk beside the data so a run can say exactly what it trained on."""
        return {
            "train_hash": self.train_hash,
            "valid_hash": self.valid_hash,
            "train_documents": [d.id for d in self.train],
            "valid_documents": [d.id for d in self.valid],
        }


def in_validation(digest: str, val_fraction: float) -> bool:
    """Whether the text with this sha256 hex digest belongs to the validation split."""
    return int(digest[:8], 16) / 0xFFFFFFFF < val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> Split:
    """Assign each document by the hash of its text: identical texts land in the same split."""
    train, valid = [], []
    for doc in docs:
        (valid if in_validation(doc.digest, val_fraction) else train).append(doc)
    if not train or not valid:
        raise UserError(
            f"data.corpus: {len(docs)} documents are too few to split into train and "
            f"validation with val_fraction {val_fraction}"
        )
    return Split(train, valid)
