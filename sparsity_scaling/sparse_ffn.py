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
(`rules.SparsifyingProbe`). What is skipped is skipped in whole rows: the down projection
is read neuron-major (row i = W_out[:, i]) and, at the input site, gate and up
feature-major (row j = what input feature j adds to every neuron), each by a row-gathering
sum (`embedding_bag`) over the kept rows only; the selected outputs of gate and up are
computed from a copy of their rows, for the union of a batch's neurons while they are few
enough to pay (`GATHER_BELOW`), else densely. One token (decoding at batch 1) takes a path
of its own that keeps the kept neurons as an index throughout.

A dense product for one token runs by rows too where that is faster, which it is on the
machine this was written on by 2-2.6x (`one_token_by_rows`): the dense baseline that
speedups are measured against makes the same choice, so it is the fastest dense FFN these
operations give, not MKL's matrix-vector product at a third of the memory bandwidth.
Reading scattered rows is slower than streaming a matrix: in a 0.1B-shape decode the 10% of
up and down rows a gate-site rule keeps (a fifth of the gate's bytes) cost 0.11 ms per
layer, two thirds of the whole gate's 0.17 ms, which is why sparse FFNs stay below their
FLOP bound.

With no rule a `SparseFFN` is the dense FFN in the same plain-PyTorch operations: the
baseline speedups are measured against (the model's own FFN would add megatron's per-call
overhead).
"""

from __future__ import annotations

import time
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

# How a dense product for one token runs on a CPU: by rows, as a sum of the rows of the
# weight's transpose (`embedding_bag`: fbgemm's kernel, which read a 0.1B-shape projection at
# 44 GB/s on the 2-core AMD EPYC this was written on, against 17 GB/s for MKL's
# matrix-vector product there), or by `F.linear`. Unless told, the faster of the two, timed
# once per shape and thread count on copies of the weight larger together than any cache, as
# decoding reads them. The dense baseline and the sparse FFNs' dense parts make the same
# choice, so a speedup is never measured against a needlessly slow dense product.
_timed_by_rows: dict[tuple, bool] = {}


def one_token_by_rows(weight: torch.Tensor) -> bool:
    """Whether a one-token dense product with `weight` [outputs, inputs] is faster by rows here."""
    if weight.device.type != "cpu":
        return False
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _timed_by_rows:
        bytes_each = weight.numel() * weight.element_size()
        copies = [weight.clone() for _ in range(min(1024, max(2, -(-(64 << 20) // bytes_each))))]
        tables, x = [_Rows(w, None) for w in copies], torch.randn(1, weight.shape[1], dtype=weight.dtype)
        by_rows = _fastest(lambda: [table.dense(x[0]) for table in tables])
        _timed_by_rows[key] = by_rows < _fastest(lambda: [F.linear(x, w) for w in copies])
    return _timed_by_rows[key]


def _fastest(run: Callable[[], object], rounds: int = 5) -> float:
    """Seconds of run's fastest round, after one to warm up."""
    run()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


class _Rows:
    """A projection's weight [outputs, inputs] as its transpose, row j = what input j adds to
    every output, read with a row-gathering sum (`embedding_bag`): only the rows of the
    inputs given. A dense product reads all of them in as many bags as threads (one bag runs
    on one thread), summed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.table, self.bias = weight.t().contiguous(), bias
        self.every = torch.arange(self.table.shape[0], device=weight.device)
        self.one_bag = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.threads = torch.get_num_threads()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """weight @ x (+ bias), x [inputs]."""
        return self.over(self.every, x)

    def over(self, inputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum over j of values[j] * row inputs[j] (+ bias): the product with a vector that is
        `values` at `inputs` and 0 elsewhere. In one bag per thread, of at least 64 rows."""
        bags = max(1, min(self.threads, len(inputs) // 64))
        if bags == 1:
            out = F.embedding_bag(inputs, self.table, self.one_bag, mode="sum", per_sample_weights=values)[0]
        else:
            offsets = torch.arange(bags, device=inputs.device) * -(-len(inputs) // bags)
            out = F.embedding_bag(inputs, self.table, offsets, mode="sum", per_sample_weights=values).sum(0)
        return out if self.bias is None else out + self.bias

    def per_token(self, keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """For each token t: sum over kept j of values[t, j] * row j (+ bias), one bag per
        token, so tokens of a small batch each pay for their own rows. keep, values [n, inputs]."""
        if keep.shape[0] == 1:
            inputs = keep[0].nonzero().view(-1)
            return self.over(inputs, values[0].index_select(0, inputs))[None]
        token, index = keep.nonzero(as_tuple=True)
        offsets = F.pad(keep.sum(1).cumsum(0)[:-1], (1, 0))  # where each token's bag starts
        out = F.embedding_bag(index, self.table, offsets, mode="sum", per_sample_weights=values[token, index])
        return out if self.bias is None else out + self.bias


def _rows_worth_gathering(needed: torch.Tensor) -> torch.Tensor | None:
    """The rows any token needs (needed [n, rows]), or None where computing all is cheaper."""
    rows = needed.any(0).nonzero().squeeze(1)
    return rows if len(rows) < GATHER_BELOW * needed.shape[1] else None


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

    def __init__(self, weights: FFNWeights, rule: Rule | None = None, by_rows: bool | None = None):
        super().__init__()
        check_computable(rule, weights.gated)
        self.w, self.rule = weights, rule
        self.site = None if rule is None else rule.site
        self.relu_family = weights.relu_family
        self.neurons, self.width = weights.up.shape
        self.projections = 3 if weights.gated else 2
        # whether one token's dense products run by rows (None: whichever is faster here, timed
        # on the up projection's shape)
        self.by_rows = one_token_by_rows(weights.up) if by_rows is None else by_rows
        projections = ("gate", "up", "down") if weights.gated else ("up", "down")
        if self.by_rows:  # every dense product of one token reads rows
            read_by_rows = projections
        elif self.site == "input":  # gate and up over the kept input features
            read_by_rows = projections[:-1]
        else:  # down over the kept neurons
            read_by_rows = () if self.site is None else ("down",)
        self.rows = {name: _Rows(*self._weight(name)) for name in read_by_rows}
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

    def _weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.w
        return {"gate": (w.gate, w.gate_bias), "up": (w.up, w.up_bias), "down": (w.down, w.down_bias)}[name]

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Projection `name` of x [n, inputs], all of it."""
        if x.shape[0] == 1 and self.by_rows:
            return self.rows[name].dense(x[0])[None]
        return F.linear(x, *self._weight(name))

    def _selected(self, x: torch.Tensor, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        """Outputs `rows` of projection `name` (None: all): those rows of its weight copied
        (by `embedding_bag`, one row per bag, which copied the up rows of a 0.1B-shape decode
        about 15% faster than `index_select`), then multiplied."""
        if rows is None:
            return self._dense(x, name)
        weight, bias = self._weight(name)
        weight = F.embedding_bag(rows, weight, torch.arange(len(rows), device=rows.device), mode="sum")
        bias = None if bias is None else bias.index_select(0, rows)
        if x.shape[0] != 1:
            return F.linear(x, weight, bias)
        return (torch.mv(weight, x[0]) if bias is None else torch.addmv(bias, weight, x[0]))[None]

    # ------------------------------------------------------------------ the computation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.w.gated:
            return self.project_out(self.w.act(self.project_in(x)))
        shape, x = x.shape, self._record(x)
        if self.site == "input":
            out = self._down_dense(self._gated_from_features(x))
        elif self.site is None:
            out = self._down_dense(self.w.act(self._dense(x, "gate")) * self._dense(x, "up"))
        else:
            out = self._gated_kept(x)
        return out.reshape(*shape[:-1], -1)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """A plain FFN's first projection W_in x: over the kept input features at the input site."""
        shape, x = x.shape, self._record(x)
        if self.site == "input":
            keep = self._keep(x.abs())
            h = self.rows["up"].per_token(keep, x)
            if self.counting:
                self.macs += int(keep.sum()) * self.neurons
        else:
            h = self._dense(x, "up")
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
        if self.counting:
            self.macs += 2 * int(keep.sum()) * self.neurons
        if x.shape[0] == 1:  # decoding at batch 1: the kept features found once for both
            features = keep[0].nonzero().view(-1)
            values = x[0].index_select(0, features)
            return (w.act(self.rows["gate"].over(features, values)) * self.rows["up"].over(features, values))[None]
        gate = self.rows["gate"].per_token(keep, x)
        up = self.rows["up"].per_token(keep, x)
        return w.act(gate) * up

    def _gated_kept(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate, gate or up site of a gated FFN: see the module's table."""
        w, n = self.w, x.shape[0]
        if n == 1 and self.site in ("gate", "up"):
            out = self._one_token_kept(x)
            if out is not None:
                return out
        if self.site == "up":
            up = self._dense(x, "up")
            keep = self._keep(up.abs())
            rows = _rows_worth_gathering(keep)
            gate = w.act(self._selected(x, "gate", rows))
            a = (gate if rows is None else _scatter(rows, gate, self.neurons)) * up
        else:
            gate = w.act(self._dense(x, "gate"))
            if self.site == "gate":
                keep = self._keep(gate.abs())
                rows = _rows_worth_gathering(keep)
            elif self.relu_family:  # a is 0 wherever the gate is
                rows = _rows_worth_gathering(gate != 0)
            else:
                rows = None
            up = self._selected(x, "up", rows)
            up = up if rows is None else _scatter(rows, up, self.neurons)
            a = gate * up
            if self.site == "intermediate":
                keep = self._keep(a.abs())
        computed = self.neurons if rows is None else len(rows)
        self.macs += n * (self.neurons + computed) * self.width
        return self._down_kept(keep, a)

    def _one_token_kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gate or up site for one token (decoding at batch 1), as `_gated_kept` computes
        it but with the kept neurons as an index throughout: no masks, scatters or per-token
        bags (with them a 0.1B-shape decode at r = 0.1 took 5% longer). None where the kept
        neurons are too many to be worth gathering."""
        by_gate = self.site == "gate"
        scored, other = ("gate", "up") if by_gate else ("up", "gate")
        first = self._dense(x, scored)[0]
        if by_gate:
            first = self.w.act(first)
        rows = self._keep(first.abs()).nonzero().view(-1)
        if len(rows) >= GATHER_BELOW * self.neurons:
            return None
        second = self._selected(x, other, rows)[0]
        if not by_gate:
            second = self.w.act(second)
        self.macs += (self.neurons + 2 * len(rows)) * self.width
        return self.rows["down"].over(rows, first.index_select(0, rows) * second)[None]

    def _down_kept(self, keep: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """W_out over each token's kept neurons (those whose activation is not 0)."""
        keep = keep & (a != 0)
        if self.counting:
            self.macs += int(keep.sum()) * self.width
        return self.rows["down"].per_token(keep, a)

    def _down_dense(self, a: torch.Tensor) -> torch.Tensor:
        self.macs += a.shape[0] * self.neurons * self.width
        return self._dense(a, "down")


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


def sparse_modules(ffns, rule: Rule | None, by_rows: bool | None = None) -> list[SparseFFN]:
    """A `SparseFFN` under `rule` (None: dense, in the same layout) for each FFN; `by_rows`
    as `SparseFFN` takes it."""
    return [SparseFFN(ffn_weights(ffn), rule, by_rows) for ffn in ffns]


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
