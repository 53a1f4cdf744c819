"""Law forms: activation ratio A as a function of training data D (in units of 1e9 tokens).

The paper's two laws, ReLU (decreasing to a limit) and SiLU (increasing to a limit), and the
two alternatives it compares them against. Each law maps unbounded *free* parameters, which
Levenberg-Marquardt moves, onto its coefficients, so bounds hold by construction: positive
coefficients go through exp, the limit ratio A0 through a logistic onto (0, 1). Each law
also proposes starting points from a linearisation of itself, so that no model needs a
hand-tuned start.
"""

from __future__ import annotations

import numpy as np

TOKENS_PER_UNIT = 1e9  # the laws take D in units of 1e9 tokens

# Grid of exponents profiled for starting points: every exponent the paper reports lies
# well inside it (0.1 to 2.1).
ALPHA_GRID = np.geomspace(0.02, 5.0, 48)


def _exp(t):
    """exp that neither overflows nor underflows to exactly 0."""
    return np.exp(np.minimum(np.maximum(t, -700.0), 700.0))


def _logistic(t):
    return 1.0 / (1.0 + _exp(-np.asarray(t, float)))


def _logit(p):
    p = np.clip(p, 1e-15, 1.0 - 1e-15)
    return np.log(p) - np.log1p(-p)


def _columns(p, n):
    """Split coefficients into n values; a stack of vectors (rows) gives columns, which
    broadcast against D into one row per vector."""
    p = np.asarray(p, float)
    return [p[..., i] if p.ndim == 1 else p[..., i, None] for i in range(n)]


def _linear_fit(y, *columns):
    """Least-squares coefficients of y on the given columns."""
    beta, *_ = np.linalg.lstsq(np.column_stack(columns), y, rcond=None)
    return beta


class Law:
    """A law form: coefficients, evaluation, free-parameter map and starting points."""

    name: str
    formula: str
    coefficients: tuple[str, ...]
    fixed: dict[str, float] = {}  # reported with the coefficients, never fitted

    @property
    def n_free(self) -> int:
        return len(self.coefficients)

    def evaluate(self, D, p):
        """A(D) for one coefficient vector p, or for a stack of them (rows)."""
        raise NotImplementedError

    def to_free(self, p):
        raise NotImplementedError

    def from_free(self, theta):
        raise NotImplementedError

    def rescaled(self, p, scale: float):
        """The coefficients in D's units of a law fitted in units of D / scale."""
        raise NotImplementedError

    def evaluate_free(self, D, theta):
        """A(D) from free parameters: what the fit evaluates."""
        return self.evaluate(D, self.from_free(theta))

    # d A(D) / d theta (one row per D) as a method jacobian_free(D, theta); a law without
    # one leaves it None and the fit uses finite differences.
    jacobian_free = None

    def starting_points(self, D, A) -> list[np.ndarray]:
        """Candidate coefficient vectors along a one-dimensional profile grid."""
        raise NotImplementedError

    def as_dict(self, p) -> dict[str, float]:
        named = {name: float(value) for name, value in zip(self.coefficients, p)}
        return {**named, **self.fixed}


class SparsityLaw(Law):
    """A law of the paper: it has a limit A0, an exponent alpha and a closed-form inverse."""

    increasing: bool

    def limit(self, p):
        return np.asarray(p, float)[..., self.coefficients.index("A0")]

    def inverse(self, p, target):
        """D at which A(D) crosses target; inf where it never does (one or many p)."""
        raise NotImplementedError

    def derivative(self, D, p):
        """dA/dD, with D in units of 1e9 tokens."""
        raise NotImplementedError

    def linearised(self, D, A, p):
        """(x, y, x_label, y_label, slope, intercept): the law as the line y = slope x + intercept."""
        raise NotImplementedError


class ReluLaw(SparsityLaw):
    name = "relu"
    formula = "A(D) = exp(-c D^alpha + b) + A0"
    coefficients = ("alpha", "b", "c", "A0")
    increasing = False

    def evaluate(self, D, p):
        alpha, b, c, A0 = _columns(p, 4)
        with np.errstate(over="ignore", invalid="ignore"):
            return _exp(b - c * np.asarray(D, float) ** alpha) + A0

    # Free parameters: ln alpha, u = b - c, ln v with v = c alpha, logit A0. The exponent
    # b - c D^alpha = u - v (D^alpha - 1) / alpha then tends to u - v ln D as alpha -> 0, so
    # the power-law limit is a smooth edge instead of a valley where b and c run off together.

    def to_free(self, p):
        alpha, b, c, A0 = p
        return np.array([np.log(alpha), b - c, np.log(c * alpha), _logit(A0)])

    def from_free(self, theta):
        t_alpha, u, t_v, t_A0 = theta
        alpha, v = _exp(t_alpha), _exp(t_v)
        with np.errstate(over="ignore"):  # alpha -> 0: b and c overflow, the fit rejects them
            return np.array([alpha, u + v / alpha, v / alpha, _logistic(t_A0)])

    def _terms(self, D, theta):
        t_alpha, u, t_v, t_A0 = theta
        alpha, v = _exp(t_alpha), _exp(t_v)
        log_D = np.log(D)
        with np.errstate(over="ignore", invalid="ignore"):
            growth = np.expm1(alpha * log_D) / alpha  # (D^alpha - 1) / alpha
            return alpha, v, log_D, growth, _exp(u - v * growth), _logistic(t_A0)

    def evaluate_free(self, D, theta):
        *_, excess, A0 = self._terms(D, theta)
        return excess + A0

    def jacobian_free(self, D, theta):
        alpha, v, log_D, growth, excess, A0 = self._terms(D, theta)
        with np.errstate(over="ignore", invalid="ignore"):
            d_growth = log_D * (alpha * growth + 1) - growth  # d growth / d ln alpha
            return np.column_stack([-excess * v * d_growth, excess, -excess * v * growth,
                                    np.full_like(excess, A0 * (1 - A0))])

    def starting_points(self, D, A):
        # For fixed alpha and A0, log(A - A0) = b - c D^alpha is linear in (b, c): profile
        # A0 on a grid below the smallest ratio and keep the best A0 for each alpha.
        spread = max(np.ptp(A), 1e-6)
        offsets = spread * np.geomspace(3e-3, 30.0, 24)
        limits = np.concatenate([A.min() - offsets, A.min() * np.array([0.5, 0.1, 0.01])])
        limits = limits[limits > 0]
        logs = np.log(A[:, None] - limits[None, :])  # one column per candidate A0
        points = []
        for alpha in ALPHA_GRID:
            design = np.column_stack([np.ones_like(D), D**alpha])
            (b, minus_c), *_ = np.linalg.lstsq(design, logs, rcond=None)
            candidates = np.column_stack([np.full_like(b, alpha), b, -minus_c, limits])[minus_c < 0]
            if len(candidates):
                sse = np.sum((self.evaluate(D, candidates) - A) ** 2, axis=1)
                if np.any(np.isfinite(sse)):
                    points.append(candidates[np.nanargmin(np.where(np.isfinite(sse), sse, np.nan))])
        return points

    def rescaled(self, p, scale):
        alpha, b, c, A0 = p
        return np.array([alpha, b, c * scale ** -alpha, A0])

    def inverse(self, p, target):
        alpha, b, c, A0 = np.moveaxis(np.asarray(p, float), -1, 0)
        gap = target - A0
        with np.errstate(divide="ignore", invalid="ignore"):
            base = (b - np.log(np.where(gap > 0, gap, 1.0))) / c
            D = np.where(base > 0, np.abs(base) ** (1.0 / alpha), 0.0)
        return np.where(gap > 0, D, np.inf)

    def derivative(self, D, p):
        alpha, b, c, A0 = _columns(p, 4)
        D = np.asarray(D, float)
        return -c * alpha * D ** (alpha - 1) * _exp(b - c * D**alpha)

    def linearised(self, D, A, p):
        alpha, b, c, A0 = p
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.log(A - A0)
        return D**alpha, y, f"D^alpha (alpha = {alpha:.3g})", "ln(A - A0)", -c, b


class SiluLaw(SparsityLaw):
    name = "silu"
    formula = "A(D) = -c / D^alpha + A0"
    coefficients = ("alpha", "c", "A0")
    increasing = True

    def evaluate(self, D, p):
        alpha, c, A0 = _columns(p, 3)
        with np.errstate(over="ignore", invalid="ignore"):
            return A0 - c * np.asarray(D, float) ** (-alpha)

    def rescaled(self, p, scale):
        alpha, c, A0 = p
        return np.array([alpha, c * scale**alpha, A0])

    def to_free(self, p):
        alpha, c, A0 = p
        return np.array([np.log(alpha), np.log(c), _logit(A0)])

    def from_free(self, theta):
        t_alpha, t_c, t_A0 = theta
        return np.array([_exp(t_alpha), _exp(t_c), _logistic(t_A0)])

    def jacobian_free(self, D, theta):
        alpha, c, A0 = self.from_free(theta)
        with np.errstate(over="ignore", invalid="ignore"):
            term = c * np.asarray(D, float) ** (-alpha)  # c D^-alpha
            return np.column_stack([term * alpha * np.log(D), -term, np.full_like(term, A0 * (1 - A0))])

    def starting_points(self, D, A):
        # For fixed alpha the law is linear in (A0, c): exact least squares on the grid.
        points = []
        for alpha in ALPHA_GRID:
            A0, minus_c = _linear_fit(A, np.ones_like(D), D ** (-alpha))
            if minus_c < 0 and 0 < A0 < 1:
                points.append(np.array([alpha, -minus_c, A0]))
        return points

    def inverse(self, p, target):
        alpha, c, A0 = np.moveaxis(np.asarray(p, float), -1, 0)
        gap = A0 - target
        with np.errstate(divide="ignore", over="ignore"):
            D = (c / np.where(gap > 0, gap, 1.0)) ** (1.0 / alpha)
        return np.where(gap > 0, D, np.inf)

    def derivative(self, D, p):
        alpha, c, A0 = _columns(p, 3)
        return c * alpha * np.asarray(D, float) ** (-alpha - 1)

    def linearised(self, D, A, p):
        alpha, c, A0 = p
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.log(A0 - A)
        return np.log(D), y, "ln D", "ln(A0 - A)", -alpha, np.log(c)


class LogLaw(Law):
    """A0 + c log(a D + b). b is fixed at 1: for b > 0 it only shifts A0 by c log b."""

    name = "log"
    formula = "A(D) = A0 + c log(a D + b), b = 1"
    coefficients = ("A0", "c", "a")
    fixed = {"b": 1.0}

    def evaluate(self, D, p):
        A0, c, a = _columns(p, 3)
        return A0 + c * np.log1p(a * np.asarray(D, float))

    def rescaled(self, p, scale):
        A0, c, a = p
        return np.array([A0, c, a / scale])

    def to_free(self, p):
        A0, c, a = p
        return np.array([A0, c, np.log(a)])

    def from_free(self, theta):
        A0, c, t_a = theta
        return np.array([A0, c, _exp(t_a)])

    def starting_points(self, D, A):
        # For fixed a the law is linear in (A0, c).
        points = []
        for a in np.geomspace(1e-3 / D.max(), 1e3 / D.min(), 48):
            A0, c = _linear_fit(A, np.ones_like(D), np.log1p(a * D))
            points.append(np.array([A0, c, a]))
        return points


class SigmoidLaw(Law):
    """a - 1/(1 + b exp(c D + d)). b is fixed at 1: for b > 0 it only shifts d by log b."""

    name = "sigmoid"
    formula = "A(D) = a - 1/(1 + b exp(c D + d)), b = 1"
    coefficients = ("a", "c", "d")
    fixed = {"b": 1.0}

    def evaluate(self, D, p):
        a, c, d = _columns(p, 3)
        return a - _logistic(-(c * np.asarray(D, float) + d))

    def rescaled(self, p, scale):
        a, c, d = p
        return np.array([a, c / scale, d])

    def to_free(self, p):
        return np.asarray(p, float)

    def from_free(self, theta):
        return np.asarray(theta, float)

    def starting_points(self, D, A):
        # For fixed a, log(1/(a - A) - 1) = c D + d is linear; a must keep 0 < a - A < 1.
        points = []
        low, high = A.max(), A.min() + 1.0
        for a in low + (high - low) * np.geomspace(1e-4, 0.999, 48):
            c, d = _linear_fit(np.log(1.0 / (a - A) - 1.0), D, np.ones_like(D))
            points.append(np.array([a, c, d]))
        return points


LAWS: dict[str, Law] = {law.name: law for law in (ReluLaw(), SiluLaw(), LogLaw(), SigmoidLaw())}
SPARSITY_LAWS = ("relu", "silu")
ALTERNATIVES = ("log", "sigmoid")

# Activation functions whose ratio follows each law; anything else is decided by the trend.
_LAW_OF_ACTIVATION = {"relu": "relu", "silu": "silu", "swiglu": "silu", "swish": "silu"}


def law_for_activation(activation: str | None) -> SparsityLaw | None:
    """The paper's law for a known activation function, else None."""
    name = _LAW_OF_ACTIVATION.get((activation or "").lower())
    return LAWS[name] if name else None


def law_for_trend(D, A) -> SparsityLaw:
    """ReLU's law for data that fall with ln D, SiLU's for data that rise."""
    slope = np.polyfit(np.log(D), A, 1)[0]
    return LAWS["silu"] if slope > 0 else LAWS["relu"]
