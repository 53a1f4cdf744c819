"""What an analysis runs on: the models named on the command line, the sparsity setting
that says which neurons are active, the datasets, and the strings of the tokens.

Everything reuses `sparsity-scaling evaluate`'s pieces, so a model, its data and its
PPL-p% thresholds here are the ones `evaluate` would measure with the same arguments.
"""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..metrics.measure import EvalData
from ..metrics.rules import PerNeuronThreshold, Rule
from ..train.checkpoint import list_checkpoints, read_checkpoint


@dataclass(frozen=True)
class ModelSpec:
    """One model: one of our checkpoints or a local Hugging Face model directory."""

    label: str
    checkpoint: str | None = None
    hf_model: str | None = None
    train_tokens: int | None = None
    thresholds: str | None = None  # saved per-neuron thresholds (evaluate --json) to use

    def args(self, args: Namespace, **changes) -> Namespace:
        """The command's arguments as `evaluate` would see them for this model."""
        return Namespace(**{**vars(args), "checkpoint": self.checkpoint, "hf_model": self.hf_model, **changes})


def named(text: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain PATH (or one that exists as written) -> ('', PATH)."""
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        return name, path
    return "", text


def short_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def parse_model(text: str) -> ModelSpec:
    """[LABEL=]PATH: a checkpoint directory, a run directory (its newest checkpoint) or a
    Hugging Face model directory."""
    label, path = named(text)
    root = Path(path)
    if (root / "manifest.json").is_file():
        ck = read_checkpoint(root)
    elif (root / "checkpoints").is_dir():
        found = list_checkpoints(root)
        if not found:
            raise UserError(f"{path}: a run directory without complete checkpoints")
        ck = found[-1]
    elif (root / "config.json").is_file():
        return ModelSpec(label or root.name, hf_model=str(root))
    else:
        raise UserError(f"{text}: not a checkpoint, run or Hugging Face model directory")
    default = f"{ck.path.parent.parent.name} @ {short_count(ck.tokens)} tokens"
    return ModelSpec(label or default, checkpoint=str(ck.path), train_tokens=ck.tokens)


def parse_models(texts: list[str], thresholds: list[str] | None = None) -> list[ModelSpec]:
    specs = [parse_model(t) for t in texts]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"models: labels must differ ({', '.join(labels)}); name them LABEL=PATH")
    if thresholds:
        if len(thresholds) != len(specs):
            raise UserError(f"--thresholds: give one file per model ({len(specs)}), got {len(thresholds)}")
        specs = [ModelSpec(s.label, s.checkpoint, s.hf_model, s.train_tokens, t) for s, t in zip(specs, thresholds)]
    return specs


def load_model(spec: ModelSpec, tp: int):
    from ..hf import load_target

    return load_target(checkpoint=spec.checkpoint, hf_model=spec.hf_model, tp=tp)


# ---------------------------------------------------------------- the sparsity setting


def _saved_thresholds(spec: ModelSpec, target) -> PerNeuronThreshold:
    from ..metrics.result import load_thresholds

    try:
        probe = load_thresholds(spec.thresholds)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--thresholds {spec.thresholds}: not a thresholds file ({error})") from None
    widths = {f.layer: f.local_neurons for f in target.ffns}
    if {k: v.numel() for k, v in probe.thresholds.items()} != widths:
        raise UserError(f"--thresholds {spec.thresholds}: its layers and neurons do not fit {spec.label}")
    return PerNeuronThreshold(thresholds=probe.thresholds)


def sparsity_setting(args: Namespace, spec: ModelSpec, target) -> tuple[Rule, dict]:
    """The rule that decides which neurons are active, and a record of it for the results.

    Saved --thresholds, a fixed rule (relu, topk, fat, top-p, max-p), a CETT value, or by
    default the model's PPL-p% thresholds found by the evaluator on its validation data.
    """
    from ..evaluate import activation_of, need_value, fixed_rule, load_eval_data
    from ..metrics.search import Evaluator, ppl_p

    if spec.thresholds:
        return _saved_thresholds(spec, target), {"metric": "thresholds", "file": spec.thresholds}
    model_args = spec.args(args, **first_dataset(args))
    rule = fixed_rule(model_args, activation_of(model_args, target))
    if rule is not None:
        return rule, {"metric": args.metric, **rule.params()}
    evaluator = Evaluator(target, load_eval_data(model_args), args.calibration_tokens)
    if args.metric == "cett":
        rule = evaluator.cett_rule(need_value(args))
        return rule, {"metric": "cett", "cett": rule.cett}
    result = ppl_p(evaluator, args.p)
    record = {"metric": "ppl-p", "p": args.p, "cett": result.cett, "ppl_ratio": result.ppl_ratio,
              "activation_ratio": result.activation_ratio, "eval_tokens": result.tokens}
    return evaluator.cett_rule(result.cett), record


def describe(setting: dict) -> str:
    """A short line for plot titles."""
    metric = setting["metric"]
    if metric == "ppl-p":
        return f"PPL-{setting['p']:g}% (CETT {setting['cett']:.3g})"
    if metric == "cett":
        return f"CETT {setting['cett']:.3g}"
    if metric == "thresholds":
        return f"thresholds {Path(setting['file']).name}"
    params = ", ".join(f"{k} {v:g}" for k, v in setting.items()
                       if k not in ("metric", "site") and isinstance(v, (int, float)))
    return f"{metric} ({setting.get('site', '')}{', ' + params if params else ''})"


# ---------------------------------------------------------------- datasets


def named_datasets(args: Namespace) -> list[tuple[str, str, str]]:
    """(name, file, 'data' or 'tokens') of every --data / --tokens [NAME=]FILE."""
    out = []
    for option in ("data", "tokens"):
        for text in getattr(args, option) or []:
            name, path = named(text)
            if not Path(path).is_file():
                raise UserError(f"--{option} {path}: no such file")
            out.append((name or Path(path).stem, path, option))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"datasets: names must differ ({', '.join(names)}); name them NAME=FILE")
    return out


def first_dataset(args: Namespace) -> dict:
    """data= / tokens= for evaluate's loader: the first --data / --tokens, or neither (a
    checkpoint's validation split)."""
    given = named_datasets(args)
    if not given:
        return {"data": None, "tokens": None}
    _, path, option = given[0]
    return {"data": path if option == "data" else None, "tokens": path if option == "tokens" else None}


def load_datasets(args: Namespace, spec: ModelSpec) -> dict[str, EvalData]:
    """The datasets given with --data / --tokens, or a checkpoint's validation split by kind."""
    from ..evaluate import load_eval_data

    given = named_datasets(args)
    if given:
        return {name: load_eval_data(spec.args(args, **{"data": None, "tokens": None, option: path}))
                for name, path, option in given}
    if spec.hf_model:
        raise UserError(f"{spec.label}: a Hugging Face model needs datasets (--data [NAME=]FILE or --tokens [NAME=]FILE.npy)")
    return validation_by_kind(args, spec)


def validation_by_kind(args: Namespace, spec: ModelSpec) -> dict[str, EvalData]:
    """The run's validation documents, one dataset per kind (code and doc for the default
    corpus), tokenized as in training."""
    from ..config import load_config
    from ..data.corpus import load_documents, split_documents
    from ..evaluate import load_eval_data, run_encoder, tokenize_documents

    checkpoint = Path(spec.checkpoint)
    config = load_config(checkpoint / "config.yaml")
    if config.data.train_prefix:  # a prepared corpus: no documents to tell apart
        return {"validation": load_eval_data(spec.args(args, data=None, tokens=None))}
    run_dir = checkpoint.parent.parent
    split = split_documents(load_documents(config.data.corpus, config.data.max_corpus_bytes), config.data.val_fraction)
    record = run_dir / "data.json"
    if record.is_file() and json.loads(record.read_text()).get("valid_hash") != split.valid_hash:
        raise UserError(f"{run_dir}: corpus {config.data.corpus} no longer gives the run's validation split; "
                        f"use --data or --tokens")
    kinds: dict[str, list] = {}
    for doc in split.valid:
        kinds.setdefault(doc.kind, []).append(doc)
    seq_len = args.seq_len or config.data.seq_len
    out = {}
    for kind, docs in sorted(kinds.items()):
        what = f"{run_dir.name}: validation {kind} documents"
        try:
            sequences = tokenize_documents(docs, lambda: run_encoder(checkpoint), seq_len, args.eval_tokens, what)
        except UserError as error:
            raise UserError(f"{what}: {error}") from None
        out[kind] = EvalData(sequences, args.batch_size)
    return out


# ---------------------------------------------------------------- tokens as text


@dataclass
class Vocabulary:
    """A tokenizer's token strings: `pieces` (its own spelling, to tell tokenizers apart)
    and readable text for plots and tables."""

    pieces: list[str]
    decode: Callable[[int], str]
    encode: Callable[[str], list[int]]
    eos: int

    def text(self, i: int) -> str:
        """The token as readable text: its decoded form, whitespace made visible."""
        if i >= len(self.pieces):
            return f"<id {i}>"
        text = self.decode(i)
        if not text or "\ufffd" in text:  # a lone byte of a longer character
            text = self.pieces[i]
        return text.replace(" ", "\u2423").replace("\n", "\\n").replace("\t", "\\t")


def vocabulary(spec: ModelSpec) -> Vocabulary:
    from ..evaluate import hf_encoder, hf_tokenizer, run_encoder, run_tokenizer

    if spec.checkpoint:
        tok = run_tokenizer(Path(spec.checkpoint))
        pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        return Vocabulary(pieces, lambda i: tok.decode([i]), *run_encoder(Path(spec.checkpoint)))
    tok = hf_tokenizer(spec.hf_model)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return Vocabulary(pieces, lambda i: tok.decode([i]), *hf_encoder(spec.hf_model))


def text_sequence(vocab: Vocabulary, text: str, max_tokens: int) -> torch.Tensor:
    """[1, n + 1]: the text's first max_tokens tokens, then end-of-document (so the model
    reads every token of the text)."""
    ids = vocab.encode(text)[:max_tokens]
    if not ids:
        raise UserError("--text: no tokens")
    return torch.tensor([ids + [vocab.eos]], dtype=torch.long)
