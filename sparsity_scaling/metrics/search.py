"""Searches over sparsity settings: PPL-p%, the stabilising strategy, critical sparsity.

All searches share one dense pass per model (`Evaluator`) and count their cost in
forward-pass equivalents: sparse passes, plus the threshold searches' matrix products
relative to one forward pass over the validation data.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import UserError
from . import check_p
from .cett import CETTSearch
from .comm import max_all, min_all, tp_size
from .measure import EvalData, SparsePass, check_vocab, dense_pass, loss_pass, matmul_params, sparse_pass
from .result import SparsityResult, unconverged_warning
from .rules import PerNeuronThreshold, Rule, SitePeak
from .target import SparsityTarget


class Evaluator:
    """One model on one validation set: the dense pass once, then any rule measured on it."""

    def __init__(self, target: SparsityTarget, data: EvalData, calibration_tokens: int = 8192):
        check_vocab(data, target)
        self.started = time.time()
        self.target, self.data = target, data
        self.vocab_size = target.vocab_size  # kept when a ReloadingEvaluator parks its model
        self.dense = dense_pass(target, data, calibration_tokens)
        self.passes = 1
        self.cett = CETTSearch(target, self.dense.calibration)
        self.forward_flops = 2.0 * matmul_params(target) * data.my_tokens()

    def forward_passes(self) -> float:
        return self.passes + self.cett.flops / self.forward_flops

    def measure(self, rule: Rule) -> SparsePass:
        self.passes += 1
        return sparse_pass(self.target, self.data, rule)

    def width(self, site: str) -> int:
        """Scores a rule at `site` ranks per token and layer: all d_f neurons of every TP rank
        (top-k ranks the gathered neurons), or the d_model features of the FFN input."""
        if site == "input":
            return int(self.target.ffns[0].output_weight().shape[0])
        return max(f.local_neurons for f in self.target.ffns) * tp_size()

    def peak(self, site: str) -> float:
        """The largest score at `site` on any rank, so every rank searches the same
        thresholds: from the calibration activations at the intermediate site, else by one
        pass over the data."""
        if site == "intermediate":
            local = max(float(a.abs().max()) for a in self.dense.calibration.values() if a.numel())
        else:
            probe = SitePeak(site)
            loss_pass(self.target, self.data, probe)
            self.passes += 1
            local = probe.peak
        return float(max_all(torch.tensor(local, dtype=torch.float64)))

    @contextmanager
    def loaded(self) -> Iterator["Evaluator"]:
        """This evaluator with its model in memory (it always is; see `ReloadingEvaluator`)."""
        yield self

    def cett_rule(self, value: float) -> PerNeuronThreshold:
        eps = self.cett.thresholds(value)
        return PerNeuronThreshold(
            thresholds=self.cett.neuron_thresholds(eps), cett=value, layer_eps=[eps[k] for k in sorted(eps)]
        )

    def result(self, metric: str, rule: Rule, sparse: SparsePass, converged: bool | None = None,
               **extra) -> SparsityResult:
        cett = getattr(rule, "cett", None)
        experts = expert_ratios(self.target, sparse)
        if experts:
            extra = {"experts": experts, **extra}
        return SparsityResult(
            metric=metric,
            params=rule.params(),
            activation_ratio=sparse.activation_ratio,
            layer_activation_ratios=sparse.layer_ratios(),
            dense_ppl=self.dense.ppl,
            sparse_ppl=sparse.ppl,
            ppl_ratio=sparse.ppl / self.dense.ppl,
            tokens=self.data.tokens,
            forward_passes=round(self.forward_passes(), 3),
            seconds=round(time.time() - self.started, 3),
            cett=cett,
            thresholds=getattr(rule, "layer_eps", None),
            converged=converged,
            extra=extra,
        )


def expert_ratios(target: SparsityTarget, sparse: SparsePass) -> list[dict]:
    """Each MoE expert's decoder layer, expert, routed tokens and activation ratio over
    them (None if no token was routed to it); empty for a model without experts."""
    return [{"layer": ffn.block, "expert": ffn.expert, "tokens": sparse.tokens[ffn.layer],
             "activation_ratio": sparse.active[ffn.layer] / sparse.total[ffn.layer] if sparse.total[ffn.layer] else None}
            for ffn in target.ffns if getattr(ffn, "expert", None) is not None]


class ModelRoom:
    """The memory a search may fill with models it keeps loaded between its steps: `share`
    of what was free where the first model lives (its GPU's, else the host's)."""

    def __init__(self, share: float = 0.5):
        self.share, self.left = share, None

    def take(self, target: SparsityTarget) -> bool:
        """Whether `target` stays loaded (then its bytes are taken), decided on every rank alike."""
        if self.left is None:
            self.left = int(free_memory(next(iter(target.parameters())).device) * self.share)
        size = model_bytes(target)
        fits = bool(min_all(torch.tensor(float(size <= self.left), dtype=torch.float64)))
        if fits:
            self.left -= size
        return fits


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def model_bytes(target: SparsityTarget) -> int:
    return sum(p.numel() * p.element_size() for p in target.parameters())


class ReloadingEvaluator(Evaluator):
    """An evaluator that keeps its dense pass and calibration but, unless `room` holds it,
    not its model between measurements: `loaded()` loads the model for a measurement and
    frees it after. The stabilising strategy compares several checkpoints at every step of
    its search; with these, memory holds the models that fit plus one at a time, and each
    checkpoint's calibration; a model kept is read from disk once, not at every step."""

    def __init__(self, load: Callable[[], SparsityTarget], data: EvalData, calibration_tokens: int = 8192,
                 room: ModelRoom | None = None):
        super().__init__(load(), data, calibration_tokens)
        self.load = load
        self.large = model_bytes(self.target) >= self.COLLECT_BYTES
        self.kept = room is not None and room.take(self.target)
        if not self.kept:
            self._park()

    COLLECT_BYTES = 256 << 20  # a parked model this large is collected at once, before the next loads

    def _park(self) -> None:
        self.target = None
        self.cett.release_weights()
        if self.large:  # a full collection costs ~0.2-0.5 s; worth it only where the memory matters
            gc.collect()

    @contextmanager
    def loaded(self) -> Iterator[Evaluator]:
        if self.kept:
            yield self
            return
        self.target = self.load()
        self.cett.attach(self.target)
        try:
            yield self
        finally:
            self._park()


@dataclass
class Point:
    x: float  # the searched parameter (a CETT value here)
    ratio: float  # PPL ratio
    activation: float


@dataclass
class Solution:
    """Where a PPL-ratio search stopped, and whether it got there within its tolerances."""

    point: Point
    converged: bool
    activation_gap: float | None  # the final bracket's activation ratios apart (None: never bracketed)

    def warning(self, what: str) -> str | None:
        """A line for the user when the search ran out of steps, else None."""
        return None if self.converged else unconverged_warning(what, self.activation_gap)


UNCHANGED_RATIO = 1e-6  # a PPL ratio within this of 1 with every neuron masked: the FFNs do nothing


def solve_ppl_ratio(measure: Callable[[float], Point], target: float, act_tol: float = 1e-3,
                    ratio_tol: float = 1e-6, max_steps: int = 16, start: float = 0.1,
                    known: Sequence[Point] = (), on_step: Callable[[int, Point], None] | None = None) -> Solution:
    """Find the CETT value whose PPL ratio is `target`.

    PPL ratio and activation ratio are monotone in CETT. Bracket the target by doubling,
    then interpolate in log PPL ratio (regula falsi, kept off the bracket's ends); stop when
    the bracket's activation ratios differ by at most act_tol, so the reported activation
    ratio is within act_tol of the one at the exact CETT. Points measured before (`known`,
    e.g. by a search for another p) narrow the starting bracket and cost nothing.
    `on_step(step, point)` hears of each measurement (a job's progress report). After
    `max_steps` measurements it stops where it is, and says it did not converge.
    """
    lo, hi = Point(0.0, 1.0, 1.0), None

    def narrow(point: Point) -> None:
        nonlocal lo, hi
        if point.ratio <= target:
            lo = point if point.x > lo.x else lo
        elif hi is None or point.x < hi.x:
            hi = point

    def converged(point: Point | None) -> bool:
        return (point is not None and abs(point.ratio - target) <= ratio_tol) or (
            hi is not None and lo.activation - hi.activation <= act_tol)

    for point in known:
        narrow(point)
    last = min(known, key=lambda p: abs(p.ratio - target)) if known else None
    for step in range(1, max_steps + 1):
        if converged(last):
            break
        if hi is None:
            if lo.x >= 1.0:
                if abs(lo.ratio - 1) <= UNCHANGED_RATIO:
                    raise UserError(
                        f"masking every FFN neuron leaves the perplexity unchanged (PPL ratio {lo.ratio:.7f}): "
                        "the model's output does not depend on its FFNs (an output layer of zeros, or FFN "
                        "weights not loaded?)"
                    )
                raise UserError(
                    f"the PPL ratio stays at {lo.ratio:.5f} < {target:.5f} even with every "
                    f"neuron below threshold; the validation set is too small to move the perplexity"
                )
            x = start if lo.x == 0.0 else min(1.0, 2 * lo.x)
        else:
            fraction = math.log(target / lo.ratio) / math.log(hi.ratio / lo.ratio)
            fraction = min(max(fraction, 0.05), 0.95)  # keep shrinking the bracket from both sides
            x = lo.x + fraction * (hi.x - lo.x)
        last = measure(x)
        narrow(last)
        if on_step is not None:
            on_step(step, last)
    candidates = [p for p in (lo, hi) if p is not None]
    best = min(candidates, key=lambda p: abs(p.ratio - target))
    return Solution(best, converged(last), None if hi is None else lo.activation - hi.activation)


def ppl_p(evaluator: Evaluator, p: float, measured: dict | None = None,
          on_step: Callable[[int, Point], None] | None = None, max_steps: int = 16) -> SparsityResult:
    """PPL-p% sparsity: the CETT at which PPL is (1 + p/100) times the dense PPL.

    `measured` ({CETT: (rule, sparse pass)}) shares measurements between searches on the
    same evaluator, e.g. a sweep over p. The result says whether the search converged.
    """
    check_p(p)
    measured = {} if measured is None else measured

    def point(c: float) -> Point:
        sparse = measured[c][1]
        return Point(c, sparse.ppl / evaluator.dense.ppl, sparse.activation_ratio)

    def measure(c: float) -> Point:
        rule = evaluator.cett_rule(c)
        measured[c] = (rule, evaluator.measure(rule))
        return point(c)

    solution = solve_ppl_ratio(measure, 1 + p / 100, known=[point(c) for c in measured], on_step=on_step,
                               max_steps=max_steps)
    best = solution.point
    if best.x not in measured:  # the search stopped at CETT 0 (dense)
        measure(best.x)
    rule, sparse = measured[best.x]
    result = evaluator.result("ppl-p", rule, sparse, converged=solution.converged)
    result.params["p"] = p
    if not solution.converged:
        result.extra["activation_gap"] = solution.activation_gap
    return result


def stabilised_cett(evaluators: Sequence[Evaluator], p: float,
                    on_step: Callable[[int, Point], None] | None = None) -> Solution:
    """The paper's stabilising strategy: one CETT whose PPL ratio, averaged over the given
    (last five) checkpoints, is 1 + p/100 (where the search stopped, and whether it
    converged). Each evaluator's model is in memory only while it is measured (with
    `ReloadingEvaluator`s: one model at a time)."""
    check_p(p)

    def measure(c: float) -> Point:
        ratios, acts = [], []
        for evaluator in evaluators:
            with evaluator.loaded() as ev:
                sparse = ev.measure(ev.cett_rule(c))
            ratios.append(sparse.ppl / ev.dense.ppl)
            acts.append(sparse.activation_ratio)
        return Point(c, sum(ratios) / len(ratios), sum(acts) / len(acts))

    return solve_ppl_ratio(measure, 1 + p / 100, on_step=on_step)


def critical(evaluator: Evaluator, make_rule: Callable[[float], Rule], low: float, high: float,
             sparser_when_larger: bool, tolerance: float = 0.01, integer: bool = False,
             steps: int = 14) -> SparsityResult:
    """Highest sparsity a one-parameter rule reaches with PPL ratio <= 1 + tolerance.

    Bisection on the parameter between a dense end and a sparse end (the PPL ratio grows
    with sparsity), keeping the sparsest setting seen within the tolerance.
    """
    limit = 1 + tolerance
    dense_end, sparse_end = (low, high) if sparser_when_larger else (high, low)
    best = None
    for _ in range(steps):
        x = (dense_end + sparse_end) / 2
        if integer:
            x = round(x)
            if x in (dense_end, sparse_end):
                break
        rule = make_rule(x)
        sparse = evaluator.measure(rule)
        ok = sparse.ppl / evaluator.dense.ppl <= limit
        if ok and (best is None or sparse.activation_ratio < best[1].activation_ratio):
            best = (rule, sparse)
        if ok:
            dense_end = x
        else:
            sparse_end = x
    if best is None:
        raise UserError(f"no setting of this rule keeps the PPL ratio within {limit:.4f}")
    result = evaluator.result("critical", *best)
    result.params["tolerance"] = tolerance
    return result

