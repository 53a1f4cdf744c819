"""Activation-ratio curves and where they come from.

A curve source is any function returning {name: Curve}. Files give one now: JSON in the
paper's reference format (one model per file, named by its stem) and CSV (one row per
checkpoint, any number of models). Other sources (an experiment tracker) only need to build
the same `Curve`s.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import LawError
from .presets import activation_from_name, params_from_name


@dataclass(frozen=True)
class Curve:
    """One model's activation ratio at its checkpoints, sorted by raw token count."""

    name: str
    tokens: np.ndarray
    activation_ratio: np.ndarray
    activation: str | None = None
    params: float | None = None  # parameter count (non-embedding), when known
    loss: np.ndarray | None = None  # training loss at each checkpoint, when known
    width_depth_ratio: float | None = None  # hidden size / number of layers, when known

    def __post_init__(self):
        tokens = np.asarray(self.tokens, float)
        ratio = np.asarray(self.activation_ratio, float)
        loss = None if self.loss is None else np.asarray(self.loss, float)
        if tokens.ndim != 1 or ratio.shape != tokens.shape:
            raise LawError(f"tokens ({tokens.size}) and activation ratios ({ratio.size}) "
                           "differ in length")
        if loss is not None and loss.shape != tokens.shape:
            raise LawError(f"loss has {loss.size} values for {tokens.size} checkpoints")
        _check_finite("tokens", tokens)
        _check_finite("activation_ratio", ratio)
        if tokens.size == 0:
            raise LawError("no checkpoints")
        if np.any(tokens <= 0):
            i = int(np.argmax(tokens <= 0))
            raise LawError(f"tokens must be positive: {tokens[i]:g} at checkpoint {i + 1}")
        if np.any((ratio < 0) | (ratio > 1)):
            i = int(np.argmax((ratio < 0) | (ratio > 1)))
            raise LawError(f"activation_ratio must lie in [0, 1]: {ratio[i]:g} at checkpoint {i + 1}")
        order = np.argsort(tokens, kind="stable")
        if np.any(np.diff(tokens[order]) == 0):
            raise LawError("two checkpoints have the same token count")
        for field_name in ("params", "width_depth_ratio"):
            value = getattr(self, field_name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise LawError(f"{field_name} must be a positive number, not {value!r}")
        object.__setattr__(self, "tokens", tokens[order])
        object.__setattr__(self, "activation_ratio", ratio[order])
        object.__setattr__(self, "loss", None if loss is None else loss[order])


def _check_finite(field_name, values):
    if not np.all(np.isfinite(values)):
        i = int(np.argmax(~np.isfinite(values)))
        raise LawError(f"{field_name} must be finite: {values[i]} at checkpoint {i + 1}")


CurveSource = Callable[[], dict[str, Curve]]


def _curve(path, name, tokens, ratio, activation=None, params=None, loss=None, width_depth_ratio=None):
    """A Curve whose validation errors name the file; activation and size fall back on the name."""
    try:
        return Curve(name, tokens, ratio, activation or activation_from_name(name),
                     params if params is not None else params_from_name(name), loss, width_depth_ratio)
    except LawError as error:
        raise LawError(f"{path}: {error}") from None


def _number_list(path, data, field):
    values = data.get(field)
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise LawError(f"{path}: field {field!r} must be a list of numbers")
    return values


def _optional_number(path, data, field):
    value = data.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LawError(f"{path}: field {field!r} must be a number")
    return value


def read_json(path: Path):
    """A JSON file's contents; an unreadable or invalid file is a one-line LawError."""
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise LawError(f"{path}: cannot read: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LawError(f"{path}: not valid JSON ({error})") from None


def read_json_curve(path) -> Curve:
    """A curve in the reference format {"token_passed": [...], "activation_ratio": [...]}.

    Optional fields: activation, params, loss (a list), width_depth_ratio.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise LawError(f"{path}: expected an object with 'token_passed' and 'activation_ratio'")
    for field in ("token_passed", "activation_ratio"):
        if field not in data:
            raise LawError(f"{path}: missing field {field!r}")
    activation = data.get("activation")
    if activation is not None and not isinstance(activation, str):
        raise LawError(f"{path}: field 'activation' must be a string")
    loss = _number_list(path, data, "loss") if data.get("loss") is not None else None
    return _curve(path, path.stem, _number_list(path, data, "token_passed"),
                  _number_list(path, data, "activation_ratio"), activation,
                  _optional_number(path, data, "params"), loss,
                  _optional_number(path, data, "width_depth_ratio"))


CSV_COLUMNS = ("model", "tokens", "activation_ratio")
_CSV_PER_MODEL = ("activation", "params", "width_depth_ratio")


def _csv_number(path, line, column, text):
    try:
        return float(text)
    except ValueError:
        raise LawError(f"{path}: line {line}: column {column!r}: not a number: {text!r}") from None


def read_csv_curves(path) -> dict[str, Curve]:
    """Curves from a CSV with columns model, tokens, activation_ratio, one row per checkpoint.

    Optional columns: activation, params, width_depth_ratio (one value per model) and loss.
    """
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise LawError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = [(line, row) for line, row in enumerate(reader, start=2)]
    except OSError as error:
        raise LawError(f"{path}: cannot read: {error.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise LawError(f"{path}: not a valid CSV file ({error})") from None
    models: dict[str, dict] = {}
    for line, row in rows:
        name = (row["model"] or "").strip()
        if not name:
            raise LawError(f"{path}: line {line}: empty model name")
        model = models.setdefault(name, {"tokens": [], "ratio": [], "loss": []})
        model["tokens"].append(_csv_number(path, line, "tokens", row["tokens"]))
        model["ratio"].append(_csv_number(path, line, "activation_ratio", row["activation_ratio"]))
        if (row.get("loss") or "").strip():
            model["loss"].append(_csv_number(path, line, "loss", row["loss"]))
        for column in _CSV_PER_MODEL:
            text = (row.get(column) or "").strip()
            if not text:
                continue
            value = text if column == "activation" else _csv_number(path, line, column, text)
            if model.setdefault(column, value) != value:
                raise LawError(f"{path}: line {line}: model {name!r} has two values of {column!r}")
    curves = {}
    for name, model in models.items():
        loss = model["loss"]
        if loss and len(loss) != len(model["tokens"]):
            raise LawError(f"{path}: model {name!r}: loss is given for some checkpoints only")
        curves[name] = _curve(f"{path}: model {name!r}", name, model["tokens"], model["ratio"],
                              model.get("activation"), model.get("params"), loss or None,
                              model.get("width_depth_ratio"))
    return curves


def read_curves(paths) -> dict[str, Curve]:
    """Curves from JSON and CSV files and from directories of them; names must be unique."""
    curves: dict[str, Curve] = {}
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".csv"))
            if not files:
                raise LawError(f"{path}: no .json or .csv files in this directory")
        elif path.exists():
            files = [path]
        else:
            raise LawError(f"{path}: no such file or directory")
        for file in files:
            suffix = file.suffix.lower()
            if suffix == ".json":
                found = {file.stem: read_json_curve(file)}
            elif suffix == ".csv":
                found = read_csv_curves(file)
            else:
                raise LawError(f"{file}: unsupported file type (expected .json or .csv)")
            for name, curve in found.items():
                if name in curves:
                    raise LawError(f"{file}: model {name!r} is already given by another input")
                curves[name] = curve
    if not curves:
        raise LawError("no input curves")
    return curves


def file_source(paths) -> CurveSource:
    """A curve source reading the given files and directories."""
    paths = list(paths)
    return lambda: read_curves(paths)
