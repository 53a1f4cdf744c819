"""Sparsing-law fitting: activation ratio against training data, its fits and predictions.

Curves come from a curve source ({name: Curve}); `fit_curves` fits each model's law with
bootstrap intervals; `predict_tokens` inverts a fitted law for a target activation ratio;
`trends` summarises fits across width-depth ratio, scale and convergence speed; `tables`
lays fits and predictions out as text.
"""

from .curvefit import DEFAULT_WINDOW, CurveFit, Window, fit_curve, fit_curves
from .errors import LawError
from .fitted import FittedLaw, read_fit_file
from .forms import LAWS, TOKENS_PER_UNIT
from .io import Curve, CurveSource, file_source, read_curves
from .predict import Prediction, predict_tokens
from .presets import PRESETS

__all__ = [
    "DEFAULT_WINDOW", "LAWS", "PRESETS", "TOKENS_PER_UNIT", "Curve", "CurveFit", "CurveSource",
    "FittedLaw", "LawError", "Prediction", "Window", "file_source", "fit_curve", "fit_curves",
    "predict_tokens", "read_curves", "read_fit_file",
]
