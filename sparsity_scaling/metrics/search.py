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

    def ppl_ratio(self, sparse: SparsePass) -> float:
        return sparse.ppl / self.dense.ppl

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

    def cett_rule(self, value: float, fresh: bool = False) -> PerNeuronThreshold:
        """The CETT thresholds for `value`; `fresh`: independent of earlier searches
        (`CETTSearch.thresholds`), as a model measured at a given CETT must be."""
        eps = self.cett.thresholds(value, fresh)
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
            ppl_ratio=self.ppl_ratio(sparse),
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


DEFAULT_START = 0.1  # a search's first CETT when nothing better is known
NEAR_RATIO = 0.02  # a slope's stop also needs the PPL ratio within this share of p% of the target
UNCHANGED_RATIO = 1e-6  # a PPL ratio within this of 1 with every neuron masked: the FFNs do nothing


def solve_ppl_ratio(measure: Callable[[float], Point], target: float, act_tol: float = 1e-3,
                    ratio_tol: float = 1e-6, max_steps: int = 16, start: float = DEFAULT_START, power: float = 2.0,
                    known: Sequence[Point] = (), on_step: Callable[[int, Point], None] | None = None) -> Solution:
    """Find the CETT value whose PPL ratio is `target`.

    PPL ratio and activation ratio are monotone in CETT, and log(PPL ratio) grows about as
    a power of CETT (near its square: a small change of the FFN outputs raises the loss
    quadratically). So each step is a secant in (log CETT, log log PPL ratio): from `start`,
    then from one point with `power` as the exponent, then through the two points nearest
    the target, kept inside the bracket once there is one (where a secant left the same end
    in place twice, that end's distance to the target counts half, as in the Illinois
    method, so the bracket shrinks from both sides whatever the curve; before there is a
    bracket, the least step doubles while the measurements stay on one side).

    It stops when the bracket's activation ratios differ by at most act_tol (the exact
    CETT's activation ratio lies between them); or when the nearer end's PPL ratio is within
    NEAR_RATIO x p% of the target and, by the slope of a bracket whose PPL ratios are less
    than p% apart, its activation ratio within act_tol / 2 of the exact CETT's; or when a
    point is within ratio_tol of the target. Points measured before (`known`, e.g. by a
    search for another p) narrow the first steps and cost nothing. `on_step(step, point)`
    hears of each measurement (a job's progress report). After `max_steps` measurements it
    stops where it is, and says it did not converge.
    """
    points: list[Point] = [p for p in known if p.x > 0]
    lo, hi = Point(0.0, 1.0, 1.0), None
    side, same = None, 0  # the last measurement's side of the target (True: below), and how many in a row

    def bracket() -> tuple[Point, Point | None]:
        below = [p for p in points if p.ratio <= target]
        above = [p for p in points if p.ratio > target]
        return (max(below, key=lambda p: p.x, default=Point(0.0, 1.0, 1.0)),
                min(above, key=lambda p: p.x, default=None))

    def converged() -> bool:
        if any(abs(p.ratio - target) <= ratio_tol for p in points):
            return True
        if hi is None or lo.x == 0.0:
            return False
        if lo.activation - hi.activation <= act_tol:
            return True
        if hi.ratio - lo.ratio > target - 1:  # too wide a bracket for its slope to say anything
            return False
        near = min((lo, hi), key=lambda p: abs(p.ratio - target))
        slope = (lo.activation - hi.activation) / (hi.ratio - lo.ratio)
        off = abs(near.ratio - target)
        return off <= NEAR_RATIO * (target - 1) and off * slope <= act_tol / 2

    for step in range(1, max_steps + 1):
        lo, hi = bracket()
        if converged():
            break
        if hi is None and lo.x >= 1.0:
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
        x = _next_cett(points, lo, hi, target, start, power, same)
        last = measure(x)
        points.append(last)
        same = same + 1 if (last.ratio <= target) == side else 1
        side = last.ratio <= target
        if on_step is not None:
            on_step(step, last)
    lo, hi = bracket()
    candidates = [p for p in (lo, hi) if p is not None]
    best = min(candidates, key=lambda p: abs(p.ratio - target))
    return Solution(best, converged(), None if hi is None else lo.activation - hi.activation)


def _next_cett(points: Sequence[Point], lo: Point, hi: Point | None, target: float, start: float,
               power: float, same: int = 0) -> float:
    """The next CETT to measure: a secant in (log CETT, log log PPL ratio) from the bracket's
    end(s), strictly inside the bracket or beyond its one end. `same`: how many of the last
    measurements fell on the side of the target the last one did (Illinois halves the end
    they left in place; without a bracket, the least step doubles with each)."""
    if not points:
        return start
    goal = math.log(math.log(target))
    least = 0.01 * 2 ** max(same - 1, 0)  # in log CETT: a flat, noisy curve is crossed, not crept along

    def v(p: Point) -> float:
        return math.log(math.log(p.ratio)) - goal

    def slope(ends: Sequence[Point]) -> float:  # measured between two points, within [power / 2, 2 power]
        usable = [p for p in ends if p.ratio > 1.0]
        if len(usable) == 2 and usable[0].x != usable[1].x:
            measured = (v(usable[1]) - v(usable[0])) / (math.log(usable[1].x) - math.log(usable[0].x))
            return min(max(measured, power / 2), 2 * power)  # a flat stretch of a noisy curve is not its slope
        return power

    if hi is None:  # every point below the target: beyond the largest CETT
        if lo.ratio <= 1.0:
            return min(1.0, 4 * lo.x)
        step = -v(lo) / slope(sorted(points, key=lambda p: p.x)[-2:])
        return min(1.0, 8 * lo.x, lo.x * math.exp(max(step, least)))
    if lo.x == 0.0:  # every point above: below the smallest
        step = -v(hi) / slope(sorted(points, key=lambda p: p.x)[:2])
        return hi.x * math.exp(min(step, -least))
    if lo.ratio <= 1.0:  # no log log at the lower end: linear in the PPL ratio
        x = lo.x + (target - lo.ratio) / (hi.ratio - lo.ratio) * (hi.x - lo.x)
    else:  # regula falsi between the ends (Illinois: a stale end counts half)
        v_lo, v_hi = v(lo), v(hi)
        if same >= 2:  # the last two replaced the same end: the other one counts half
            if points[-1].ratio <= target:
                v_hi /= 2
            else:
                v_lo /= 2
        x = math.exp(math.log(lo.x) - v_lo * (math.log(hi.x) - math.log(lo.x)) / (v_hi - v_lo))
    margin = 0.01 * (hi.x - lo.x)  # strictly inside: the bracket shrinks at every step
    return min(max(x, lo.x + margin), hi.x - margin)


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
        return Point(c, evaluator.ppl_ratio(sparse), sparse.activation_ratio)

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
            ratios.append(ev.ppl_ratio(sparse))
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
        ok = evaluator.ppl_ratio(sparse) <= limit
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

