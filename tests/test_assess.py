"""ase-race evaluate / calibrate: metrics of a model on data, and a calibration that makes the
NLL-optimal variance scale exactly 1 on the data it was fitted to."""

import json

import numpy as np
import pytest
from ase.io import write

from ase_race import load_model, save_model
from ase_race.cli.main import main
from ase_race.data import read_frames
from ase_race.graph import from_atoms
from ase_race.modelfile import Calibration
from ase_race.testing import random_posterior
from ase_race.training.assess import Gathered, assess, fit_calibration, gather


def test_fit_calibration_hand_computed():
    g = Gathered(
        energy_ref=np.array([1.0, 2.0]), energy_pred=np.array([0.0, 0.0]),
        energy_var={"total": np.array([1.0, 2.0]), "aleatoric": np.array([1.0, 2.0]), "epistemic": np.zeros(2)},
        forces_ref=np.zeros(3), forces_pred=np.zeros(3),
        forces_var={p: np.ones(3) for p in ("total", "aleatoric", "epistemic")},
        forces_mahalanobis=np.array([6.0]), max_forces_std=np.ones(2), n_atoms=np.array([1, 0]),
    )
    cal = fit_calibration(g, Calibration(energy_var_scale=2.0, forces_var_scale=1.0))
    assert cal.energy_var_scale == pytest.approx(2.0 * (1.0 / 1.0 + 4.0 / 2.0) / 2)  # mean e²/σ² = 1.5
    assert cal.forces_var_scale == pytest.approx(2.0)  # 6 / 3
    report = assess(g)
    assert set(report["energy"]) == {"total", "aleatoric"}  # an all-zero part is left out


def test_evaluate_and_calibrate_commands(tmp_path, capsys):
    from conftest import emt_frames

    data = tmp_path / "emt.extxyz"
    ood = tmp_path / "ood.extxyz"
    frames = emt_frames(10)
    write(data, frames, format="extxyz")
    squeezed = [f.copy() for f in frames[:4]]
    for f in squeezed:
        f.positions *= 0.9
    write(ood, squeezed, format="extxyz")
    model = save_model(tmp_path / "m.pt", random_posterior("tiny", seed=2, species=(1, 6, 8), dtype="float64"))

    assert main(["evaluate", str(model), str(data), "--ood", str(ood), "-o", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_structures"] == 10
    assert {"mae", "rmse", "nll", "calibration_error", "miscalibration_area", "ence", "spearman"} <= set(metrics["forces"]["total"])
    assert 0.0 <= metrics["ood_auroc"]["max_forces_std"] <= 1.0
    for name in ("reliability.png", "energy.png", "forces.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 1000

    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(model), str(data), "-o", str(out)]) == 0
    bundle = load_model(out)
    assert bundle.calibration.energy_var_scale != 1.0
    # On the data it was fitted to, the NLL-optimal extra scale is now exactly 1.
    g = gather(bundle, read_frames(data))
    assert np.mean((g.energy_ref - g.energy_pred) ** 2 / g.energy_var["total"]) == pytest.approx(1.0, rel=1e-9)
    assert np.mean(g.forces_mahalanobis) / 3 == pytest.approx(1.0, rel=1e-9)
    # evaluate shows before and after; only the variances change, and the NLL falls.
    capsys.readouterr()
    assert main(["evaluate", str(out), str(data), "-o", str(tmp_path / "ev2")]) == 0
    text = capsys.readouterr().out
    assert "before calibration" in text and "after calibration" in text
    both = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    before, after = both["uncalibrated"]["forces"]["total"], both["forces"]["total"]
    assert before["mae"] == pytest.approx(after["mae"]) and after["nll"] < before["nll"]
    assert before == pytest.approx(metrics["forces"]["total"])  # the raw variances of the first evaluate


def test_isotonic_map_hand_computed_and_applied_like_the_calculator():
    from ase_race.training.assess import isotonic_variance_map

    # Squared errors 1, 3, 2, 6 at variances 1, 2, 3, 4: PAV pools the violating pair (3, 2).
    x, y = isotonic_variance_map([4.0, 1.0, 3.0, 2.0], [6.0, 1.0, 2.0, 3.0])
    assert x == (1.0, 2.5, 4.0) and y == (1.0, 2.5, 6.0)
    cal = Calibration(energy_var_scale=2.0, energy_isotonic=(x, y))
    # var 0.5 → scaled 1.0 → mapped 1.0; var 1.5 → 3.0 → 2.5 + (0.5/1.5)·3.5; beyond: proportional.
    np.testing.assert_allclose(cal.energy_factor(np.array([0.5, 1.5, 4.0])) * [0.5, 1.5, 4.0],
                               [1.0, 2.5 + 3.5 / 3, 8.0 * 6.0 / 4.0])
    again = Calibration.from_dict(cal.to_dict())
    assert again.energy_isotonic == cal.energy_isotonic and again.forces_isotonic is None


def test_isotonic_calibration_reaches_the_calculator(tmp_path):
    from conftest import emt_frames

    from ase_race import RACECalculator

    data = tmp_path / "emt.extxyz"
    write(data, emt_frames(10), format="extxyz")
    model = save_model(tmp_path / "m.pt", random_posterior("tiny", seed=2, species=(1, 6, 8), dtype="float64"))
    out = tmp_path / "iso.pt"
    assert main(["calibrate", str(model), str(data), "--isotonic", "-o", str(out)]) == 0
    bundle = load_model(out)
    assert bundle.calibration.energy_isotonic is not None and bundle.calibration.forces_isotonic is not None
    atoms = read_frames(data)[0].atoms
    atoms.calc = RACECalculator(out)
    atoms.get_potential_energy()
    raw = load_model(model).posterior.predict(from_atoms(atoms, (1, 6, 8), bundle.config.r_max))
    expected = float(raw.energy_var[0]) * float(bundle.calibration.energy_factor(float(raw.energy_var[0])))
    assert atoms.calc.results["energy_var"] == pytest.approx(expected, rel=1e-10)
