"""A fitted sparsity law as stored in a fit file: coefficients, bootstrap, model facts.

Predictions and analyses read only this, so they work from a fit file without the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LawError
from .forms import LAWS, SPARSITY_LAWS, TOKENS_PER_UNIT, SparsityLaw
from .io import read_json


@dataclass(frozen=True)
class FittedLaw:
    """One model's law with its bootstrap samples (rows of coefficient vectors)."""

    name: str
    law: SparsityLaw
    params: np.ndarray
    samples: np.ndarray
    level: float  # coverage of the percentile intervals
    min_D: float  # the fitted data's range, in units of 1e9 tokens
    max_D: float
    model_params: float | None = None
    width_depth_ratio: float | None = None
    final_loss: float | None = None
    A0_identified: bool = True

    def coefficient(self, name: str) -> float:
        return float(self.params[self.law.coefficients.index(name)])

    def interval(self, values) -> tuple[float, float]:
        """Percentile interval of per-sample values; an end may be inf (an open interval)."""
        values = np.asarray(values, float)
        if values.size == 0:
            return (float("nan"), float("nan"))
        tail = (1.0 - self.level) / 2
        # Order statistics, not interpolation: an infinite sample must not turn into nan.
        low, high = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf")
        return float(low), float(high)

    def coefficient_interval(self, name: str) -> tuple[float, float]:
        return self.interval(self.samples[:, self.law.coefficients.index(name)])

    def to_json(self) -> dict:
        coefficients = {"alpha": None, "b": None, "c": None, "A0": None}
        coefficients.update(self.law.as_dict(self.params))
        return {
            "form": self.law.name,
            "formula": self.law.formula,
            **coefficients,
            "ci": {name: list(self.coefficient_interval(name)) for name in self.law.coefficients},
            "level": self.level,
            "tokens_fitted": [self.min_D * TOKENS_PER_UNIT, self.max_D * TOKENS_PER_UNIT],
            "params": self.model_params,
            "width_depth_ratio": self.width_depth_ratio,
            "final_loss": self.final_loss,
            "A0_identified": self.A0_identified,
            "bootstrap": {"coefficients": list(self.law.coefficients),
                          "samples": self.samples.tolist()},
        }

    @classmethod
    def from_json(cls, name: str, entry: dict, source="fit file") -> "FittedLaw":
        where = f"{source}: model {name!r}"
        if not isinstance(entry, dict):
            raise LawError(f"{where}: expected an object")
        if entry.get("form") not in SPARSITY_LAWS:
            raise LawError(f"{where}: 'form' must be one of {', '.join(SPARSITY_LAWS)}, "
                           f"not {entry.get('form')!r}")
        law = LAWS[entry["form"]]
        try:
            params = np.array([float(entry[c]) for c in law.coefficients])
            samples = np.array(entry["bootstrap"]["samples"], float).reshape(-1, law.n_free)
            first, last = (float(t) / TOKENS_PER_UNIT for t in entry["tokens_fitted"])
            return cls(name, law, params, samples, float(entry["level"]), first, last,
                       entry.get("params"), entry.get("width_depth_ratio"), entry.get("final_loss"),
                       bool(entry.get("A0_identified", True)))
        except KeyError as error:
            raise LawError(f"{where}: missing field {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            raise LawError(f"{where}: malformed field ({error})") from None


def read_fit_file(path) -> dict[str, FittedLaw]:
    """The fitted laws of a fit file written by tools/fit_laws.py."""
    path = Path(path)
    data = read_json(path)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise LawError(f"{path}: expected an object with a non-empty 'models' object")
    return {name: FittedLaw.from_json(name, entry, source=str(path)) for name, entry in models.items()}
