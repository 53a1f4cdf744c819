"""Law forms: evaluation, free parameters, exact inversion, derivatives, law choice."""

import numpy as np
import pytest

from sparsity_scaling.laws import LAWS, FittedLaw, LawError, predict_tokens
from sparsity_scaling.laws.forms import law_for_activation, law_for_trend

RELU = np.array([0.449, -3.05, 0.286, 0.0674])
SILU = np.array([0.844, 0.208, 0.390])
COEFFICIENTS = {"relu": RELU, "silu": SILU, "log": np.array([0.1, -0.005, 0.3]),
                "sigmoid": np.array([1.07, -0.02, 0.5])}


def fitted(law_name, params, model_params=None):
    law = LAWS[law_name]
    samples = np.tile(params, (50, 1)) * np.random.default_rng(0).uniform(0.99, 1.01, (50, len(params)))
    return FittedLaw("model", law, np.asarray(params, float), samples, 0.95, 1.0, 100.0, model_params)


def test_formulas():
    D = np.array([1.0, 10.0, 100.0])
    assert np.allclose(LAWS["relu"].evaluate(D, RELU), np.exp(-0.286 * D**0.449 - 3.05) + 0.0674)
    assert np.allclose(LAWS["silu"].evaluate(D, SILU), -0.208 / D**0.844 + 0.390)
    assert np.allclose(LAWS["log"].evaluate(D, [0.1, -0.005, 0.3]), 0.1 - 0.005 * np.log(0.3 * D + 1))
    assert np.allclose(LAWS["sigmoid"].evaluate(D, [1.07, -0.02, 0.5]), 1.07 - 1 / (1 + np.exp(-0.02 * D + 0.5)))


@pytest.mark.parametrize("name", sorted(LAWS))
def test_free_parameters_round_trip_and_evaluate_alike(name):
    law, params = LAWS[name], COEFFICIENTS[name]
    theta = law.to_free(params)
    assert np.allclose(law.from_free(theta), params, rtol=1e-12)
    D = np.geomspace(1, 300, 20)
    assert np.allclose(law.evaluate_free(D, theta), law.evaluate(D, params), rtol=1e-12)


def test_stacked_coefficients_evaluate_row_by_row():
    stack = np.array([RELU, RELU * [1.1, 1, 1, 1]])
    D = np.array([2.0, 20.0])
    assert np.allclose(LAWS["relu"].evaluate(D, stack)[1], LAWS["relu"].evaluate(D, stack[1]))


@pytest.mark.parametrize("name", ["relu", "silu"])
def test_predicted_tokens_put_back_into_the_law_give_the_target(name):
    law, params = LAWS[name], COEFFICIENTS[name]
    reachable = np.sort(law.evaluate(np.geomspace(0.5, 5000, 40), params))
    for target in reachable:
        prediction = predict_tokens(fitted(name, params), float(target))
        assert prediction.reachable
        assert abs(law.evaluate(prediction.tokens / 1e9, params) - target) <= 1e-9


def test_relu_target_at_or_below_the_limit_is_unreachable():
    for target in (RELU[3], RELU[3] - 0.01):
        prediction = predict_tokens(fitted("relu", RELU, model_params=2.41e8), target)
        assert not prediction.reachable and prediction.tokens == np.inf
        assert prediction.limit == pytest.approx(RELU[3])
        assert prediction.tokens_per_param is None
    assert LAWS["relu"].inverse(RELU, 0.9) == 0.0  # already below the target at D = 0


def test_silu_target_at_or_above_the_limit_is_never_crossed():
    assert LAWS["silu"].inverse(SILU, SILU[2]) == np.inf
    prediction = predict_tokens(fitted("silu", SILU), 0.3)
    assert prediction.reachable and prediction.crossing == "rises above"
    assert LAWS["silu"].evaluate(prediction.tokens / 1e9 * 0.99, SILU) < 0.3


def test_extrapolation_is_marked():
    model = fitted("relu", RELU)  # data up to D = 100
    assert not predict_tokens(model, float(LAWS["relu"].evaluate(150.0, RELU))).extrapolated
    assert predict_tokens(model, float(LAWS["relu"].evaluate(250.0, RELU))).extrapolated


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_target_outside_unit_interval_is_an_error(target):
    with pytest.raises(LawError, match=r"target activation ratio must lie in \(0, 1\)"):
        predict_tokens(fitted("relu", RELU), target)


@pytest.mark.parametrize("name", ["relu", "silu"])
def test_derivative_matches_finite_differences(name):
    law, params = LAWS[name], COEFFICIENTS[name]
    D, h = np.array([3.0, 30.0, 300.0]), 1e-5
    numeric = (law.evaluate(D + h, params) - law.evaluate(D - h, params)) / (2 * h)
    assert np.allclose(law.derivative(D, params), numeric, rtol=1e-6)


def test_law_follows_activation_then_trend():
    assert law_for_activation("ReLU").name == "relu"
    assert law_for_activation("swiglu").name == "silu"
    assert law_for_activation(None) is None and law_for_activation("gelu") is None
    D = np.geomspace(1, 100, 10)
    assert law_for_trend(D, LAWS["relu"].evaluate(D, RELU)).name == "relu"
    assert law_for_trend(D, LAWS["silu"].evaluate(D, SILU)).name == "silu"
