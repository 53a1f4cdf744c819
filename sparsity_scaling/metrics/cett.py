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

import torch

from .comm import max_all, sum_dp, sum_tp
from .target import SparsityTarget


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
        self.layers = {  # an MoE expert no calibration token was routed to has none
            ffn.layer: _Layer(calibration.get(ffn.layer, torch.zeros(0, ffn.local_neurons)), ffn.output_weight().cpu())
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
            self.layers[ffn.layer].w_out = ffn.output_weight().cpu()

    def cett(self, layer: int, eps: float) -> float:
        """CETT of `layer` at threshold eps, averaged over all ranks' calibration tokens."""
        state = self.layers[layer]
        if state.w_out is None:
            raise RuntimeError("CETTSearch.cett after release_weights: attach the model first")
        inactive = state.a * (state.m < eps)
        residual = sum_tp(inactive @ state.w_out.t())[state.valid]
        self.flops += 2.0 * state.a.numel() * state.w_out.shape[0]
        ratio = residual.norm(dim=-1) / state.y_norm
        total = sum_dp(torch.tensor([ratio.double().sum().item(), float(ratio.numel())], dtype=torch.float64))
        value = (total[0] / total[1]).item() if total[1] > 0 else 0.0
        bisect.insort(state.known, (eps, value))
        return value

    def eps_for(self, layer: int, target: float, tol: float = 1e-4, max_steps: int = 40) -> float:
        """Bisection on eps (monotone CETT) from the tightest bracket evaluated so far."""
        state = self.layers[layer]
        for _ in range(max_steps):
            lo = max((p for p in state.known if p[1] <= target), default=state.known[0])
            hi = min((p for p in state.known if p[1] >= target), default=state.known[-1])
            best = min((lo, hi), key=lambda p: abs(p[1] - target))
            if abs(best[1] - target) <= tol or hi[0] - lo[0] <= 1e-9 * state.eps_max:
                return best[0]
            mid = 0.5 * (lo[0] + hi[0])
            self.cett(layer, mid)
        return min(state.known, key=lambda p: abs(p[1] - target))[0]

    def thresholds(self, target: float) -> dict[int, float]:
        """eps of every layer for one common CETT value."""
        return {layer: self.eps_for(layer, target) for layer in self.layers}

    def neuron_thresholds(self, eps: dict[int, float]) -> dict[int, torch.Tensor]:
        """Per-neuron thresholds on |a_i|: eps / ||W_out[:, i]|| (local neurons)."""
        return {
            layer: eps[layer] / self.layers[layer].norms.clamp_min(1e-30) for layer in self.layers
        }
