"""`sparsity-scaling data prepare`."""

from __future__ import annotations

import argparse

from .common import positive_int


def _count(text: str) -> int:
    """A size written as 1e8 or 100000000."""
    try:
        value = float(text)
    except ValueError:
        value = 0.5
    if value < 1 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be a positive whole number of bytes, not {text}")
    return int(value)


def _prepare(args) -> None:
    from launcher.prepare import prepare_corpus

    from ..data.prepared import PrepareSettings

    settings = PrepareSettings(
        inputs=tuple(args.inputs), out=args.out, tokenizer=args.tokenizer, text_field=args.text_field,
        val_fraction=args.val_fraction, sample_bytes=args.sample_bytes, shard_bytes=args.shard_bytes,
        skip_bad_lines=args.skip_bad_lines, workers=args.workers or 0,
    )
    prepare_corpus(settings, args.address)


def _stdlib(args) -> None:
    from ..data.corpus import stdlib_documents, stdlib_subset
    from ..errors import UserError
    from ..files import json_line, write_text_atomic

    if not args.out.endswith(".jsonl"):
        raise UserError(f"{args.out}: must name a .jsonl file (what `data prepare` reads)")
    docs = list(stdlib_documents() if args.subset == "all" else stdlib_subset(args.subset))
    write_text_atomic(args.out, "".join(json_line({"id": d.id, "text": d.text}) + "\n" for d in docs))
    size = sum(len(d.text.encode()) for d in docs)
    print(f"{len(docs):,} documents, {size / 1e6:.1f} MB of {args.subset} -> {args.out}")


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="prepare corpora for training")
    sub = data.add_subparsers(dest="data_command", required=True)
    prepare = sub.add_parser("prepare", help="tokenize a corpus in parallel (Ray Data) into megatron-core "
                             "indexed datasets PREFIX_train, PREFIX_valid and a manifest PREFIX.json")
    prepare.add_argument("inputs", nargs="+", metavar="INPUT",
                         help=".jsonl, .jsonl.gz, .parquet or .txt files, or directories of them")
    prepare.add_argument("--out", required=True, metavar="PREFIX", help="output prefix")
    prepare.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                         help="a sentencepiece .model, a Hugging Face tokenizer directory (tokenizer.json), "
                              "or train:VOCAB to train a sentencepiece BPE on a sample of the corpus")
    prepare.add_argument("--text-field", default="text", help="the jsonl field / parquet column of the text")
    prepare.add_argument("--val-fraction", type=float, default=0.05,
                         help="share of documents in the validation split, by a hash of their text")
    prepare.add_argument("--sample-bytes", type=_count, default=100_000_000,
                         help="text the train:VOCAB tokenizer learns from (default 1e8)")
    prepare.add_argument("--shard-bytes", type=_count, default=0,
                         help="input bytes per shard, the unit of parallel work and of resuming "
                              "(default: about 64 shards of 1 MB to 64 MB)")
    prepare.add_argument("--skip-bad-lines", action="store_true",
                         help="count and skip malformed records instead of stopping at the first")
    prepare.add_argument("--workers", type=positive_int, help="parallel workers, one CPU each (default: all)")
    prepare.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray); "
                         "inputs and PREFIX must be on storage every node sees")
    prepare.set_defaults(run=_prepare)
    stdlib = sub.add_parser("stdlib", help="write the built-in corpus (this Python's standard library) as JSONL "
                            "for `data prepare`: whole, its code, or its prose (documentation topics and docstrings)")
    stdlib.add_argument("out", metavar="OUT.jsonl")
    stdlib.add_argument("--subset", choices=("all", "code", "prose"), default="all")
    stdlib.set_defaults(run=_stdlib)
