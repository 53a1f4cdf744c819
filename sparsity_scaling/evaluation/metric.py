"""A `MetricSettings` measured on an `Evaluator`: the rule it names, or the search it asks for."""

from __future__ import annotations

import torch

from ..errors import SettingError
from ..metrics.result import SparsityResult
from ..metrics.rules import FixedThreshold, MaxP, ReluZero, Rule, TopK, TopP
from ..metrics.search import Evaluator, critical, ppl_p
from .settings import MetricSettings


def fixed_rule(settings: MetricSettings, activation: str | None) -> Rule | None:
    """The rule of a metric that needs no search (relu, topk, fat, top-p, max-p), else None."""
    metric, site, value = settings.metric, settings.site, settings.value
    if metric == "relu":
        if activation != "relu":
            raise SettingError("metric", metric, f"the model's activation is {activation}, not relu")
        return ReluZero()
    if metric == "topk":
        return TopK(site=site, k=int(value))
    if metric == "fat":
        return FixedThreshold(site=site, eps=value)
    if metric == "top-p":
        return TopP(site=site, p=value, power=settings.power)
    if metric == "max-p":
        return MaxP(site=site, p=value)
    return None


def measure(settings: MetricSettings, evaluator: Evaluator,
            activation: str | None) -> tuple[SparsityResult, dict[int, torch.Tensor] | None]:
    """The result of the metric, plus its per-neuron thresholds where it has them (CETT)."""
    metric = settings.metric
    if metric == "ppl-p":
        result = ppl_p(evaluator, settings.p)
        return result, evaluator.cett_rule(result.cett).thresholds
    if metric == "cett":
        rule = evaluator.cett_rule(settings.value)
        return evaluator.result(metric, rule, evaluator.measure(rule)), rule.thresholds
    rule = fixed_rule(settings, activation)
    if rule is None:
        return _critical(settings, evaluator), None
    return evaluator.result(metric, rule, evaluator.measure(rule)), None


def _critical(settings: MetricSettings, evaluator: Evaluator) -> SparsityResult:
    """The search ranges are the same on every rank: k up to all neurons, eps up to the
    largest score anywhere."""
    site, tol, power = settings.site, settings.tolerance / 100, settings.power
    if settings.rule == "top-p":
        return critical(evaluator, lambda x: TopP(site=site, p=x, power=power), 0.0, 1.0, False, tol)
    if settings.rule == "max-p":
        return critical(evaluator, lambda x: MaxP(site=site, p=x), 0.0, 1.0, True, tol)
    if settings.rule == "topk":
        width = evaluator.width(site)
        return critical(evaluator, lambda x: TopK(site=site, k=int(x)), 0, width, False, tol, integer=True)
    if settings.rule == "cett":
        return critical(evaluator, lambda c: evaluator.cett_rule(c, fresh=True), 0.0, 1.0, True, tol)
    return critical(evaluator, lambda x: FixedThreshold(site=site, eps=x), 0.0, evaluator.peak(site), True, tol)
