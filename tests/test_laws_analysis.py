"""Across-model analyses: width-depth bottleneck, best-loss ratios, scale trend, convergence."""

import zlib

import numpy as np
import pytest

from sparsity_scaling.laws import LAWS, FittedLaw, LawError
from sparsity_scaling.laws.trends import (convergence_analysis, piecewise_linear_fit, scale_analysis,
                                            width_depth_analysis)

RATIOS = [14.2, 28.4, 56.9, 85.3, 113.8, 170.7, 284.4, 426.7, 597.3]


def model(name, A0, *, spread=2e-4, identified=True, params=1.08e8, ratio=None, loss=None, law="relu"):
    """A fitted law whose bootstrap scatters A0 normally around its value."""
    coefficients = np.array([0.45, -3.05, 0.286, A0]) if law == "relu" else np.array([0.84, 0.208, A0])
    samples = np.tile(coefficients, (400, 1))
    samples[:, -1] += np.random.default_rng(zlib.crc32(name.encode())).normal(0, spread, 400)
    return FittedLaw(name, LAWS[law], coefficients, samples, 0.95, 2.0, 80.0, params, ratio, loss, identified)


def bottleneck_limit(ratio):
    """Rises linearly up to a bottleneck at 114, then flat at 0.08."""
    return 0.08 + 1e-4 * (min(ratio, 114.0) - 114.0)


def test_piecewise_linear_fit_finds_the_breakpoint():
    x = np.array(RATIOS)
    fit = piecewise_linear_fit(x, [bottleneck_limit(r) for r in x])
    assert fit.x == pytest.approx(114.0, abs=0.5)
    assert fit.slope_below == pytest.approx(1e-4, rel=1e-3) and abs(fit.slope_above) < 1e-7
    with pytest.raises(LawError, match="at least 4"):
        piecewise_linear_fit([1, 2, 3], [1, 2, 3])


def test_width_depth_bottleneck_and_best_loss_interval():
    losses = {r: 2.98 + 0.02 * (np.log(r) - np.log(140)) ** 2 for r in RATIOS}
    models = [model(f"wd{r}", bottleneck_limit(r), ratio=r, loss=losses[r]) for r in RATIOS]
    models.append(model("unidentified", 1e-12, ratio=50.0, loss=3.5, identified=False))
    result = width_depth_analysis(models, loss_tolerance=0.005)
    assert result.bottleneck.x == pytest.approx(114.0, abs=3)
    assert result.bottleneck_ci[0] <= 114.0 <= result.bottleneck_ci[1]
    assert result.excluded == ["unidentified"]
    near = [r for r in RATIOS if losses[r] <= min(losses.values()) * 1.005]
    assert result.best_loss_interval == (min(near), max(near))
    assert min(near) > 14.2 and max(near) < 597.3  # the tolerance picks a proper sub-range


def test_width_depth_needs_enough_identified_models():
    with pytest.raises(LawError, match="at least 4 models with a width_depth_ratio"):
        width_depth_analysis([model(f"m{r}", 0.08, ratio=r) for r in RATIOS[:3]])


def test_scale_trend_per_law_leaves_out_unidentified_limits():
    models = [model("0.1b_relu", 0.060, params=1.08e8), model("0.2b_relu", 0.065, params=2.41e8),
              model("0.8b_relu", 0.072, params=7.6e8), model("0.4b_relu", 1e-12, params=4.52e8, identified=False),
              model("0.1b_silu", 0.41, params=1.08e8, law="silu"), model("1.2b_silu", 0.38, params=1.18e9, law="silu")]
    relu, silu = scale_analysis(models)
    assert relu.law == "relu" and relu.names == ["0.1b_relu", "0.2b_relu", "0.8b_relu"]
    assert relu.excluded == ["0.4b_relu"]
    expected = np.polyfit(np.log10([1.08e8, 2.41e8, 7.6e8]), [0.060, 0.065, 0.072], 1)[0]
    assert relu.slope == pytest.approx(expected)
    assert relu.slope_ci[0] < relu.slope < relu.slope_ci[1]
    assert silu.slope is None  # two sizes give no trend


def test_convergence_is_the_derivative_in_data_per_parameter():
    fitted = model("0.1b_relu", 0.06)
    [result] = convergence_analysis([fitted, model("unknown size", 0.06, params=None)], ratios=[10, 100])
    law, N = fitted.law, 1.08e8
    for ratio, derivative in zip(result.ratios, result.derivatives):
        h = 1e-3
        numeric = (law.evaluate((ratio + h) * N / 1e9, fitted.params)
                   - law.evaluate((ratio - h) * N / 1e9, fitted.params)) / (2 * h)
        assert derivative == pytest.approx(numeric, rel=1e-5)
    assert result.observed == pytest.approx((2.0e9 / N, 80.0e9 / N))
