"""Figures of fits and analyses, rendered off-screen (matplotlib's Figure, no pyplot state)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .trends import Convergence, ScaleTrend, WidthDepthAnalysis
from .curvefit import CurveFit
from .forms import ALTERNATIVES, TOKENS_PER_UNIT

LAW_COLOUR, DATA_COLOUR = "tab:blue", "black"
ALTERNATIVE_COLOURS = {"log": "tab:orange", "sigmoid": "tab:green"}


def law_band(result: CurveFit, grid):
    """Pointwise bootstrap percentile band of the law on grid."""
    fitted = result.fitted
    curves = fitted.law.evaluate(grid, fitted.samples)
    tail = 50.0 * (1.0 - fitted.level)
    with np.errstate(invalid="ignore"):
        curves = np.where(np.isfinite(curves), curves, np.nan)
        return np.nanpercentile(curves, [tail, 100 - tail], axis=0)


def fit_figure(result: CurveFit) -> Figure:
    """Data with the law, its bootstrap band and the alternatives; residuals; linearised law."""
    curve, fit = result.curve, result.fit
    law, params = fit.law, fit.params
    D_all = curve.tokens / TOKENS_PER_UNIT
    grid = np.geomspace(fit.D.min(), fit.D.max(), 300)
    figure = Figure(figsize=(11, 8), layout="constrained")
    top, left, right = figure.subplot_mosaic([["fit", "fit"], ["residuals", "linear"]],
                                             height_ratios=[1.3, 1]).values()

    low, high = law_band(result, grid)
    top.fill_between(grid, low, high, color=LAW_COLOUR, alpha=0.2,
                     label=f"{result.fitted.level:.0%} bootstrap band")
    top.plot(grid, law.evaluate(grid, params), color=LAW_COLOUR, lw=2,
             label=f"{law.name} law: {law.formula}")
    for name in ALTERNATIVES:
        alternative = result.alternatives[name]
        if not isinstance(alternative, str):
            top.plot(grid, alternative.law.evaluate(grid, alternative.params), ls="--", lw=1,
                     color=ALTERNATIVE_COLOURS[name], label=f"{name}: {alternative.law.formula}")
    top.axhline(result.fitted.coefficient("A0"), color=LAW_COLOUR, ls=":", lw=1,
                label=f"limit A0 = {result.fitted.coefficient('A0'):.4g}")
    dropped = slice(0, result.first_kept)
    top.plot(D_all[dropped], curve.activation_ratio[dropped], "o", mfc="none", color="grey",
             label=f"dropped (warm-up): {result.first_kept}")
    top.plot(fit.D, fit.A, "o", ms=4, color=DATA_COLOUR, label=f"fitted points: {len(fit.D)}")
    identified = result.fitted.A0_identified
    top.set(xlabel="training data D (1e9 tokens)", ylabel="activation ratio A")
    top.set_title(f"{curve.name}: {law.name} law, MAE {fit.mae:.2e}"
                  + ("" if identified else " (A0 not identified)"), color="black" if identified else "red")
    top.legend(fontsize=8)

    left.axhline(0, color="grey", lw=1)
    left.plot(fit.D, fit.residuals, "o-", ms=4, lw=0.8, color=LAW_COLOUR)
    left.set(xlabel="training data D (1e9 tokens)", ylabel="residual A - law",
             title="residuals of the law")

    x, y, x_label, y_label, slope, intercept = law.linearised(fit.D, fit.A, params)
    shown = np.isfinite(x) & np.isfinite(y)
    right.plot(x[shown], y[shown], "o", ms=4, color=DATA_COLOUR, label="data")
    line_x = np.linspace(x[shown].min(), x[shown].max(), 50) if shown.any() else x
    right.plot(line_x, slope * line_x + intercept, color=LAW_COLOUR, label="law (a straight line)")
    hidden = int((~shown).sum())
    hidden_note = f" ({hidden} points past the limit not shown)" if hidden else ""
    right.set(xlabel=x_label, ylabel=y_label, title="linearised view" + hidden_note)
    right.legend(fontsize=8)
    return figure


def width_depth_figure(analysis: WidthDepthAnalysis) -> Figure:
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    errors = np.abs(np.array(analysis.limit_cis).T - analysis.limits)
    axes.errorbar(analysis.ratios, analysis.limits, yerr=errors, fmt="o", color=LAW_COLOUR,
                  capsize=3, label="limit activation ratio A0 (bootstrap CI)")
    grid = np.linspace(analysis.ratios.min(), analysis.ratios.max(), 300)
    bottleneck = analysis.bottleneck
    axes.plot(grid, bottleneck.evaluate(grid), color=LAW_COLOUR, lw=1.5, label="piecewise-linear fit")
    axes.axvline(bottleneck.x, color="red", ls="--", lw=1, label=f"bottleneck {bottleneck.x:.3g}")
    axes.axvspan(*analysis.bottleneck_ci, color="red", alpha=0.1, label="bottleneck CI")
    if analysis.best_loss_interval:
        axes.axvspan(*analysis.best_loss_interval, color="green", alpha=0.1,
                     label="lowest training loss")
        loss_axes = axes.twinx()
        loss_axes.plot(analysis.ratios, analysis.losses, "s--", color="green", ms=4, lw=1)
        loss_axes.set_ylabel("final training loss", color="green")
    axes.set(xlabel="width-depth ratio (hidden size / layers)", ylabel="limit activation ratio A0",
             title="Limit activation ratio against width-depth ratio")
    axes.legend(fontsize=8, loc="best")
    return figure


def scale_figure(trends: list[ScaleTrend]) -> Figure:
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots(1, len(trends), squeeze=False)[0]
    for trend, ax in zip(trends, axes):
        errors = np.abs(np.array(trend.limit_cis).T - trend.limits)
        ax.errorbar(trend.params, trend.limits, yerr=errors, fmt="o-", capsize=3, color=LAW_COLOUR)
        for name, x, y in zip(trend.names, trend.params, trend.limits):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if trend.excluded:
            ax.text(0.02, 0.02, "left out (A0 not identified): " + ", ".join(trend.excluded),
                    transform=ax.transAxes, fontsize=7, color="red")
        slope = "" if trend.slope is None else f"\nslope {trend.slope:+.2e} per 10x params"
        ax.set(xscale="log", xlabel="parameters (non-embedding)", ylabel="limit activation ratio A0",
               title=f"{trend.law} models{slope}")
    figure.suptitle("Limit activation ratio against parameter scale")
    return figure


def convergence_figure(convergence: list[Convergence], laws) -> Figure:
    """|dA/d(D/N)| over the data-to-parameter range of each model's fitted data."""
    laws = {fitted.name: fitted for fitted in laws}
    groups = sorted({c.law for c in convergence})
    figure = Figure(figsize=(6 * len(groups), 5), layout="constrained")
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for group, ax in zip(groups, axes):
        for item in (c for c in convergence if c.law == group):
            fitted = laws[item.name]
            scale = fitted.model_params / TOKENS_PER_UNIT
            ratio = np.geomspace(*item.observed, 200)
            slope = np.abs(fitted.law.derivative(ratio * scale, fitted.params) * scale)
            ax.plot(ratio, slope, label=item.name)
        ax.set(xscale="log", yscale="log", xlabel="data-to-parameter ratio D / N (tokens per parameter)",
               ylabel="|dA / d(D/N)|", title=f"{group} models: how fast the activation ratio settles")
        ax.legend(fontsize=8)
    return figure
