"""Uncertainty metrics against hand-computed values and exact limits."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from ase_race.evaluation import (
    LEVELS,
    auroc,
    calibration_error,
    ence,
    gaussian_nll,
    miscalibration_area,
    observed_coverage,
    spearman,
    variance_scale,
)


def gaussian_sample(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.1, 2.0, n)
    return rng.normal(0.0, std), std


def test_perfectly_calibrated_sample():
    e, s = gaussian_sample()
    np.testing.assert_allclose(observed_coverage(e, s), LEVELS, atol=4e-3)
    assert calibration_error(e, s) < 1e-4
    assert miscalibration_area(e, s) < 3e-3
    assert ence(e, s) < 0.01
    assert variance_scale(e, s) == pytest.approx(1.0, abs=0.01)
    assert gaussian_nll(e, s) == pytest.approx(0.5 * (math.log(2 * math.pi) + 1) + np.mean(np.log(s)), abs=5e-3)
    assert spearman(np.abs(e), s) > 0.3  # larger σ, larger errors


def test_scaled_sample_has_the_exact_coverage_curve():
    # Predicted σ twice the true one: |e| ≤ 2σ_true z_p happens with probability 2Φ(2 z_p) − 1.
    e, s = gaussian_sample(seed=1)
    z = norm.ppf((1 + LEVELS) / 2)
    expected = 2 * norm.cdf(2 * z) - 1
    np.testing.assert_allclose(observed_coverage(e, 2 * s), expected, atol=4e-3)
    assert calibration_error(e, 2 * s) == pytest.approx(np.sum((LEVELS - expected) ** 2), rel=0.02)
    gap = np.abs(expected - LEVELS)
    assert miscalibration_area(e, 2 * s) == pytest.approx(np.sum(0.5 * (gap[1:] + gap[:-1]) * 0.05), rel=0.02)
    assert variance_scale(e, 2 * s) == pytest.approx(0.25, rel=0.01)  # refits the factor 2² away
    assert ence(e, 2 * s) == pytest.approx(0.5, abs=0.01)  # RMV = 2 RMSE in every bin


def test_constant_sigma_hand_computed():
    e = np.array([1.0, -2.0, 3.0, -4.0])
    s = np.full(4, 2.0)
    # RMSE = √7.5 in the single bin; RMV = 2.
    assert ence(e, s, bins=1) == pytest.approx(abs(2 - math.sqrt(7.5)) / 2)
    assert math.isnan(spearman(np.abs(e), s))  # σ carries no ranking
    assert variance_scale(e, s) == pytest.approx(7.5 / 4)
    # Coverage at p = 0.5: of |e|/σ = 0.5, 1, 1.5, 2 only 0.5 is ≤ z = 0.6745 → 1/4.
    assert observed_coverage(e, s, [0.0, 0.5, 1.0]).tolist() == [0.0, 0.25, 1.0]
    assert gaussian_nll(e, s) == pytest.approx(np.mean(0.5 * (np.log(2 * np.pi * 4) + e**2 / 4)))


def test_auroc_hand_computed():
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    # pairs (a, b): (1,2) win, (1,1) tie, (3,2) loss, (3,1) loss → (1 + ½) / 4
    assert auroc([1, 3], [2, 1]) == pytest.approx(1.5 / 4)
