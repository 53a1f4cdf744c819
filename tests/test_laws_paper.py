"""The laws refitted on the Sparsing Law paper's own data, with the preset's windows (1.2B ReLU's
published, the others inferred from the published coefficients: see laws/presets.py)."""

from pathlib import Path

import numpy as np
import pytest

from sparsity_scaling.laws import PRESETS, fit_curves, predict_tokens, read_curves
from sparsity_scaling.laws.fit import levenberg_marquardt

DATA = Path(__file__).parent / "data" / "sparsinglaw"
PRESET = PRESETS["sparsing-law"]
WINDOWS = {"1.2b_relu": 6, "2.4b_relu": 3, "0.1b_silu": 5, "0.2b_silu": 6, "0.4b_silu": 8, "1.2b_silu": 10}
NOT_OPTIMAL = ("0.4b_relu", "0.8b_silu")  # published coefficients are no least-squares optimum
REPRODUCED = sorted(set(PRESET) - set(NOT_OPTIMAL))


def law_value(name, D, coefficients):
    """The paper's formulas written out independently of the package."""
    if name.endswith("relu"):
        return np.exp(-coefficients["c"] * D ** coefficients["alpha"] + coefficients["b"]) + coefficients["A0"]
    return -coefficients["c"] / D ** coefficients["alpha"] + coefficients["A0"]


@pytest.fixture(scope="module")
def fits():
    return fit_curves(read_curves([DATA]), preset=PRESET, n_bootstrap=200, seed=0)


def test_preset_drops_the_papers_warm_up_points(fits):
    assert sorted(fits) == sorted(PRESET)
    assert {name: fit.first_kept for name, fit in fits.items()} == {name: WINDOWS.get(name, 0) for name in PRESET}


@pytest.mark.parametrize("name", REPRODUCED)
def test_least_squares_reproduces_the_published_coefficients(fits, name):
    result, published = fits[name], PRESET[name].published
    coefficients = result.fit.law.as_dict(result.fit.params)
    assert abs(coefficients["A0"] - published["A0"]) <= 0.001
    assert abs(coefficients["alpha"] / published["alpha"] - 1) <= 0.02
    published_mae = np.mean(np.abs(result.fit.A - law_value(name, result.fit.D, published)))
    assert result.fit.mae <= 1.05 * published_mae
    assert result.fitted.A0_identified
    assert not any("least-squares optimum" in w for w in result.warnings)


@pytest.mark.parametrize("name", NOT_OPTIMAL)
def test_published_coefficients_that_are_no_optimum_are_flagged(fits, name):
    result, published = fits[name], PRESET[name].published
    published_mse = np.mean((result.fit.A - law_value(name, result.fit.D, published)) ** 2)
    assert result.fit.mse < published_mse / 1.5
    assert any(w.startswith("published coefficients are not a least-squares optimum") for w in result.warnings)
    assert result.to_json()["published"]["mse"] == pytest.approx(published_mse)


def test_unidentified_limit_of_0_4b_relu_is_flagged(fits):
    result = fits["0.4b_relu"]
    assert result.fit.params[-1] < 1e-6  # least squares drives A0 to its bound 0
    assert not result.fitted.A0_identified
    entry = result.to_json()
    assert entry["A0_identified"] is False
    assert any(w.startswith("A0 not identified") and "bound" in w for w in entry["warnings"])


def random_start(law, A, rng):
    alpha = np.exp(rng.uniform(np.log(0.01), np.log(5.0)))
    if law.name == "relu":
        return np.array([alpha, rng.uniform(-8, 3), np.exp(rng.uniform(np.log(1e-6), np.log(10))),
                         rng.uniform(0, A.min())])
    return np.array([alpha, np.exp(rng.uniform(np.log(1e-3), np.log(10))), rng.uniform(A.max(), 1)])


def test_default_start_reaches_the_best_of_100_random_starts(fits):
    rng = np.random.default_rng(2024)
    for name, result in fits.items():
        fit = result.fit
        runs = [levenberg_marquardt(fit.law, fit.D, fit.A, random_start(fit.law, fit.A, rng)) for _ in range(100)]
        best = min(sse for _, sse in filter(None, runs))
        assert fit.sse <= best * 1.001, name


def test_tokens_for_0_07_on_0_1b_relu(fits):
    published = PRESET["0.1b_relu"].published
    published_D = ((published["b"] - np.log(0.07 - published["A0"])) / published["c"]) ** (1 / published["alpha"])
    assert published_D * 1e9 == pytest.approx(49.0e9, abs=0.05e9)
    prediction = predict_tokens(fits["0.1b_relu"].fitted, 0.07)
    assert prediction.reachable and not prediction.extrapolated
    assert abs(prediction.tokens - 48.8e9) <= 1e9
    assert prediction.ci[0] <= published_D * 1e9 <= prediction.ci[1]
    assert prediction.tokens_per_param == pytest.approx(prediction.tokens / 1.08e8)


@pytest.mark.parametrize("name", ["0.8b_relu", "1.2b_relu"])
def test_large_relu_models_never_reach_0_07(fits, name):
    prediction = predict_tokens(fits[name].fitted, 0.07)
    assert not prediction.reachable
    assert prediction.limit > 0.07
    assert prediction.unreachable_share > 0.5
    assert prediction.to_json()["reachable"] is False
