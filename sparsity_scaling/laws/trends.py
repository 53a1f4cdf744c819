"""Analyses across fitted models: width-depth ratio, parameter scale and convergence speed.

Each works from fitted laws alone (a fit file) and carries the bootstrap through: every
bootstrap draw of the limits A0 gives one refit of the across-model summary, whose spread
is the summary's interval. Models whose A0 is not identified are left out of the A0
analyses (and listed), since their A0 is an artefact of a bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from .errors import LawError
from .fitted import FittedLaw
from .forms import TOKENS_PER_UNIT

MIN_WIDTH_DEPTH_MODELS = 4  # a two-segment line has three coefficients
LOSS_TOLERANCE = 0.005  # final losses within 0.5% of the lowest count as "best"
DEFAULT_RATIOS = (1, 2, 5, 10, 20, 50, 100, 200)  # data-to-parameter ratios (tokens / params)


@dataclass(frozen=True)
class Breakpoint:
    """Continuous two-segment line: level + slope_below (x - x) below the breakpoint x,
    level + slope_above (x - x) above it."""

    x: float
    level: float
    slope_below: float
    slope_above: float

    def evaluate(self, x):
        offset = np.asarray(x, float) - self.x
        below, above = np.minimum(offset, 0), np.maximum(offset, 0)
        return self.level + self.slope_below * below + self.slope_above * above


def _breakpoint_grid(x):
    """Candidate breakpoints between the second and the second-last x, so that each segment
    rests on at least two points."""
    if len(x) < MIN_WIDTH_DEPTH_MODELS:
        raise LawError(f"a piecewise-linear fit needs at least {MIN_WIDTH_DEPTH_MODELS} points, "
                       f"not {len(x)}")
    xs = np.sort(x)
    return np.unique(np.concatenate([np.linspace(xs[1], xs[-2], 400), xs[1:-1]]))


def _segments(x, Y, x_b):
    """Least-squares two-segment lines through every column of Y: (coefficients, sse)."""
    offset = x - x_b
    design = np.column_stack([np.ones_like(x), np.minimum(offset, 0), np.maximum(offset, 0)])
    beta, *_ = np.linalg.lstsq(design, Y, rcond=None)
    return beta, np.sum((design @ beta - Y) ** 2, axis=0)


def piecewise_linear_fit(x, y) -> Breakpoint:
    """Least-squares continuous two-segment line: grid search, then a bounded refinement."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    grid = _breakpoint_grid(x)
    i = int(np.argmin([_segments(x, y, x_b)[1] for x_b in grid]))
    low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    x_b = minimize_scalar(lambda b: _segments(x, y, b)[1], bounds=(low, high), method="bounded",
                          options={"xatol": 1e-9 * max(1.0, abs(high))}).x if high > low else low
    return Breakpoint(float(x_b), *map(float, _segments(x, y, x_b)[0]))


def breakpoints(x, Y) -> np.ndarray:
    """Grid-search breakpoints of many series at once (columns of Y), for bootstrap draws."""
    x = np.asarray(x, float)
    grid = _breakpoint_grid(x)
    sse = np.array([_segments(x, Y, x_b)[1] for x_b in grid])
    return grid[np.argmin(sse, axis=0)]


def _limit_draws(models: list[FittedLaw]) -> np.ndarray:
    """Bootstrap draws of A0 across models: row i takes each model's i-th sample."""
    count = min(len(model.samples) for model in models)
    return np.column_stack([model.law.limit(model.samples[:count]) for model in models])


def _split_identified(models):
    identified = [m for m in models if m.A0_identified]
    return identified, [m.name for m in models if not m.A0_identified]


@dataclass(frozen=True)
class WidthDepthAnalysis:
    names: list[str]
    ratios: np.ndarray
    limits: np.ndarray
    limit_cis: list[tuple[float, float]]
    losses: list[float | None]
    bottleneck: Breakpoint
    bottleneck_ci: tuple[float, float]
    best_loss_interval: tuple[float, float] | None  # width-depth ratios of the lowest losses
    excluded: list[str]  # models whose A0 is not identified


def width_depth_analysis(models: list[FittedLaw],
                         loss_tolerance: float = LOSS_TOLERANCE) -> WidthDepthAnalysis:
    """Limit activation ratio against width-depth ratio with its bottleneck, and the range of
    ratios whose final training loss is within loss_tolerance (relative) of the lowest."""
    models, excluded = _split_identified([m for m in models if m.width_depth_ratio])
    models.sort(key=lambda m: m.width_depth_ratio)
    if len(models) < MIN_WIDTH_DEPTH_MODELS:
        raise LawError(f"width-depth analysis needs at least {MIN_WIDTH_DEPTH_MODELS} models with a "
                       f"width_depth_ratio and an identified A0, found {len(models)}")
    ratios = np.array([m.width_depth_ratio for m in models])
    limits = np.array([m.coefficient("A0") for m in models])
    bottleneck = piecewise_linear_fit(ratios, limits)
    draws = breakpoints(ratios, _limit_draws(models).T)
    losses = [m.final_loss for m in models]
    best = None
    if all(loss is not None for loss in losses):
        near = ratios[np.array(losses) <= min(losses) * (1 + loss_tolerance)]
        best = (float(near.min()), float(near.max()))
    return WidthDepthAnalysis([m.name for m in models], ratios, limits,
                              [m.coefficient_interval("A0") for m in models], losses,
                              bottleneck, models[0].interval(draws), best, excluded)


@dataclass(frozen=True)
class ScaleTrend:
    """Limit activation ratio against parameter count for the models of one law."""

    law: str
    names: list[str]
    params: np.ndarray
    limits: np.ndarray
    limit_cis: list[tuple[float, float]]
    slope: float | None  # change of A0 per tenfold parameters (None: under three sizes)
    slope_ci: tuple[float, float] | None
    excluded: list[str]  # models whose A0 is not identified


def scale_analysis(models: list[FittedLaw]) -> list[ScaleTrend]:
    """A0 against parameter count, per law, with a linear trend in log10(params)."""
    trends = []
    for law_name in sorted({m.law.name for m in models if m.model_params}):
        of_law = [m for m in models if m.model_params and m.law.name == law_name]
        group, excluded = _split_identified(of_law)
        group.sort(key=lambda m: m.model_params)
        params = np.array([m.model_params for m in group], float)
        limits = np.array([m.coefficient("A0") for m in group])
        slope = slope_ci = None
        if len(np.unique(params)) >= 3:
            decades = np.log10(params)
            slope = float(np.polyfit(decades, limits, 1)[0])
            slope_ci = group[0].interval([np.polyfit(decades, row, 1)[0] for row in _limit_draws(group)])
        intervals = [m.coefficient_interval("A0") for m in group]
        trends.append(ScaleTrend(law_name, [m.name for m in group], params, limits, intervals,
                                 slope, slope_ci, excluded))
    if not trends:
        raise LawError("scale analysis needs models with a known parameter count")
    return trends


@dataclass(frozen=True)
class Convergence:
    """dA/d(D/N) of one model at given data-to-parameter ratios."""

    name: str
    law: str
    ratios: np.ndarray
    derivatives: np.ndarray
    observed: tuple[float, float]  # the data-to-parameter ratios its fitted data span


def convergence_analysis(models: list[FittedLaw], ratios=DEFAULT_RATIOS) -> list[Convergence]:
    """How fast each model's activation ratio still moves per unit of data-to-parameter ratio.

    With r = tokens / N: D = r N / 1e9 and dA/dr = A'(D) N / 1e9.
    """
    ratios = np.asarray(ratios, float)
    if ratios.size == 0 or np.any(ratios <= 0):
        raise LawError("data-to-parameter ratios must be positive")
    result = []
    sized = sorted((m for m in models if m.model_params), key=lambda m: (m.law.name, m.model_params))
    for model in sized:
        scale = model.model_params / TOKENS_PER_UNIT  # D per unit of ratio
        derivatives = model.law.derivative(ratios * scale, model.params) * scale
        result.append(Convergence(model.name, model.law.name, ratios, derivatives,
                                  (model.min_D / scale, model.max_D / scale)))
    if not result:
        raise LawError("convergence analysis needs models with a known parameter count")
    return result
