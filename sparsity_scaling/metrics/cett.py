"""CETT thresholds: for a target CETT value, each layer's eps from the dense activations.

Neuron i of a layer outputs n_i = W_out[:, i] a_i, with norm m_i = |a_i| ||W_out[:, i]||.
At threshold eps the inactive neurons are those with m_i < eps, and

    CETT(eps) = mean over tokens of ||sum of inactive n_i|| / ||FFN(x)||,

which rises monotonically with eps. Each evaluation is one masked product W_out (a * mask)
on the calibration tokens; under tensor parallelism the ranks exchange only its d_h-sized
partial sums and two scalars, so every rank finds the same eps.
"""

from __future__ import annotations

import bisect
import math

import torch

from .comm import max_all, sum_dp, sum_tp
from .measure import full_precision
from .target import SparsityTarget

# A secant's slope through one point: near 0 the entries below eps grow as eps, each up to eps: CETT ~ eps**1.5.
POWER = 1.5


class _Layer:
    def __init__(self, activations: torch.Tensor, w_out: torch.Tensor):
        self.a = activations  # [T, local neurons]
        self.w_out = w_out  # [d_model, local neurons]
        self.norms = w_out.norm(dim=0)
        self.m = activations.abs() * self.norms  # neuron output norms
        y_norm = sum_tp(activations @ w_out.t()).norm(dim=-1)
        self.valid = y_norm > 0  # tokens whose FFN output is exactly zero have no CETT
        self.y_norm = y_norm[self.valid]
        top = self.m.max() if self.m.numel() else torch.zeros(())
        self.eps_max = float(max_all(top.reshape(1).clone())) * (1 + 1e-6) + 1e-30
        self.known: list[tuple[float, float]] = [(0.0, 0.0), (self.eps_max, 1.0)]  # sorted (eps, cett)


class CETTSearch:
    """Per-layer eps for any target CETT; evaluations are cached and reused across targets."""

    def __init__(self, target: SparsityTarget, calibration: dict[int, torch.Tensor]):
        device = next(iter(target.parameters())).device  # the search runs where the model and its calibration are
        with full_precision():
            self.layers = {  # an MoE expert no calibration token was routed to has none
                ffn.layer: _Layer(calibration.get(ffn.layer, torch.zeros(0, ffn.local_neurons, device=device)),
                                  ffn.output_weight().to(device))
                for ffn in target.ffns
            }
        self.flops = 0.0  # multiply-adds x 2 spent in evaluations (per rank)

    def release_weights(self) -> None:
        """Let go of the model's W_out (to free the model); `attach` before new evaluations."""
        for state in self.layers.values():
            state.w_out = None

    def attach(self, target: SparsityTarget) -> None:
        """W_out again, from the same model reloaded."""
        for ffn in target.ffns:
            state = self.layers[ffn.layer]
            state.w_out = ffn.output_weight().to(state.a.device)

    def cett(self, layer: int, eps: float) -> float:
        """CETT of `layer` at threshold eps, averaged over all ranks' calibration tokens."""
        state = self.layers[layer]
        if state.w_out is None:
            raise RuntimeError("CETTSearch.cett after release_weights: attach the model first")
        inactive = state.a * (state.m < eps)
        with full_precision():
            residual = sum_tp(inactive @ state.w_out.t())[state.valid]
        self.flops += 2.0 * state.a.numel() * state.w_out.shape[0]
        ratio = residual.norm(dim=-1) / state.y_norm
        total = sum_dp(torch.tensor([ratio.double().sum().item(), float(ratio.numel())], dtype=torch.float64))
        value = (total[0] / total[1]).item() if total[1] > 0 else 0.0
        bisect.insort(state.known, (eps, value))
        return value

    def eps_for(self, layer: int, target: float, tol: float = 1e-4, max_steps: int = 40) -> float:
        """eps whose CETT is within `tol` of `target`, from the tightest bracket evaluated so far.

        CETT(eps) is monotone and locally close to a power of eps, so each step is a secant
        in (log eps, log CETT) through the nearest evaluated points, kept inside the bracket;
        a step that leaves one end of the bracket in place twice is followed by a bisection
        (in log eps), so the bracket shrinks whatever the shape. The first step of a layer
        starts from `_first_guess`. Once the bracket's CETTs are within 4 tol of each other,
        the answer is interpolated between its ends (`_interpolate`).
        """
        state = self.layers[layer]
        sides: list[bool] = []  # which end each evaluation replaced (True: the lower)
        for _ in range(max_steps):
            lo = max((p for p in state.known if p[1] <= target), default=state.known[0])
            hi = min((p for p in state.known if p[1] >= target), default=state.known[-1])
            best = min((lo, hi), key=lambda p: abs(p[1] - target))
            if hi[1] - lo[1] <= 4 * tol and lo[0] > 0.0 and hi[1] > lo[1]:
                return _interpolate(lo, hi, target)
            if abs(best[1] - target) <= tol or hi[0] - lo[0] <= 1e-9 * state.eps_max:
                return best[0]
            if len(state.known) == 2:
                eps = self._first_guess(state, target)
            elif sides[-2:] in ([True, True], [False, False]):
                eps = _inside(lo[0], hi[0], 0.5)
                sides.clear()
            else:
                eps = _secant(state.known, lo, hi, target)
            sides.append(self.cett(layer, eps) <= target)
        return min(state.known, key=lambda p: abs(p[1] - target))[0]

    def _first_guess(self, state: _Layer, target: float) -> float:
        """eps at which the neuron outputs below it would hold `target` of the FFN output's
        norm if they were orthogonal (the root of their summed squares), on a sample of
        tokens: a sort, no product with W_out (so not counted in `flops`); the same on every rank."""
        rows = state.valid.nonzero().flatten()
        stride = max(1, rows.numel() // self.GUESS_TOKENS)
        guess = 0.5 * state.eps_max
        if rows.numel():
            m, _ = state.m[rows[::stride]].sort(dim=-1)
            energy = m.square().cumsum(dim=-1)
            energy = torch.cat([energy.new_zeros(m.shape[0], 1), energy], dim=-1)  # energy[:, k]: the k smallest
            y = state.y_norm[::stride]

            def proxy(candidates: torch.Tensor) -> torch.Tensor:  # every candidate at once: one synchronisation
                below = torch.searchsorted(m, candidates.expand(m.shape[0], -1).contiguous())
                return (energy.gather(1, below).sqrt() / y[:, None]).mean(dim=0)

            candidates = state.eps_max * torch.logspace(-6, 0, 64, dtype=m.dtype, device=m.device)
            for _ in range(2):  # log-spaced over six decades, then linear between the two around the target
                values = proxy(candidates[None]).tolist()
                above = next((i for i, v in enumerate(values) if v >= target), len(values) - 1)
                low = float(candidates[above - 1]) if above > 0 else 0.0
                guess = float(candidates[above])
                candidates = torch.linspace(low, guess, 64, dtype=m.dtype, device=m.device)
        return float(max_all(torch.tensor([guess], dtype=torch.float64)))

    GUESS_TOKENS = 512

    def thresholds(self, target: float, fresh: bool = False) -> dict[int, float]:
        """eps of every layer for one common CETT value. `fresh`: as a search that evaluated
        nothing before finds them, so that they depend on the calibration and the target
        alone, not on what was searched before (what it evaluates is kept for later)."""
        if not fresh:
            return {layer: self.eps_for(layer, target) for layer in self.layers}
        eps = {}
        for layer, state in self.layers.items():
            before, state.known = state.known, [(0.0, 0.0), (state.eps_max, 1.0)]
            try:
                eps[layer] = self.eps_for(layer, target)
            finally:
                state.known = sorted(set(before) | set(state.known))
        return eps

    def neuron_thresholds(self, eps: dict[int, float]) -> dict[int, torch.Tensor]:
        """Per-neuron thresholds on |a_i|: eps / ||W_out[:, i]|| (local neurons)."""
        return {
            layer: eps[layer] / self.layers[layer].norms.clamp_min(1e-30) for layer in self.layers
        }


def _interpolate(lo: tuple[float, float], hi: tuple[float, float], target: float) -> float:
    """eps at `target` on the line through two evaluated points in (CETT, log eps): within a
    narrow bracket, continuous and rising in the target, so that a slightly larger CETT
    never gets a smaller threshold because of which points happen to have been evaluated."""
    return _inside(lo[0], hi[0], (target - lo[1]) / (hi[1] - lo[1]))


def _inside(lo: float, hi: float, fraction: float) -> float:
    """The point `fraction` of the way from lo to hi, in log eps where lo > 0."""
    if lo <= 0.0:
        return hi * 1e-3 ** (1 - fraction) if fraction < 1 else hi
    return math.exp(math.log(lo) + fraction * (math.log(hi) - math.log(lo)))


def _secant(known: list[tuple[float, float]], lo: tuple[float, float], hi: tuple[float, float],
            target: float) -> float:
    """Secant in (log eps, log CETT) through the bracket's ends (lo, hi) where both are
    strictly inside (0, 1), else through the two evaluated points nearest `target` (through
    one, with slope POWER); kept inside the bracket."""
    inside = [p for p in (lo, hi) if 0.0 < p[1] < 1.0]
    points = [p for p in known if 0.0 < p[1] < 1.0 and p[0] > 0.0]
    near = inside if len(inside) == 2 else sorted(points, key=lambda p: abs(math.log(p[1] / target)))[:2]
    if not near:
        return _inside(lo[0], hi[0], 0.5)
    (e1, c1), slope = near[0], POWER
    if len(near) == 2 and near[1][1] != c1 and near[1][0] != e1:
        measured = (math.log(near[1][1]) - math.log(c1)) / (math.log(near[1][0]) - math.log(e1))
        slope = measured if measured > 0 else slope
    eps = math.log(e1) + (math.log(target) - math.log(c1)) / slope
    low = math.log(lo[0]) if lo[0] > 0 else math.log(hi[0] * 1e-3)
    fraction = (eps - low) / (math.log(hi[0]) - low)
    return _inside(lo[0], hi[0], min(max(fraction, 0.005), 0.995))

