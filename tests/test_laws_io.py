"""Curve input (JSON reference format, CSV) and atomic output files."""

import json
from pathlib import Path

import numpy as np
import pytest

from sparsity_scaling.laws import Curve, LawError, file_source, read_curves

DATA = Path(__file__).parent / "data" / "sparsinglaw"


def write(path, text):
    path.write_text(text)
    return path


def test_reference_directory_gives_one_model_per_file():
    curves = file_source([DATA])()
    assert len(curves) == 11
    relu = curves["0.1b_relu"]
    raw = json.loads((DATA / "0.1b_relu.json").read_text())
    assert np.array_equal(relu.tokens, raw["token_passed"])
    assert np.array_equal(relu.activation_ratio, raw["activation_ratio"])
    assert relu.activation == "relu" and relu.params == 1.08e8
    assert curves["2.4b_relu"].params == 2.4e9 and curves["0.8b_silu"].activation == "silu"


def test_json_optional_fields_override_the_name(tmp_path):
    path = write(tmp_path / "run_a.json", json.dumps({
        "token_passed": [3e9, 1e9, 2e9], "activation_ratio": [0.08, 0.1, 0.09],
        "activation": "silu", "params": 5e8, "width_depth_ratio": 64, "loss": [2.9, 3.1, 3.0]}))
    curve = read_curves([path])["run_a"]
    assert curve.activation == "silu" and curve.params == 5e8 and curve.width_depth_ratio == 64
    assert list(curve.tokens) == [1e9, 2e9, 3e9]  # sorted, with the ratios and losses
    assert list(curve.activation_ratio) == [0.1, 0.09, 0.08] and list(curve.loss) == [3.1, 3.0, 2.9]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"token_passed": [1e9, 2e9]}', "missing field 'activation_ratio'"),
    ('{"token_passed": [1e9, "x"], "activation_ratio": [0.1, 0.2]}', "field 'token_passed' must be a list of numbers"),
    ('{"token_passed": [1e9, 2e9], "activation_ratio": [0.1]}', "differ in length"),
    ('{"token_passed": [1e9, -2e9], "activation_ratio": [0.1, 0.2]}', "tokens must be positive: -2e\\+09 at checkpoint 2"),
    ('{"token_passed": [1e9, 2e9], "activation_ratio": [0.1, 1.2]}', r"activation_ratio must lie in \[0, 1\]"),
    ('{"token_passed": [1e9, 1e9], "activation_ratio": [0.1, 0.2]}', "same token count"),
    ("[1, 2]", "expected an object"),
])
def test_bad_json_names_file_and_problem(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(LawError, match=message) as error:
        read_curves([path])
    assert str(error.value).startswith(str(path))


def test_csv_holds_several_models(tmp_path):
    path = write(tmp_path / "runs.csv", "model,tokens,activation_ratio,activation,params\n"
                 "a,1e9,0.1,relu,1e8\na,2e9,0.09,relu,1e8\nb,1e9,0.3,,\nb,2e9,0.32,,\n")
    curves = read_curves([path])
    assert sorted(curves) == ["a", "b"]
    assert curves["a"].activation == "relu" and curves["a"].params == 1e8
    assert curves["b"].activation is None and list(curves["b"].activation_ratio) == [0.3, 0.32]


@pytest.mark.parametrize("content, message", [
    ("model,tokens\na,1e9\n", "missing column\\(s\\) activation_ratio"),
    ("model,tokens,activation_ratio\na,1e9,abc\n", "line 2: column 'activation_ratio': not a number: 'abc'"),
    ("model,tokens,activation_ratio,params\na,1e9,0.1,1e8\na,2e9,0.09,2e8\n", "line 3: model 'a' has two values of 'params'"),
    ("model,tokens,activation_ratio\n,1e9,0.1\n", "line 2: empty model name"),
])
def test_bad_csv_names_line_and_column(tmp_path, content, message):
    with pytest.raises(LawError, match=message):
        read_curves([write(tmp_path / "bad.csv", content)])


def test_bad_paths(tmp_path):
    with pytest.raises(LawError, match="no such file or directory"):
        read_curves([tmp_path / "missing.json"])
    with pytest.raises(LawError, match="no .json or .csv files"):
        read_curves([tmp_path])
    with pytest.raises(LawError, match="unsupported file type"):
        read_curves([write(tmp_path / "x.txt", "")])
    copy = write(tmp_path / "0.1b_relu.json", (DATA / "0.1b_relu.json").read_text())
    with pytest.raises(LawError, match="model '0.1b_relu' is already given"):
        read_curves([DATA, copy])


def test_curve_validates_its_own_fields():
    with pytest.raises(LawError, match="must be finite"):
        Curve("m", [1e9, np.nan], [0.1, 0.2])
    with pytest.raises(LawError, match="params must be a positive number"):
        Curve("m", [1e9, 2e9], [0.1, 0.2], params=-5)

