"""Fitting: recovery of known laws, bootstrap coverage, windows and clear failures."""

import numpy as np
import pytest

from sparsity_scaling.laws import LAWS, Curve, FittedLaw, LawError, Window, fit_curve
from sparsity_scaling.laws import fit as fit_module
from sparsity_scaling.laws.fit import bootstrap, fit_law

TRUE = {"relu": np.array([0.45, -3.05, 0.286, 0.0674]), "silu": np.array([0.84, 0.208, 0.39]),
        "log": np.array([0.1, -0.004, 0.3]), "sigmoid": np.array([1.07, -0.02, 0.5])}
TOKENS = np.linspace(2.84e9, 85e9, 30)


def curve(name, ratio, tokens=TOKENS, activation=None):
    return Curve(name, tokens, ratio, activation)


@pytest.mark.parametrize("name", sorted(TRUE))
def test_noise_free_law_is_recovered_from_the_default_start(name):
    law, D = LAWS[name], TOKENS / 1e9
    fit = fit_law(law, D, law.evaluate(D, TRUE[name]))
    assert fit.mae < 1e-9
    if name in ("relu", "silu"):  # the alternatives are only asked to fit, not to be identifiable
        assert np.allclose(fit.params, TRUE[name], rtol=1e-4)


def test_a_laptop_scale_curve_fits_as_well_as_the_same_curve_in_paper_units():
    """`make demo`'s stabilised ReLU curve (3M tokens: D ~ 1e-3 in units of 1e9 tokens). In
    these units c is ~1e4 and LM once ran out of evaluations in the c-alpha valley; the fit
    must not depend on the unit of D."""
    D = np.array([327680, 434176, 573440, 753664, 995328, 1310720, 1724416, 2273280, 2756608,
                  2818048, 2879488, 2936832, 2998272]) / 1e9
    A = np.array([0.1043, 0.0925, 0.0825, 0.0715, 0.0650, 0.0623, 0.0591, 0.0605, 0.0597,
                  0.0607, 0.0610, 0.0605, 0.0603])
    law = LAWS["relu"]
    small, big = fit_law(law, D, A), fit_law(law, D * 1e5, A)
    assert small.mae < 1e-3
    assert np.allclose(law.evaluate(D, small.params), law.evaluate(D * 1e5, big.params), atol=1e-5)


def test_bootstrap_intervals_cover_true_coefficients_at_nominal_rate():
    law, D, level = LAWS["relu"], TOKENS / 1e9, 0.9
    rng = np.random.default_rng(7)
    trajectories, covered, prediction_covered = 60, np.zeros(4), 0
    true_D = law.inverse(TRUE["relu"], 0.075)
    for i in range(trajectories):
        noisy = law.evaluate(D, TRUE["relu"]) + rng.normal(0, 3e-4, D.size)
        fit = fit_law(law, D, noisy)
        samples = bootstrap(fit, 100, seed=i).samples
        model = FittedLaw("synthetic", law, fit.params, samples, level, D.min(), D.max())
        for k, name in enumerate(law.coefficients):
            low, high = model.coefficient_interval(name)
            covered[k] += low <= TRUE["relu"][k] <= high
        low, high = model.interval(law.inverse(samples, 0.075))
        prediction_covered += low <= true_D <= high
    coverage = covered / trajectories
    assert np.all((coverage >= 0.78) & (coverage <= 0.98)), coverage
    assert 0.78 <= prediction_covered / trajectories <= 0.98


def test_fit_curve_reports_law_alternatives_and_intervals():
    law, D = LAWS["silu"], TOKENS / 1e9
    ratio = law.evaluate(D, TRUE["silu"]) + np.random.default_rng(1).normal(0, 1e-3, D.size)
    result = fit_curve(curve("m_silu", ratio, activation="silu"), Window(drop_first=2), n_bootstrap=100)
    entry = result.to_json()
    assert entry["form"] == "silu" and entry["form_source"] == "activation"
    assert entry["points_used"] == 28 and entry["points_dropped"] == 2
    assert entry["b"] is None and set(entry["ci"]) == {"alpha", "c", "A0"}
    for name in ("alpha", "c", "A0"):
        low, high = entry["ci"][name]
        assert low <= entry[name] <= high
    assert set(entry["alternatives"]) == {"log", "sigmoid"}
    assert entry["alternatives"]["log"]["mae"] > 0
    assert entry["aic"] == pytest.approx(28 * np.log(entry["mse"]) + 2 * 3)
    assert len(entry["bootstrap"]["samples"]) == 100 and entry["bootstrap"]["failed"] == 0
    assert FittedLaw.from_json("m_silu", entry).params == pytest.approx(result.fit.params)


def test_unknown_activation_follows_the_trend():
    D = TOKENS / 1e9
    result = fit_curve(curve("run", LAWS["relu"].evaluate(D, TRUE["relu"])), Window(drop_first=0), n_bootstrap=20)
    assert result.fit.law.name == "relu" and result.form_source == "trend"


def test_windows():
    tokens = np.array([1e9, 2e9, 3e9, 4e9, 10e9])
    assert Window(drop_first=2).first_kept(tokens) == 2
    assert Window(drop_first=9).first_kept(tokens) == 5
    assert Window(min_tokens=3e9).first_kept(tokens) == 2
    assert Window(min_fraction=0.25).first_kept(tokens) == 2  # before 2.5e9 tokens
    for bad in ({}, {"drop_first": 1, "min_tokens": 1.0}, {"drop_first": -1}, {"min_fraction": 1.0}):
        with pytest.raises(LawError):
            Window(**bad)


def test_two_points_are_too_few():
    with pytest.raises(LawError, match=r"2 checkpoints .* needs at least 6"):
        fit_curve(curve("m_relu", [0.1, 0.09], tokens=[1e9, 2e9], activation="relu"), Window(drop_first=0))


def test_constant_ratio_is_an_error():
    with pytest.raises(LawError, match="constant"):
        fit_curve(curve("m_relu", np.full(30, 0.08), activation="relu"), Window(drop_first=0))


def test_data_against_the_laws_direction_are_not_fitted():
    rising = LAWS["silu"].evaluate(TOKENS / 1e9, TRUE["silu"]) * 0.2
    with pytest.raises(LawError, match="m_relu: the relu law has no valid starting point .* direction"):
        fit_curve(curve("m_relu", rising, activation="relu"), Window(drop_first=0))


def test_trendless_noise_is_not_fitted():
    noise = 0.08 - 2e-4 * np.log(TOKENS / 1e9) + np.random.default_rng(1).normal(0, 1e-3, TOKENS.size)
    with pytest.raises(LawError, match=r"m_relu: the relu law \(falling ratio\) explains only \d+% .* too flat"):
        fit_curve(curve("m_relu", noise, activation="relu"), Window(drop_first=0))


def test_negative_tokens_are_an_error():
    with pytest.raises(LawError, match="tokens must be positive: -1e"):
        curve("m", [0.1, 0.09, 0.08], tokens=[-1e9, 1e9, 2e9])


def test_a_fit_that_never_converges_says_so(monkeypatch):
    monkeypatch.setattr(fit_module, "levenberg_marquardt", lambda *args: None)
    ratio = LAWS["relu"].evaluate(TOKENS / 1e9, TRUE["relu"])
    with pytest.raises(LawError, match="m_relu: the relu law did not converge from any of its"):
        fit_curve(curve("m_relu", ratio, activation="relu"), Window(drop_first=0))
