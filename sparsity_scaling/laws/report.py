"""Plain-text tables of fits and predictions, laid out like the paper's appendix table."""

from __future__ import annotations

import math

from .curvefit import CurveFit
from .forms import ALTERNATIVES
from .predict import Prediction


def sci(value, digits: int = 3) -> str:
    """The paper's number style, 1.01e-1; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def interval(low, high) -> str:
    return f"[{sci(low)}, {sci(high)}]"


def table(headers, rows) -> str:
    """Left-aligned columns separated by two spaces."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


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
        if p.reachable:
            note = "extrapolated (beyond twice the observed data)" if p.extrapolated else ""
            tokens = sci(p.tokens)
        else:
            tokens = "unreachable"
            note = f"limit A0 = {p.limit:.4g} {interval(*p.limit_ci)}"
        ratio = "-" if p.tokens_per_param is None else f"{p.tokens_per_param:.1f}"
        rows.append([p.name, p.form, p.crossing, tokens, interval(*p.ci),
                     f"{p.unreachable_share:.1%}", ratio, note])
    level_note = "interval: bootstrap percentile"
    headers = ["model", "law", "ratio", "tokens", "interval", "unreachable", "tokens/params", "note"]
    return table(headers, rows) + f"\n({level_note}; 'unreachable' = share of bootstrap fits that never reach the target)"
