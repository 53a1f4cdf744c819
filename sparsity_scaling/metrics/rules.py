"""Sparsity rules: each decides, per token and layer, which FFN neurons stay active.

Every rule implements `keep(scores, layer, sharded) -> bool mask` on non-negative scores
taken at a site of the FFN:

    intermediate  |a|, the input of W_out (default; CETT and the paper's metrics live here)
    gate          |act(W_gate x)|
    up            |W_in x|
    input         |x|, the FFN input (masks input features instead of neurons)

`SparsifyingProbe` applies a rule during a forward pass and counts active entries, so one
pass gives both the perplexity and the activation ratio under that rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.probe import FFNTrace, Probe
from . import check_site
from .comm import gather_neurons, local_slice, max_tp


@dataclass
class Rule:
    site: str = "intermediate"

    name = "rule"

    def __post_init__(self):
        check_site(self.site)

    def params(self) -> dict:
        return {"site": self.site}

    def keep(self, scores: torch.Tensor, layer: int, sharded: bool) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class PerNeuronThreshold(Rule):
    """Keep |a_i| >= threshold_i: CETT thresholds eps / ||W_out[:, i]|| per layer (local neurons)."""

    thresholds: dict[int, torch.Tensor] = field(default_factory=dict)
    cett: float | None = None
    layer_eps: list[float] | None = None  # the per-layer eps behind the thresholds
    name = "cett"

    def params(self):
        return {**super().params(), "cett": self.cett}

    def keep(self, scores, layer, sharded):
        return scores >= self.thresholds[layer].to(scores.device, scores.dtype)


@dataclass
class FixedThreshold(Rule):
    """FAT-eps: one threshold for every layer and neuron."""

    eps: float = 0.0
    name = "fat"

    def params(self):
        return {**super().params(), "eps": self.eps}

    def keep(self, scores, layer, sharded):
        return scores >= self.eps


@dataclass
class ReluZero(Rule):
    """Straightforward ReLU sparsity: a neuron whose gate output is zero is inactive."""

    site: str = "gate"
    name = "relu"

    def keep(self, scores, layer, sharded):
        return scores > 0


@dataclass
class TopK(Rule):
    """Keep the k largest scores of each token in each layer."""

    k: int = 1
    name = "topk"

    def params(self):
        return {**super().params(), "k": self.k}

    def keep(self, scores, layer, sharded):
        full = gather_neurons(scores) if sharded else scores
        k = min(max(int(self.k), 0), full.shape[-1])
        mask = torch.zeros_like(full, dtype=torch.bool)
        if k:
            mask.scatter_(-1, full.topk(k, dim=-1).indices, True)
        return local_slice(mask) if sharded else mask


@dataclass
class TopP(Rule):
    """Keep the smallest set of neurons whose score**power sums to at least p of the total."""

    p: float = 0.9
    power: float = 1.0
    name = "top-p"

    def params(self):
        return {**super().params(), "p": self.p, "power": self.power}

    def keep(self, scores, layer, sharded):
        full = (gather_neurons(scores) if sharded else scores).double() ** self.power
        ordered, order = full.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the strictly larger neurons
        needed = self.p * ordered.sum(-1, keepdim=True)
        keep_sorted = before < needed  # include a neuron while the mass before it falls short
        mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return local_slice(mask) if sharded else mask


@dataclass
class MaxP(Rule):
    """Keep scores of at least p times the token's largest score in the layer."""

    p: float = 0.1
    name = "max-p"

    def params(self):
        return {**super().params(), "p": self.p}

    def keep(self, scores, layer, sharded):
        peak = scores.amax(dim=-1, keepdim=True)
        if sharded:
            peak = max_tp(peak.contiguous())
        return scores >= self.p * peak


def site_scores(trace: FFNTrace, site: str) -> torch.Tensor:
    return {"intermediate": trace.activation, "gate": trace.gate, "up": trace.up}[site].abs()


class SitePeak(Probe):
    """The largest score a rule at `site` sees on this rank (the top of FAT's search range)."""

    def __init__(self, site: str):
        self.site, self.peak = site, 0.0

    def on_input(self, ffn, x):
        if self.site == "input":
            self.peak = max(self.peak, float(x.abs().max()))

    def on_activation(self, ffn, trace):
        if self.site != "input":
            self.peak = max(self.peak, float(site_scores(trace, self.site).max()))


class SparsifyingProbe(Probe):
    """Applies a rule in every FFN and counts active and total entries, and the tokens the
    FFN saw (all of them, or an MoE expert's routed ones), per layer."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self._active: dict[int, torch.Tensor] = {}  # on the model's device: no host synchronisation per layer
        self.total: dict[int, int] = {}
        self.seen: dict[int, int] = {}  # tokens each FFN saw

    @property
    def active(self) -> dict[int, int]:
        """Active entries per layer (read after the pass: one host synchronisation)."""
        if not self._active:
            return {}
        counts = torch.stack(list(self._active.values())).tolist()
        return dict(zip(self._active, (int(c) for c in counts)))

    def _count(self, layer: int, mask: torch.Tensor) -> None:
        kept = mask.sum()
        self._active[layer] = self._active[layer] + kept if layer in self._active else kept
        self.total[layer] = self.total.get(layer, 0) + mask.numel()
        self.seen[layer] = self.seen.get(layer, 0) + mask.numel() // max(1, mask.shape[-1])

    def on_input(self, ffn, x):
        if self.rule.site != "input":
            return None
        mask = self.rule.keep(x.abs(), ffn.layer, sharded=False)
        self._count(ffn.layer, mask)
        return x * mask

    def on_activation(self, ffn, trace):
        if self.rule.site == "input":
            return None
        mask = self.rule.keep(site_scores(trace, self.rule.site), trace.layer, sharded=True)
        self._count(trace.layer, mask)
        return trace.activation * mask
