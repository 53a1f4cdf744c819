"""Inverting a fitted law: the tokens a model needs before its activation ratio reaches a target.

ReLU's ratio falls to A0: D* = ((b - ln(T - A0)) / c)^(1/alpha) is where it falls below T,
and a target at or below A0 is never reached. SiLU's ratio rises to A0:
D* = (c / (A0 - T))^(1/alpha) is where it rises above T, and a target at or above A0 is never
crossed. Every bootstrap fit is inverted too, which gives the interval and the share of fits
for which the target is out of reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import LawError
from .fitted import FittedLaw
from .forms import TOKENS_PER_UNIT

EXTRAPOLATION_FACTOR = 2.0  # beyond this multiple of the largest observed D: extrapolation


@dataclass(frozen=True)
class Prediction:
    """Raw token counts (inf: never) for one model and one target."""

    name: str
    form: str
    target: float
    tokens: float
    ci: tuple[float, float]
    limit: float
    limit_ci: tuple[float, float]
    unreachable_share: float
    extrapolated: bool
    tokens_per_param: float | None
    level: float
    A0_identified: bool

    @property
    def reachable(self) -> bool:
        return math.isfinite(self.tokens)

    @property
    def crossing(self) -> str:
        return "rises above" if self.form == "silu" else "falls below"

    def to_json(self) -> dict:
        return {"form": self.form, "tokens": self.tokens, "ci": list(self.ci),
                "reachable": self.reachable, "crossing": self.crossing, "limit": self.limit,
                "limit_ci": list(self.limit_ci), "unreachable_share": self.unreachable_share,
                "extrapolated": self.extrapolated, "tokens_per_param": self.tokens_per_param,
                "level": self.level, "A0_identified": self.A0_identified}


def check_target(target: float) -> float:
    if not (isinstance(target, (int, float)) and 0 < target < 1):
        raise LawError(f"target activation ratio must lie in (0, 1), not {target!r}")
    return float(target)


def predict_tokens(fitted: FittedLaw, target: float) -> Prediction:
    """Tokens until fitted's activation ratio crosses target, with its bootstrap interval."""
    target = check_target(target)
    D = float(fitted.law.inverse(fitted.params, target))
    sample_D = fitted.law.inverse(fitted.samples, target)
    low, high = fitted.interval(sample_D)
    tokens = D * TOKENS_PER_UNIT
    per_param = tokens / fitted.model_params if fitted.model_params and math.isfinite(D) else None
    return Prediction(
        name=fitted.name, form=fitted.law.name, target=target, tokens=tokens,
        ci=(low * TOKENS_PER_UNIT, high * TOKENS_PER_UNIT),
        limit=fitted.coefficient("A0"), limit_ci=fitted.coefficient_interval("A0"),
        unreachable_share=float(np.mean(np.isinf(sample_D))) if sample_D.size else float("nan"),
        extrapolated=math.isfinite(D) and D > EXTRAPOLATION_FACTOR * fitted.max_D,
        tokens_per_param=per_param, level=fitted.level, A0_identified=fitted.A0_identified,
    )
