"""Calibration: the map from a Prediction to its calibrated Prediction, and its NLL-optimal fit,
against hand-computed numbers."""

import numpy as np
import pytest
import torch

from ase_race.errors import ConfigError
from ase_race.evaluation import Calibration, apply_calibration, fit_calibration, isotonic_variance_map
from ase_race.posteriors import Prediction


def prediction(dtype=torch.float64, stress=True):
    """Two structures (1 and 2 atoms) with known variances; aleatoric : epistemic = 3 : 1."""
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    cov = t(np.stack([np.diag([1.0, 2.0, 3.0]), np.diag([0.5, 0.5, 0.5]), np.diag([4.0, 4.0, 4.0])]))
    return Prediction(
        energy=t([1.0, 2.0]), node_energy=t([1.0, 0.5, 1.5]),
        energy_var_aleatoric=t([0.75, 3.0]), energy_var_epistemic=t([0.25, 1.0]),
        forces_cov_aleatoric=0.75 * cov, forces_cov_epistemic=0.25 * cov,
        forces=t(np.arange(9.0).reshape(3, 3)),
        stress=t(np.ones((2, 3, 3))) if stress else None,
        stress_var_epistemic=t(np.full((2, 3, 3), 2.0)) if stress else None,
    )


def test_scales_multiply_both_parts_and_the_stress_variance():
    p = prediction(torch.float32)
    c = apply_calibration(p, Calibration(energy_var_scale=2.0, forces_var_scale=3.0, stress_var_scale=5.0))
    assert c.energy_var_aleatoric.dtype == torch.float64  # applied in double precision
    np.testing.assert_array_equal(c.energy_var_aleatoric.numpy(), [1.5, 6.0])
    np.testing.assert_array_equal(c.energy_var_epistemic.numpy(), [0.5, 2.0])
    np.testing.assert_array_equal(c.forces_cov_aleatoric.numpy(), 3.0 * p.forces_cov_aleatoric.double().numpy())
    np.testing.assert_array_equal(c.forces_cov_epistemic.numpy(), 3.0 * p.forces_cov_epistemic.double().numpy())
    np.testing.assert_array_equal(c.stress_var_epistemic.numpy(), np.full((2, 3, 3), 10.0))
    # means pass through untouched, and the prediction passed in is left as it was
    assert c.energy is p.energy and c.forces is p.forces and c.stress is p.stress
    np.testing.assert_array_equal(p.energy_var_aleatoric.numpy(), [0.75, 3.0])


def test_identity_changes_no_number_and_a_missing_stress_stays_missing():
    p = prediction(stress=False)
    c = apply_calibration(p, Calibration())
    assert Calibration().is_identity and not Calibration(stress_var_scale=2.0).is_identity
    for name in ("energy_var_aleatoric", "energy_var_epistemic", "forces_cov_aleatoric", "forces_cov_epistemic"):
        assert torch.equal(getattr(c, name), getattr(p, name))
    assert c.stress_var_epistemic is None


def test_isotonic_map_on_energies_interpolates_then_extrapolates_proportionally():
    # g_E through (1, 1), (2.5, 2.5), (4, 6) after s_E = 2: the totals 1 and 4 become v = 2 and 8.
    cal = Calibration(energy_var_scale=2.0, energy_isotonic=((1.0, 2.5, 4.0), (1.0, 2.5, 6.0)))
    c = apply_calibration(prediction(), cal)
    total = c.energy_var_aleatoric + c.energy_var_epistemic
    # v = 2 lies between 1 and 2.5: g = 1 + (2 − 1)·(1.5/1.5) = 2; v = 8 is above 4: g = 8·6/4 = 12
    np.testing.assert_allclose(total.numpy(), [2.0, 12.0], rtol=1e-15)
    np.testing.assert_allclose((c.energy_var_aleatoric / c.energy_var_epistemic).numpy(), [3.0, 3.0])  # split kept
    below = apply_calibration(prediction(), Calibration(energy_isotonic=((4.0, 8.0), (2.0, 8.0))))
    np.testing.assert_allclose(below.energy_var.numpy(), [0.5, 2.0])  # v = 1, 4 below x₀ = 4 and at it: ×y₀/x₀


def test_isotonic_map_on_forces_uses_each_atoms_mean_diagonal_variance():
    # Per atom trace(Σ)/3 = 2, 0.5, 4; with s_F = 1 and g_F through (1, 2), (3, 3):
    # g(2) = 2.5 (×1.25), g(0.5) = 0.5·2/1 (×2), g(4) = 4·3/3 (×1).
    cal = Calibration(forces_isotonic=((1.0, 3.0), (2.0, 3.0)))
    p = prediction()
    c = apply_calibration(p, cal)
    factors = (c.forces_cov / p.forces_cov)[:, 0, 0]
    np.testing.assert_allclose(factors.numpy(), [1.25, 2.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(c.forces_cov_epistemic.numpy(), factors.numpy()[:, None, None] * p.forces_cov_epistemic.numpy())


def test_fit_hand_computed():
    # Energies: e² / σ² = 1/1 and 4/2, mean 1.5. Forces: atom 0 ΔF = (1, 2, 0) under diag(1, 2, 4)
    # gives 1 + 4/2 = 3, atom 1 ΔF = (0, 0, 3) under I gives 9: s_F = mean(3, 9)/3 = 2.
    e_err, e_var = np.array([1.0, 2.0]), np.array([1.0, 2.0])
    f_err = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    f_cov = np.stack([np.diag([1.0, 2.0, 4.0]), np.eye(3)])
    cal = fit_calibration(e_err, e_var, f_err, f_cov, stress_var_scale=7.0)
    assert cal == Calibration(energy_var_scale=pytest.approx(1.5), forces_var_scale=pytest.approx(2.0), stress_var_scale=7.0)
    iso = fit_calibration(torch.tensor(e_err), e_var, f_err, torch.tensor(f_cov), isotonic=True)
    assert iso.energy_var_scale == cal.energy_var_scale
    # g_E: e² = 1, 4 at v = 1.5, 3 (already increasing). g_F: mean squared component errors 5/3, 3
    # at w = 2·7/3, 2·1: decreasing, so PAV pools them into one block at w = 10/3, value 7/3.
    np.testing.assert_allclose(iso.energy_isotonic, [[1.5, 3.0], [1.0, 4.0]])
    np.testing.assert_allclose(iso.forces_isotonic, [[10 / 3], [7 / 3]])


def test_fitted_scales_make_the_mean_squared_standardised_error_one():
    rng = np.random.default_rng(0)
    e_var, f_cov = rng.uniform(0.5, 2.0, 50), np.stack([np.diag(rng.uniform(0.5, 2.0, 3)) for _ in range(40)])
    e_err, f_err = 3.0 * rng.normal(size=50) * np.sqrt(e_var), rng.normal(size=(40, 3)) * 0.1
    cal = fit_calibration(e_err, e_var, f_err, f_cov)
    p = Prediction(energy=torch.zeros(50), node_energy=torch.zeros(40),
                   energy_var_aleatoric=torch.tensor(e_var), energy_var_epistemic=torch.zeros(50, dtype=torch.float64),
                   forces_cov_aleatoric=torch.zeros(40, 3, 3, dtype=torch.float64), forces_cov_epistemic=torch.tensor(f_cov))
    c = apply_calibration(p, cal)
    assert np.mean(e_err**2 / c.energy_var.numpy()) == pytest.approx(1.0)
    solved = np.linalg.solve(c.forces_cov.numpy(), f_err[..., None])[..., 0]
    assert np.mean(np.sum(f_err * solved, axis=1)) / 3 == pytest.approx(1.0)


def test_fit_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        fit_calibration(np.ones(2), np.ones(3), np.ones((1, 3)), np.eye(3)[None])


def test_isotonic_variance_map_pools_adjacent_violators():
    # Squared errors 1, 3, 2, 6 at variances 1, 2, 3, 4: PAV pools the violating pair (3, 2).
    x, y = isotonic_variance_map([4.0, 1.0, 3.0, 2.0], [6.0, 1.0, 2.0, 3.0])
    assert x == (1.0, 2.5, 4.0) and y == (1.0, 2.5, 6.0)


def test_round_trip_and_validation():
    from ase_race.modelfile import Calibration as FromModelFile

    assert FromModelFile is Calibration
    cal = Calibration(energy_var_scale=2.0, energy_isotonic=((1.0, 2.5), (1.0, 2.5)))
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal and again.forces_isotonic is None and "forces_isotonic" not in cal.to_dict()
    with pytest.raises(ConfigError, match="positive"):
        Calibration.from_dict({"energy_var_scale": 0.0})
    with pytest.raises(ConfigError, match="x increasing"):
        Calibration.from_dict({"energy_isotonic": [[2.0, 1.0], [1.0, 2.0]]})
    with pytest.raises(ConfigError, match="unknown"):
        Calibration.from_dict({"energy_scale": 1.0})
