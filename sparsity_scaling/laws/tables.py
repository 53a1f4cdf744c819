"""Plain-text tables of fits and predictions, laid out like the paper's appendix table."""

from __future__ import annotations

from ..formatting import interval, sci, table
from .curvefit import CurveFit
from .forms import ALTERNATIVES
from .predict import Prediction
from .trends import Convergence, ScaleTrend, WidthDepthAnalysis


def coefficient_table(fits: dict[str, CurveFit]) -> str:
    """model | alpha | b | c | A0, as in the paper (SiLU has no b)."""
    rows = []
    for name, result in fits.items():
        coefficients = result.fit.law.as_dict(result.fit.params)
        rows.append([name] + [sci(coefficients.get(c)) for c in ("alpha", "b", "c", "A0")])
    return table(["model", "alpha", "b", "c", "A0"], rows)


def interval_table(fits: dict[str, CurveFit]) -> str:
    """Bootstrap intervals of each coefficient, with the points the window kept."""
    rows = []
    for name, result in fits.items():
        fitted = result.fitted
        cells = [interval(*fitted.coefficient_interval(c)) if c in fitted.law.coefficients else "-"
                 for c in ("alpha", "b", "c", "A0")]
        rows.append([name, result.fit.law.name, *cells,
                     f"{len(result.fit.D)} (dropped first {result.first_kept})"])
    level = next(iter(fits.values())).fitted.level if fits else 0.95
    return table(["model", "law", f"alpha {level:.0%} CI", "b CI", "c CI", "A0 CI", "points"], rows)


def quality_table(fits: dict[str, CurveFit]) -> str:
    """MAE, MSE, AIC and BIC of the law and of each alternative on the same points."""
    rows = []
    for name, result in fits.items():
        candidates = [(result.fit.law.name + " (law)", result.fit)]
        candidates += [(alt, result.alternatives[alt]) for alt in ALTERNATIVES]
        if result.published is not None:
            rows.append([name, "published", sci(result.published["mae"]),
                         sci(result.published["mse"]), "-", "-", "-"])
        for label, fit in candidates:
            if isinstance(fit, str):
                rows.append([name, label, "-", "-", "-", "-", fit])
            else:
                rows.append([name, label, sci(fit.mae), sci(fit.mse), f"{fit.aic:.1f}",
                             f"{fit.bic:.1f}", f"{fit.aic - result.fit.aic:+.1f}"])
    return table(["model", "fit", "MAE", "MSE", "AIC", "BIC", "dAIC"], rows)


def warning_lines(fits: dict[str, CurveFit]) -> str:
    return "\n".join(f"{name}: {w}" for name, result in fits.items() for w in result.warnings)


def prediction_table(predictions: list[Prediction]) -> str:
    rows = []
    for p in predictions:
        notes = []
        if not p.reachable:
            notes.append(f"limit A0 = {p.limit:.4g} {interval(*p.limit_ci)}")
        if p.extrapolated:
            notes.append("extrapolated (beyond twice the observed data)")
        if not p.A0_identified:
            notes.append("A0 not identified: unreliable")
        per_param = "-" if p.tokens_per_param is None else f"{p.tokens_per_param:.1f}"
        rows.append([p.name, p.form, p.crossing, sci(p.tokens) if p.reachable else "unreachable",
                     interval(*p.ci), f"{p.unreachable_share:.1%}", per_param, "; ".join(notes)])
    level = predictions[0].level if predictions else 0.95
    headers = ["model", "law", "ratio", "tokens", f"{level:.0%} interval", "unreachable",
               "tokens/params", "note"]
    return table(headers, rows) + ("\n(interval: bootstrap percentiles; unreachable: share of "
                                   "bootstrap fits that never reach the target)")


def width_depth_report(result: WidthDepthAnalysis) -> tuple[str, dict]:
    rows = [[name, f"{ratio:.4g}", sci(limit), interval(*ci), "-" if loss is None else f"{loss:.4f}"]
            for name, ratio, limit, ci, loss in zip(result.names, result.ratios, result.limits,
                                                     result.limit_cis, result.losses)]
    b = result.bottleneck
    best = result.best_loss_interval
    lines = [
        "Limit activation ratio against width-depth ratio",
        table(["model", "width/depth", "A0", "A0 CI", "final loss"], rows),
        f"bottleneck at width-depth ratio {b.x:.4g} {interval(*result.bottleneck_ci)}: "
        f"A0 slope {b.slope_below:+.3g} per unit below it, {b.slope_above:+.3g} above; "
        f"A0 there {b.level:.4g}",
        "lowest training loss at width-depth ratios "
        + ("unknown (no final losses)" if best is None else f"{best[0]:.4g} to {best[1]:.4g}"),
    ]
    if result.excluded:
        lines.append(f"left out (A0 not identified): {', '.join(result.excluded)}")
    data = {
        "models": {name: {"width_depth_ratio": r, "A0": a, "A0_ci": list(ci), "final_loss": loss}
                   for name, r, a, ci, loss in zip(result.names, result.ratios, result.limits,
                                                    result.limit_cis, result.losses)},
        "bottleneck": b.x, "bottleneck_ci": list(result.bottleneck_ci), "level_at_bottleneck": b.level,
        "slope_below": b.slope_below, "slope_above": b.slope_above,
        "best_loss_interval": None if best is None else list(best),
        "excluded": result.excluded,
    }
    return "\n".join(lines), data


def scale_report(trends: list[ScaleTrend]) -> tuple[str, dict]:
    rows, data = [], {}
    for trend in trends:
        for name, params, limit, ci in zip(trend.names, trend.params, trend.limits, trend.limit_cis):
            rows.append([name, trend.law, sci(params), sci(limit), interval(*ci)])
        data[trend.law] = {
            "models": {name: {"params": p, "A0": a, "A0_ci": list(ci)} for name, p, a, ci
                       in zip(trend.names, trend.params, trend.limits, trend.limit_cis)},
            "slope_per_decade": trend.slope,
            "slope_ci": None if trend.slope_ci is None else list(trend.slope_ci),
            "excluded": trend.excluded,
        }
    lines = ["Limit activation ratio against parameter scale",
             table(["model", "law", "params", "A0", "A0 CI"], rows)]
    for trend in trends:
        if trend.slope is not None:
            lines.append(f"{trend.law}: A0 changes by {trend.slope:+.3g} {interval(*trend.slope_ci)} "
                         "per tenfold parameters")
        if trend.excluded:
            lines.append(f"{trend.law}: left out (A0 not identified): {', '.join(trend.excluded)}")
    return "\n".join(lines), data


def convergence_report(convergence: list[Convergence]) -> tuple[str, dict]:
    ratios = convergence[0].ratios
    rows = [[c.name, f"{c.observed[0]:.3g}-{c.observed[1]:.3g}"]
            + [sci(d) + ("" if c.observed[0] <= r <= c.observed[1] else "*")
               for r, d in zip(c.ratios, c.derivatives)]
            for c in convergence]
    lines = ["dA/d(D/N): change of activation ratio per unit data-to-parameter ratio "
             "(* outside the fitted data)",
             table(["model", "fitted D/N"] + [f"D/N={r:g}" for r in ratios], rows)]
    data = {c.name: {"fitted_ratio_range": list(c.observed),
                     "derivatives": dict(zip(map(str, c.ratios.tolist()), c.derivatives.tolist()))}
            for c in convergence}
    return "\n".join(lines), data
