"""What a measurement runs on and what it measures, as typed settings.

The command line builds them from its flags and a grid file from its `evaluation` section.
They check their own values and name the setting at fault (`SettingError`), which each
front end words as its user wrote it (a flag, a grid field).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MissingSetting, SettingError
from ..metrics import check_p, check_site

METRICS = ("ppl-p", "cett", "topk", "fat", "relu", "top-p", "max-p", "critical")
CRITICAL_RULES = ("top-p", "max-p", "topk", "fat", "cett")
NEEDS_VALUE = ("cett", "topk", "fat", "top-p", "max-p")  # the rule's parameter is given, not searched
THRESHOLD_METRICS = ("ppl-p", "cett")  # the metrics with per-neuron thresholds to save


def _positive(setting: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise SettingError(setting, value, "must be at least 1")


@dataclass(frozen=True)
class DataSettings:
    """Which validation tokens a measurement uses."""

    text_file: str | None = None
    """Validation text, .txt or .jsonl (a `text` field), tokenized with the model's tokenizer.
    Without text or tokens, one of our checkpoints uses its run's validation split."""
    tokens: str | None = None
    """Validation tokens used as they are: a .npy int array (sequences, length)."""
    eval_tokens: int = 65536
    """How many validation tokens to use."""
    seq_len: int | None = None
    """Sequence length; default the run's (our checkpoints) or 512 (Hugging Face models)."""
    batch_size: int = 8
    """Sequences per forward pass."""

    def __post_init__(self):
        if self.text_file and self.tokens:
            raise SettingError("tokens", self.tokens, "give validation text or tokens, not both")
        for setting in ("eval_tokens", "seq_len", "batch_size"):
            _positive(setting, getattr(self, setting))


@dataclass(frozen=True)
class MetricSettings:
    """What to measure: a sparsity metric and its parameters."""

    metric: str = "ppl-p"
    """ppl-p (PPL-p%), cett, topk, fat, relu, top-p, max-p, or critical (the sparsest
    setting of `rule` whose perplexity stays within `tolerance`)."""
    p: float = 1.0
    """PPL-p%: the allowed perplexity increase, in percent."""
    value: float | None = None
    """The rule's parameter where it is given, not searched: a CETT value, k, eps or p."""
    site: str = "intermediate"
    """Where a rule reads its scores: intermediate (|a|), gate, up, or input (the FFN input)."""
    power: float = 1.0
    """top-p: the mass is the sum of |score| ** power."""
    rule: str = "top-p"
    """critical: the rule whose critical sparsity is searched."""
    tolerance: float = 1.0
    """critical: the allowed perplexity increase, in percent."""
    calibration_tokens: int = 8192
    """Dense activations kept per rank to calibrate thresholds (CETT searches)."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise SettingError("metric", self.metric, f"expected one of {', '.join(METRICS)}")
        if self.metric == "ppl-p":
            check_p(self.p)
        if self.metric in NEEDS_VALUE and self.value is None:
            raise MissingSetting("value", "metric", self.metric)
        check_site(self.site)
        fixed_site = self.metric in ("cett", "ppl-p", "relu") or (self.metric == "critical" and self.rule == "cett")
        if fixed_site and self.site != "intermediate":
            what = "critical with rule cett" if self.metric == "critical" else f"metric {self.metric}"
            raise SettingError("site", self.site, f"{what} reads its own site (CETT: the intermediate activation, "
                               f"relu: the gate's zeros); site applies to topk, fat, top-p and max-p")
        if self.rule not in CRITICAL_RULES:
            raise SettingError("rule", self.rule, f"expected one of {', '.join(CRITICAL_RULES)}")
        if not self.tolerance > 0:
            raise SettingError("tolerance", self.tolerance, "must be positive")
        _positive("calibration_tokens", self.calibration_tokens)

    def describe(self, stabilised: bool = False) -> str:
        """A short phrase for plot titles: 'PPL-1% thresholds of each model', 'topk 32 (gate)'."""
        if self.metric == "ppl-p":
            return f"PPL-{self.p:g}% thresholds of each model"
        if self.metric == "cett":
            return f"{'stabilised ' if stabilised else ''}CETT {self.value:.4g}"
        value = "" if self.value is None else f" {self.value:g}"
        return f"{self.metric}{value} ({self.site})"
