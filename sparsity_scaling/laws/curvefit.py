"""Fitting one model's curve end to end, with the checks that keep a bad fit from passing.

Steps: drop the warm-up checkpoints (a stated window), choose the law by activation (or by
the data's trend), fit it, bootstrap it, fit the alternatives on the same points, and turn
every sign of an unidentified law into a warning or, where nothing sensible can be
reported, a `LawError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import LawError
from .fit import LawFit, bootstrap, fit_law
from .fitted import FittedLaw
from .forms import ALTERNATIVES, LAWS, TOKENS_PER_UNIT, law_for_activation, law_for_trend
from .io import Curve
from .presets import PresetModel

N_BOOTSTRAP = 1000
LEVEL = 0.95
MIN_R2 = 0.5  # below this share of explained variance the law is not identified
ALPHA_RANGE = (1e-3, 10.0)  # outside it the exponent has collapsed (power law or step)
BOUND_TOLERANCE = 1e-6  # A0 this close to 0 or 1 sits at its bound
# Rounding the paper's coefficients to three digits raises their MSE by at most ~30% on its
# own data; a larger excess means they are not a least-squares optimum of those points.
PUBLISHED_MSE_RATIO = 1.5


@dataclass(frozen=True)
class Window:
    """Which early (warm-up) checkpoints a fit drops: set exactly one rule.

    drop_first: the first K checkpoints; min_tokens: those before D raw tokens;
    min_fraction: those before this fraction of the run's last token count.
    """

    drop_first: int | None = None
    min_tokens: float | None = None
    min_fraction: float | None = None
    label: str = ""  # where the rule comes from, for messages (e.g. a preset)

    def __post_init__(self):
        rules = [v for v in (self.drop_first, self.min_tokens, self.min_fraction) if v is not None]
        if len(rules) != 1:
            raise LawError("a window needs exactly one of drop_first, min_tokens, min_fraction")
        if self.drop_first is not None and self.drop_first < 0:
            raise LawError(f"drop_first must be >= 0, not {self.drop_first}")
        if self.min_tokens is not None and self.min_tokens < 0:
            raise LawError(f"min_tokens must be >= 0, not {self.min_tokens:g}")
        if self.min_fraction is not None and not 0 <= self.min_fraction < 1:
            raise LawError(f"min_fraction must lie in [0, 1), not {self.min_fraction:g}")

    def first_kept(self, tokens) -> int:
        """Index of the first checkpoint kept (tokens sorted ascending)."""
        if self.drop_first is not None:
            return min(self.drop_first, len(tokens))
        threshold = self.min_tokens if self.min_tokens is not None else self.min_fraction * tokens[-1]
        return int(np.searchsorted(tokens, threshold, side="left"))

    def describe(self) -> str:
        if self.drop_first is not None:
            text = f"drop the first {self.drop_first} checkpoints"
        elif self.min_tokens is not None:
            text = f"drop checkpoints before {self.min_tokens:.3g} tokens"
        else:
            text = f"drop checkpoints before {self.min_fraction:.0%} of the run's last token count"
        return f"{text} ({self.label})" if self.label else text


DEFAULT_WINDOW = Window(min_fraction=0.1, label="default")


@dataclass(frozen=True)
class CurveFit:
    """Everything fitted for one curve: the law, its bootstrap, alternatives and warnings."""

    curve: Curve
    window: Window
    first_kept: int
    fit: LawFit
    fitted: FittedLaw
    form_source: str  # "activation" or "trend"
    bootstrap_failed: int
    alternatives: dict[str, LawFit | str]  # a string says why the alternative failed
    published: dict | None = None  # published coefficients with their MAE/MSE on these points
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        stored = self.fitted.to_json()
        samples = stored.pop("bootstrap")
        return {
            **stored,
            "form_source": self.form_source,
            "activation": self.curve.activation,
            "mae": self.fit.mae, "mse": self.fit.mse, "aic": self.fit.aic, "bic": self.fit.bic,
            "points_used": len(self.fit.D),
            "points_dropped": self.first_kept,
            "window": self.window.describe(),
            "warnings": self.warnings,
            "alternatives": {name: _quality_json(alt) for name, alt in self.alternatives.items()},
            "published": self.published,
            "bootstrap": {**samples, "failed": self.bootstrap_failed},
        }


def _quality_json(fit: LawFit | str) -> dict:
    if isinstance(fit, str):
        return {"error": fit}
    return {"formula": fit.law.formula, "coefficients": fit.law.as_dict(fit.params),
            "mae": fit.mae, "mse": fit.mse, "aic": fit.aic, "bic": fit.bic}


def _r_squared(fit: LawFit) -> float:
    total = np.sum((fit.A - fit.A.mean()) ** 2)
    return float(1.0 - fit.sse / total)


def unidentified_A0_reasons(fitted: FittedLaw) -> list[str]:
    """Why the data do not pin down the limit A0, if they do not."""
    A0, alpha = fitted.coefficient("A0"), fitted.coefficient("alpha")
    low, high = fitted.coefficient_interval("A0")
    reasons = []
    if not BOUND_TOLERANCE < A0 < 1 - BOUND_TOLERANCE:
        reasons.append(f"A0 = {A0:.3g} sits at its bound {0 if A0 < 0.5 else 1}")
    if alpha < ALPHA_RANGE[0]:
        reasons.append(f"the exponent alpha = {alpha:.3g} collapsed towards 0 (a power law)")
    elif alpha > ALPHA_RANGE[1]:
        reasons.append(f"the exponent alpha = {alpha:.3g} exceeds {ALPHA_RANGE[1]:g} (a step)")
    if not (BOUND_TOLERANCE < low and high < 1 - BOUND_TOLERANCE):
        reasons.append(f"its {fitted.level:.0%} interval [{low:.3g}, {high:.3g}] is open "
                       "(reaches a bound)")
    return reasons


def compare_published(fit: LawFit, published: dict[str, float]) -> tuple[dict | None, str | None]:
    """The published coefficients with their errors on the fitted points, and a warning if
    they are clearly not a least-squares optimum of them (or are another law's)."""
    if set(published) != set(fit.law.coefficients):
        return None, (f"published coefficients {sorted(published)} are not the "
                      f"{fit.law.name} law's: not compared")
    params = np.array([published[name] for name in fit.law.coefficients])
    residuals = fit.A - fit.law.evaluate(fit.D, params)
    mae, mse = float(np.mean(np.abs(residuals))), float(np.mean(residuals**2))
    warning = None
    if mse > PUBLISHED_MSE_RATIO * fit.mse:
        warning = (f"published coefficients are not a least-squares optimum: MSE {mse:.3g} vs "
                   f"{fit.mse:.3g} of this fit on the same {len(fit.D)} points "
                   f"(MAE {mae:.3g} vs {fit.mae:.3g})")
    return {**published, "mae": mae, "mse": mse}, warning


def _fit_alternative(name, D, A) -> LawFit | str:
    try:
        return fit_law(LAWS[name], D, A)
    except LawError as error:
        return str(error)


def _fit_identifiable(curve: Curve, window: Window, D, A) -> tuple[LawFit, str]:
    """The curve's law fitted to the kept points, or LawError if they cannot identify it."""
    if len(D) < 2:
        raise LawError(f"{len(D)} checkpoint(s) left after the window ({window.describe()}); "
                       "a law needs several")
    law, form_source = law_for_activation(curve.activation), "activation"
    if law is None:
        law, form_source = law_for_trend(D, A), "trend"
    needed = law.n_free + 2
    if len(D) < needed:
        raise LawError(f"{len(D)} checkpoints left after the window ({window.describe()}); "
                       f"the {law.name} law has {law.n_free} coefficients and needs at least {needed}")
    if np.ptp(A) <= 1e-12:
        raise LawError(f"the activation ratio is constant ({A[0]:.6g}) over the fitted checkpoints: "
                       "there is no trend to fit a law to")
    fit = fit_law(law, D, A)
    r2 = _r_squared(fit)
    if r2 < MIN_R2:
        direction = "rising" if law.increasing else "falling"
        raise LawError(f"the {law.name} law ({direction} ratio) explains only {max(r2, 0):.0%} of "
                       "the variance: the data are too flat or noisy, or trend the other way, "
                       "to identify it")
    return fit, form_source


def fit_curve(curve: Curve, window: Window = DEFAULT_WINDOW, published: dict | None = None,
              n_bootstrap: int = N_BOOTSTRAP, level: float = LEVEL, seed: int = 0) -> CurveFit:
    """Fit the curve's sparsity law; LawError (naming the model) when it cannot be identified."""
    if n_bootstrap < 1 or not 0 < level < 1:
        raise LawError(f"need at least one bootstrap sample and a level in (0, 1), not "
                       f"{n_bootstrap} and {level:g}")
    first = window.first_kept(curve.tokens)
    D, A = curve.tokens[first:] / TOKENS_PER_UNIT, curve.activation_ratio[first:]
    try:
        fit, form_source = _fit_identifiable(curve, window, D, A)
    except LawError as error:
        raise LawError(f"{curve.name}: {error}") from None
    resampled = bootstrap(fit, n_bootstrap, seed)
    if len(resampled.samples) == 0:
        raise LawError(f"{curve.name}: none of the {n_bootstrap} bootstrap refits converged")
    fitted = FittedLaw(curve.name, fit.law, fit.params, resampled.samples, level, float(D.min()),
                       float(D.max()), curve.params, curve.width_depth_ratio,
                       None if curve.loss is None else float(curve.loss[-1]))
    reasons = unidentified_A0_reasons(fitted)
    fitted = replace(fitted, A0_identified=not reasons)
    warnings = ["A0 not identified: " + "; ".join(reasons)] if reasons else []
    if fitted.coefficient("alpha") >= ALPHA_RANGE[0] > fitted.coefficient_interval("alpha")[0]:
        warnings.append(f"alpha's {level:.0%} interval reaches the power-law limit alpha -> 0, "
                        "so b and c are poorly determined")
    if resampled.failed:
        warnings.append(f"{resampled.failed} of {n_bootstrap} bootstrap refits did not converge; "
                        "intervals use the rest")
    published_errors = None
    if published is not None:
        published_errors, warning = compare_published(fit, published)
        warnings += [warning] if warning else []
    alternatives = {alt: _fit_alternative(alt, D, A) for alt in ALTERNATIVES}
    return CurveFit(curve, window, first, fit, fitted, form_source, resampled.failed,
                    alternatives, published_errors, warnings)


def fit_curves(curves: dict[str, Curve], window: Window = DEFAULT_WINDOW,
               preset: dict[str, PresetModel] | None = None, **options) -> dict[str, CurveFit]:
    """Fit every curve; a preset's models use its window and are compared with its coefficients."""
    fits = {}
    for name, curve in curves.items():
        model = (preset or {}).get(name.lower())
        if model is None:
            fits[name] = fit_curve(curve, window, **options)
        else:
            fits[name] = fit_curve(curve, Window(drop_first=model.drop_first, label="preset"),
                                   model.published, **options)
    return fits
