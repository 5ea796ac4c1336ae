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
from ase_race.evaluation import Calibration, apply_calibration, fit_calibration
from ase_race.modelfile import ModelBundle
from ase_race.testing import random_posterior
from ase_race.training.assess import Gathered, assess, calibrate, gather


def test_assess_leaves_out_parts_that_are_zero_everywhere():
    g = Gathered(
        energy_ref=np.array([1.0, 2.0]), energy_pred=np.array([0.0, 0.0]),
        energy_var={"total": np.array([1.0, 2.0]), "aleatoric": np.array([1.0, 2.0]), "epistemic": np.zeros(2)},
        forces_ref=np.zeros(3), forces_pred=np.zeros(3),
        forces_var={p: np.ones(3) for p in ("total", "aleatoric", "epistemic")}, forces_cov=np.eye(3)[None],
        forces_mahalanobis=np.array([6.0]), max_forces_std=np.ones(2), n_atoms=np.array([1, 0]),
    )
    report = assess(g)
    assert set(report["energy"]) == {"total", "aleatoric"}  # an all-zero part is left out
    assert report["energy"]["total"]["nll"] == pytest.approx(np.mean([0.5 * (1 + np.log(2 * np.pi)),
                                                                       0.5 * (2 + np.log(4 * np.pi))]))


def test_calibrate_fits_the_raw_predictive_and_keeps_the_stress_scale():
    from conftest import emt_frames

    frames = read_frames_of(emt_frames(6))
    post = random_posterior("tiny", seed=2, species=(1, 6, 8), dtype="float64")
    stored = Calibration(energy_var_scale=9.0, forces_var_scale=9.0, stress_var_scale=4.0)
    cal = calibrate(ModelBundle(post, stored), frames)
    raw = gather(ModelBundle(post), frames)
    expected = fit_calibration(raw.energy_ref - raw.energy_pred, raw.energy_var["total"],
                               (raw.forces_ref - raw.forces_pred).reshape(-1, 3), raw.forces_cov, stress_var_scale=4.0)
    assert cal == expected and cal.stress_var_scale == 4.0
    assert calibrate(ModelBundle(post, stored), frames, keep_stress=False).stress_var_scale == 1.0
    assert calibrate(ModelBundle(post, cal), frames) == cal  # the stored calibration does not enter the fit


def read_frames_of(atoms_list):
    from ase_race.data.readers import frame_from_atoms

    return [frame_from_atoms(a) for a in atoms_list]


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
    expected = apply_calibration(raw, bundle.calibration)
    assert atoms.calc.results["energy_var"] == float(expected.energy_var[0])
    np.testing.assert_array_equal(atoms.calc.results["forces_cov"], expected.forces_cov.numpy())
    assert float(expected.energy_var[0]) != pytest.approx(float(raw.energy_var[0]), rel=1e-3)  # the map did act
