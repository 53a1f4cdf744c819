"""Least-squares fitting of a law: multi-start Levenberg-Marquardt and residual bootstrap.

Levenberg-Marquardt (scipy's MINPACK `lm`) runs on each law's free parameters, so the bounds
(A0 in (0, 1), c and alpha positive) hold without a bounded solver. It starts from the best
points of the law's own profile grid (and every local minimum along it): nothing is tuned
per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from .errors import LawError
from .forms import Law

N_STARTS = 6  # best profile points refined by LM, besides the profile's local minima
_MAX_NFEV = 1000
_TOLERANCE = 1e-10
_BAD_RESIDUAL = 1e3  # stands in for a non-finite residual so MINPACK backs off


@dataclass(frozen=True)
class LawFit:
    """A law fitted to points (D in units of 1e9 tokens, A the activation ratio)."""

    law: Law
    params: np.ndarray
    D: np.ndarray
    A: np.ndarray

    @property
    def residuals(self) -> np.ndarray:
        return self.A - self.law.evaluate(self.D, self.params)

    @property
    def sse(self) -> float:
        return float(np.sum(self.residuals**2))

    @property
    def mae(self) -> float:
        return float(np.mean(np.abs(self.residuals)))

    @property
    def mse(self) -> float:
        return self.sse / len(self.D)

    @property
    def aic(self) -> float:
        """Gaussian least-squares AIC, n ln(SSE/n) + 2k, with k the fitted coefficients."""
        n = len(self.D)
        return float(n * np.log(self.mse) + 2 * self.law.n_free)

    @property
    def bic(self) -> float:
        n = len(self.D)
        return float(n * np.log(self.mse) + self.law.n_free * np.log(n))


def levenberg_marquardt(law: Law, D, A, start):
    """One LM run from a coefficient vector: (coefficients, sse), or None if it failed.

    LM works in units of D / scale (D's geometric mean), so a CPU run's D of 1e-4 (in 1e9
    tokens) is as well conditioned as the paper's 1e2: otherwise c grows to ~1e3 and the
    c-alpha valley exhausts the evaluation budget.
    """
    scale = float(np.exp(np.mean(np.log(D))))
    D_raw, D, start = D, D / scale, law.rescaled(start, 1.0 / scale)

    def residuals(theta):
        r = law.evaluate_free(D, theta) - A
        return np.nan_to_num(r, nan=_BAD_RESIDUAL, posinf=_BAD_RESIDUAL, neginf=-_BAD_RESIDUAL)

    def jacobian(theta):
        return np.nan_to_num(law.jacobian_free(D, theta), nan=0.0, posinf=0.0, neginf=0.0)

    try:
        solution = least_squares(
            residuals, law.to_free(start), jac=jacobian if law.jacobian_free else "2-point",
            method="lm", x_scale="jac",
            ftol=_TOLERANCE, xtol=_TOLERANCE, gtol=_TOLERANCE, max_nfev=_MAX_NFEV,
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    params = law.rescaled(law.from_free(solution.x), scale)
    sse = float(np.sum((law.evaluate(D_raw, params) - A) ** 2))
    if solution.status <= 0 or not np.all(np.isfinite(params)) or not np.isfinite(sse):
        return None
    return params, sse


def _chosen_starts(law: Law, D, A, n_starts: int) -> list[np.ndarray]:
    """The best n_starts profile points plus every local minimum of the profile."""
    points = law.starting_points(D, A)
    if not points:
        return []
    sse = np.array([np.sum((law.evaluate(D, p) - A) ** 2) for p in points])
    sse = np.where(np.isfinite(sse), sse, np.inf)
    chosen = set(np.argsort(sse)[:n_starts].tolist())
    padded = np.concatenate([[np.inf], sse, [np.inf]])
    chosen |= {i for i in range(len(sse)) if padded[i + 1] <= min(padded[i], padded[i + 2])}
    return [points[i] for i in sorted(chosen) if np.isfinite(sse[i])]


def fit_law(law: Law, D, A, n_starts: int = N_STARTS) -> LawFit:
    """Least-squares fit of law to (D, A), from the best points of the law's starting grid."""
    D, A = np.asarray(D, float), np.asarray(A, float)
    starts = _chosen_starts(law, D, A, n_starts)
    if not starts:
        raise LawError(f"the {law.name} law has no valid starting point on these data: they do not "
                       "follow its shape or direction")
    runs = [r for r in (levenberg_marquardt(law, D, A, s) for s in starts) if r is not None]
    if not runs:
        raise LawError(f"the {law.name} law did not converge from any of its {len(starts)} starting "
                       "points: the data may be too noisy or flat, or not of its shape")
    params, _ = min(runs, key=lambda run: run[1])
    return LawFit(law, params, D, A)


@dataclass(frozen=True)
class Bootstrap:
    """Coefficient vectors refitted on resampled data (rows), and how many refits failed."""

    samples: np.ndarray
    failed: int


def bootstrap(fit: LawFit, n_samples: int, seed: int = 0) -> Bootstrap:
    """Residual bootstrap: refit the law on fitted values plus resampled residuals.

    Residuals are centred and scaled by sqrt(n / (n - k)) so that their spread matches the
    noise rather than the (smaller) spread left after fitting k coefficients. Each refit
    starts from the point estimate.
    """
    rng = np.random.default_rng(seed)
    n, k = len(fit.D), fit.law.n_free
    fitted = fit.law.evaluate(fit.D, fit.params)
    residuals = (fit.residuals - fit.residuals.mean()) * np.sqrt(n / (n - k))
    samples, failed = [], 0
    for _ in range(n_samples):
        resampled = fitted + rng.choice(residuals, size=n, replace=True)
        run = levenberg_marquardt(fit.law, fit.D, resampled, fit.params)
        if run is None:
            failed += 1
        else:
            samples.append(run[0])
    return Bootstrap(np.array(samples).reshape(-1, k), failed)
