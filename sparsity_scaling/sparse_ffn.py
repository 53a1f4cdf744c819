"""Sparse FFNs for decoding: compute only what a sparsity rule keeps.

A `SparseFFN` holds one FFN's weights (ours, or a Hugging Face gated or plain FFN) and a
`metrics.rules.Rule`, and computes per token only what the rule's mask lets through:

    site            gated FFN, ReLU family       gated FFN, other          plain FFN
    intermediate    gate dense, up for gate > 0,  gate and up dense,        W_in dense,
                    down for kept neurons         down for kept neurons     down for kept neurons
    gate            gate dense, up and down for kept neurons                (refused)
    up              up dense, gate and down for kept neurons                (refused)
    input           gate and up (W_in) over the kept input features, down dense

Its output equals the dense FFN with the same mask applied through the probe
(`rules.SparsifyingProbe`). Weights are laid out so that what is skipped is skipped in
whole rows: the down projection neuron-major (row i = W_out[:, i]), and at the input site
the gate and up projections feature-major (row j = what input feature j adds to every
neuron). A row-gathering sum (`embedding_bag` with per-token bags) then reads only the kept
rows, one bag per token, so tokens of a small batch each pay for their own neurons;
selected outputs of gate and up (`index_select` of their rows, then one matmul) are
computed for the union of the batch's neurons, while they are few enough to pay
(`GATHER_BELOW`), else densely. Measured at batch 1 at the 0.1B shape (d 768, F 1920, one
thread, a busy 2-core machine), the gathering sum beat gathering the rows and multiplying
(31 against 58 us at 5% of the rows, 70 against 85 at 10%). Dense projections keep the
[outputs, inputs] layout, which the matrix-vector product reads fastest (the neuron-major
down projection took about 1.9x as long dense), so the baseline is not slowed by the sparse
layout.

With no rule a `SparseFFN` is the dense FFN in the same plain-PyTorch layout: the baseline
speedups are measured against (the model's own FFN would add megatron's per-call overhead).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .errors import SettingError
from .hf.causal_lm import HFFFN
from .metrics.rules import Rule
from .model.minicpm import FFN


@dataclass
class FFNWeights:
    """One FFN's weights as [outputs, inputs], as `F.linear` takes them (not copied)."""

    layer: int
    act: Callable[[torch.Tensor], torch.Tensor]
    up: torch.Tensor  # [F, d]: W_up of a gated FFN, W_in of a plain one
    down: torch.Tensor  # [d, F]: W_out
    gate: torch.Tensor | None = None  # [F, d]: gated FFNs only
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def relu_family(self) -> bool:
        """act(x) is 0 for x <= 0, so a neuron whose gate is not positive is inactive."""
        probe = torch.tensor([-2.0, -0.5, -1e-3, 0.0], dtype=self.up.dtype, device=self.up.device)
        return bool((self.act(probe) == 0).all())


def _rows(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as [outputs, inputs] (GPT-2's Conv1D stores [inputs, outputs])."""
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def ffn_weights(ffn: FFN | HFFFN) -> FFNWeights:
    """The weights of one of our FFNs (unsharded, TP 1) or of a Hugging Face FFN."""
    if isinstance(ffn, FFN):
        return FFNWeights(ffn.layer, ffn.act, _rows(ffn.up), _rows(ffn.down), _rows(ffn.gate))
    if ffn.gated:
        gate = ffn.entry.gate_proj
        return FFNWeights(ffn.layer, ffn.act, _rows(ffn.up), _rows(ffn.down), _rows(gate),
                          _bias(ffn.up), _bias(gate), _bias(ffn.down))
    return FFNWeights(ffn.layer, ffn.act, _rows(ffn.entry), _rows(ffn.down),
                      up_bias=_bias(ffn.entry), down_bias=_bias(ffn.down))


def check_computable(rule: Rule | None, gated: bool) -> None:
    """Refuse a rule whose site a sparse FFN of this kind cannot skip work at."""
    if rule is not None and rule.site in ("gate", "up") and not gated:
        raise SettingError("site", rule.site, "a plain FFN (two projections, no gate) cannot be computed "
                           "sparsely at this site; use intermediate or input")


# Selected outputs of a projection are gathered only while they are fewer than this share of
# its rows: copying the rows and multiplying cost about as much as the dense product at 25-30%
# of them (0.1B shape, batch 1, one thread).
GATHER_BELOW = 0.25


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows=None) -> torch.Tensor:
    """x @ weight.T (+ bias), for all rows or only `rows`."""
    if rows is None:
        return F.linear(x, weight, bias)
    return F.linear(x, weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows))


def _rows_worth_gathering(needed: torch.Tensor) -> torch.Tensor | None:
    """The rows any token needs (needed [n, rows]), or None where computing all is cheaper."""
    rows = needed.any(0).nonzero().squeeze(1)
    return rows if len(rows) < GATHER_BELOW * needed.shape[1] else None


def _gather_sum(keep: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """For each token t: sum over kept j of values[t, j] * table[j] (+ bias), reading only
    the kept rows of `table`. keep, values [n, k]; table [k, d] -> [n, d]."""
    token, index = keep.nonzero(as_tuple=True)
    if keep.shape[0] == 1:
        offsets = index.new_zeros(1)
    else:  # where each token's bag starts
        offsets = F.pad(keep.sum(1).cumsum(0)[:-1], (1, 0))
    out = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=values[token, index])
    return out if bias is None else out + bias


def _scatter(rows: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """[n, len(rows)] values placed in their columns of an [n, width] zero tensor."""
    return values.new_zeros(values.shape[0], width).index_copy_(1, rows, values)


class SparseFFN(torch.nn.Module):
    """x [..., d] -> the FFN's output under `rule` (None: dense), skipping what it masks.

    While `counting`, it counts `tokens`, `kept` and `scored` (entries at the rule's site
    kept and looked at: their ratio is the activation ratio the probe would count), and
    `macs` against `dense_macs` (multiply-adds done and a dense FFN's); timings turn
    counting off. `recorded`, when a list, collects the inputs it is given.
    """

    def __init__(self, weights: FFNWeights, rule: Rule | None = None):
        super().__init__()
        check_computable(rule, weights.gated)
        self.w, self.rule = weights, rule
        self.site = None if rule is None else rule.site
        self.relu_family = weights.relu_family
        self.neurons, self.width = weights.up.shape
        self.projections = 3 if weights.gated else 2
        if self.site == "input":  # feature-major: row j = what input feature j adds to each neuron
            self.up_by_feature = weights.up.t().contiguous()
            self.gate_by_feature = weights.gate.t().contiguous() if weights.gated else None
        elif self.site is not None:  # neuron-major: row i = what neuron i writes
            self.down_by_neuron = weights.down.t().contiguous()
        self.recorded: list[torch.Tensor] | None = None
        self.counting = True
        self.reset_counts()

    def reset_counts(self) -> None:
        self.tokens = self.kept = self.scored = self.macs = 0

    @property
    def activation_ratio(self) -> float:
        return self.kept / max(self.scored, 1)

    @property
    def dense_macs(self) -> int:
        return self.tokens * self.projections * self.neurons * self.width

    def _keep(self, scores: torch.Tensor) -> torch.Tensor:
        keep = self.rule.keep(scores, self.w.layer, sharded=False)
        if self.counting:
            self.kept += int(keep.sum())
            self.scored += keep.numel()
        return keep

    def _record(self, x: torch.Tensor) -> torch.Tensor:
        if self.recorded is not None:
            self.recorded.append(x.detach().clone())
        x = x.reshape(-1, self.width)
        self.tokens += x.shape[0]
        return x

    # ------------------------------------------------------------------ the computation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.w.gated:
            return self.project_out(self.w.act(self.project_in(x)))
        shape, x = x.shape, self._record(x)
        if self.site == "input":
            out = self._down_dense(self._gated_from_features(x))
        elif self.site is None:
            w = self.w
            a = self.w.act(F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
            out = self._down_dense(a)
        else:
            out = self._gated_kept(x)
        return out.reshape(*shape[:-1], -1)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """A plain FFN's first projection W_in x: over the kept input features at the input site."""
        shape, x = x.shape, self._record(x)
        w = self.w
        if self.site == "input":
            keep = self._keep(x.abs())
            h = _gather_sum(keep, x, self.up_by_feature, w.up_bias)
            if self.counting:
                self.macs += int(keep.sum()) * self.neurons
        else:
            h = F.linear(x, w.up, w.up_bias)
            self.macs += h.numel() * self.width
        return h.reshape(*shape[:-1], -1)

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        """A plain FFN's second projection W_out a: over the kept neurons at the intermediate site."""
        shape, a = a.shape, a.reshape(-1, self.neurons)
        if self.site in (None, "input"):
            out = self._down_dense(a)
        else:
            out = self._down_kept(self._keep(a.abs()), a)
        return out.reshape(*shape[:-1], -1)

    def _gated_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """a = act(W_gate x) * (W_up x), both over the kept input features."""
        w, keep = self.w, self._keep(x.abs())
        gate = _gather_sum(keep, x, self.gate_by_feature, w.gate_bias)
        up = _gather_sum(keep, x, self.up_by_feature, w.up_bias)
        if self.counting:
            self.macs += 2 * int(keep.sum()) * self.neurons
        return w.act(gate) * up

    def _gated_kept(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate, gate or up site of a gated FFN: see the module's table."""
        w, n = self.w, x.shape[0]
        if self.site == "up":
            up = F.linear(x, w.up, w.up_bias)
            keep = self._keep(up.abs())
            rows = _rows_worth_gathering(keep)
            gate = w.act(_linear(x, w.gate, w.gate_bias, rows))
            a = (gate if rows is None else _scatter(rows, gate, self.neurons)) * up
        else:
            gate = w.act(F.linear(x, w.gate, w.gate_bias))
            if self.site == "gate":
                keep = self._keep(gate.abs())
                rows = _rows_worth_gathering(keep)
            elif self.relu_family:  # a is 0 wherever the gate is
                rows = _rows_worth_gathering(gate != 0)
            else:
                rows = None
            up = _linear(x, w.up, w.up_bias, rows)
            up = up if rows is None else _scatter(rows, up, self.neurons)
            a = gate * up
            if self.site == "intermediate":
                keep = self._keep(a.abs())
        computed = self.neurons if rows is None else len(rows)
        self.macs += n * (self.neurons + computed) * self.width
        return self._down_kept(keep, a)

    def _down_kept(self, keep: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """W_out over each token's kept neurons (those whose activation is not 0)."""
        keep = keep & (a != 0)
        if self.counting:
            self.macs += int(keep.sum()) * self.width
        return _gather_sum(keep, a, self.down_by_neuron, self.w.down_bias)

    def _down_dense(self, a: torch.Tensor) -> torch.Tensor:
        self.macs += a.shape[0] * self.neurons * self.width
        return F.linear(a, self.w.down, self.w.down_bias)


class _Stage(torch.nn.Module):
    """One projection of a plain FFN, replaced by a method of its `SparseFFN`."""

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.compute = compute

    def forward(self, x):
        return self.compute(x)


def _places(ffn: FFN | HFFFN, sparse: SparseFFN) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(module of the model, what replaces it) for one FFN."""
    if isinstance(ffn, FFN):
        return [(ffn, sparse)]
    if ffn.gated:
        return [(ffn.entry, sparse)]
    return [(ffn.entry, _Stage(sparse.project_in)), (ffn.down, _Stage(sparse.project_out))]


def sparse_modules(ffns, rule: Rule | None) -> list[SparseFFN]:
    """A `SparseFFN` under `rule` (None: dense, in the same layout) for each FFN."""
    return [SparseFFN(ffn_weights(ffn), rule) for ffn in ffns]


@contextmanager
def installed(model: torch.nn.Module, ffns, modules: list[SparseFFN]) -> Iterator[list[SparseFFN]]:
    """Run `model` (ours or a Hugging Face module) with its FFNs `ffns` replaced by `modules`
    (from `sparse_modules`); the model's own FFNs are put back on exit."""
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    swaps = []
    try:
        for ffn, module in zip(ffns, modules, strict=True):
            for old, new in _places(ffn, module):
                parent, name = parents[id(old)]
                setattr(parent, name, new)
                swaps.append((parent, name, old))
        yield modules
    finally:
        for parent, name, old in reversed(swaps):
            setattr(parent, name, old)
