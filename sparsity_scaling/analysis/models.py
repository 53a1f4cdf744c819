"""What an analysis runs on: the models named on the command line, the sparsity setting
that says which of their neurons are active, their datasets, and the strings of tokens.

Everything reuses the evaluation's pieces, so a model, its data and its PPL-p% thresholds
here are the ones `sparsity-scaling evaluate` would measure with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import SettingError, UserError
from ..evaluation.inputs import ModelRef, load_eval_data, validation_by_kind
from ..evaluation.metric import fixed_rule
from ..formatting import short_count
from ..hf.paths import model_kind
from ..metrics.measure import EvalData
from ..metrics.result import thresholds_probe
from ..metrics.rules import PerNeuronThreshold, Rule
from ..metrics.search import Evaluator, ppl_p
from ..rundir import RunDir, read_checkpoint
from .output import say
from .settings import AnalysisSettings, named


@dataclass(frozen=True)
class ModelSpec:
    """One model of an analysis, with its label and (optionally) saved thresholds."""

    label: str
    model: ModelRef
    thresholds: str | None = None  # saved per-neuron thresholds (evaluate --json) to use


def parse_model(text: str) -> ModelSpec:
    """[LABEL=]PATH: a checkpoint directory, a run directory (its newest checkpoint), a
    Hugging Face model directory or a GGUF file."""
    label, path = named(text)
    root = Path(path)
    kind = model_kind(root)
    if kind == "checkpoint":
        ck = read_checkpoint(root)
    elif kind == "run":
        found = RunDir(root).checkpoints()
        if not found:
            raise UserError(f"{path}: a run directory without complete checkpoints")
        ck = found[-1]
    elif kind in ("hf", "gguf"):
        return ModelSpec(label or root.name, ModelRef(hf_model=str(root)))
    else:
        raise UserError(f"{text}: not a checkpoint, run or Hugging Face model directory, nor a GGUF file")
    default = f"{ck.run.name} @ {short_count(ck.tokens)} tokens"
    return ModelSpec(label or default, ModelRef(checkpoint=str(ck.path)))


def parse_models(texts: list[str], thresholds: list[str] | None = None) -> list[ModelSpec]:
    specs = [parse_model(t) for t in texts]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"models: labels must differ ({', '.join(labels)}); name them LABEL=PATH")
    if thresholds:
        if len(thresholds) != len(specs):
            raise SettingError("thresholds", None, f"give one file per model ({len(specs)}), got {len(thresholds)}")
        specs = [replace(s, thresholds=t) for s, t in zip(specs, thresholds)]
    return specs


# ---------------------------------------------------------------- the sparsity setting


def _saved_thresholds(spec: ModelSpec, target) -> PerNeuronThreshold:
    try:
        artifact = json.loads(Path(spec.thresholds).read_text())  # read once: it holds every neuron's threshold
        probe, made_for = thresholds_probe(artifact), artifact.get("key", {}).get("model")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SettingError("thresholds", spec.thresholds, f"not a thresholds file ({error})") from None
    widths = {f.layer: f.local_neurons for f in target.ffns}
    if {k: v.numel() for k, v in probe.thresholds.items()} != widths:
        raise SettingError("thresholds", spec.thresholds, f"its layers and neurons do not fit {spec.label}")
    if made_for and Path(made_for).resolve() != Path(spec.model.name).resolve():
        raise SettingError("thresholds", spec.thresholds, f"computed for {made_for}, not {spec.model.name}")
    return PerNeuronThreshold(thresholds=probe.thresholds)


def sparsity_setting(settings: AnalysisSettings, spec: ModelSpec, target) -> tuple[Rule, dict]:
    """The rule that decides which neurons are active, and a record of it for the results.

    Saved thresholds, a fixed rule (relu, topk, fat, top-p, max-p), a CETT value, or by
    default the model's PPL-p% thresholds found by the evaluator on the first dataset.
    """
    if spec.thresholds:
        return _saved_thresholds(spec, target), {"metric": "thresholds", "file": spec.thresholds}
    metric = settings.metric
    rule = fixed_rule(metric, spec.model.activation(target))
    if rule is not None:
        return rule, {"metric": metric.metric, **rule.params()}
    evaluator = Evaluator(target, one_dataset(settings, spec), metric.calibration_tokens)
    if metric.metric == "cett":
        rule = evaluator.cett_rule(metric.value)
        return rule, {"metric": "cett", "cett": rule.cett}
    result = ppl_p(evaluator, metric.p)
    record = {"metric": "ppl-p", "p": metric.p, "cett": result.cett, "ppl_ratio": result.ppl_ratio,
              "activation_ratio": result.activation_ratio, "eval_tokens": result.tokens}
    return evaluator.cett_rule(result.cett), record


def model_and_rule(settings: AnalysisSettings, spec: ModelSpec):
    """(model, rule, setting record): the model loaded at the settings' TP size and the
    rule that decides which of its neurons are active."""
    target = spec.model.load(settings.tp)
    say(f"{spec.label}: setting the sparsity rule ({'thresholds' if spec.thresholds else settings.metric.metric})")
    rule, record = sparsity_setting(settings, spec, target)
    return target, rule, record


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


def one_dataset(settings: AnalysisSettings, spec: ModelSpec) -> EvalData:
    """The first dataset, or a checkpoint's validation split, as the evaluation loads it."""
    return load_eval_data(spec.model, settings.first_data)


def load_datasets(settings: AnalysisSettings, spec: ModelSpec) -> dict[str, EvalData]:
    """The named datasets, or a checkpoint's validation split by kind."""
    if settings.datasets:
        return {d.name: load_eval_data(spec.model, d.settings(settings.data)) for d in settings.datasets}
    if spec.model.hf_model:
        raise SettingError("text_file", None, f"{spec.label}: a Hugging Face model needs datasets (validation text or tokens)")
    return validation_by_kind(spec.model, settings.data)


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
    model = spec.model
    if model.checkpoint:
        tok = model.run_tokenizer()
        pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    else:
        tok = model.hf_tokenizer()
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return Vocabulary(pieces, lambda i: tok.decode([i]), *model.encoder())


def text_sequence(vocab: Vocabulary, text: str, max_tokens: int) -> torch.Tensor:
    """[1, n + 1]: the text's first max_tokens tokens, then end-of-document (so the model
    reads every token of the text)."""
    ids = vocab.encode(text)[:max_tokens]
    if not ids:
        raise SettingError("text", None, "no tokens")
    return torch.tensor([ids + [vocab.eos]], dtype=torch.long)
