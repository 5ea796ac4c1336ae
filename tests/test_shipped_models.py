"""The shipped rMD17 ethanol models: they load by name, their epistemic uncertainty grows
steeply as the hydroxyl O–H bond is pulled out of the training distribution, and their
variances are calibrated on held-out data."""

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.units import kcal, mol

from ase_race import RACECalculator, load_model

KCAL_MOL = kcal / mol  # rMD17 stores kcal/mol and kcal/mol/Å


def stretched(distance):
    atoms = molecule("CH3CH2OH")
    o = int(np.flatnonzero(atoms.numbers == 8)[0])
    d = atoms.get_all_distances()[o]
    h = min((i for i in range(len(atoms)) if atoms.numbers[i] == 1), key=lambda i: d[i])
    direction = atoms.positions[h] - atoms.positions[o]
    atoms.positions[h] = atoms.positions[o] + distance * direction / np.linalg.norm(direction)
    return atoms


def along_the_stretch(name, distances=(0.97, 1.3, 1.6)):
    calc = RACECalculator(name)
    rows = []
    for r in distances:
        atoms = stretched(r)
        atoms.calc = calc
        atoms.get_potential_energy()
        rows.append(dict(calc.results))
    return rows


def test_ensemble_max_forces_std_rises_steeply_off_the_training_data():
    bundle = load_model("ethanol-ensemble")
    assert bundle.posterior.kind == "ensemble" and bundle.posterior.n_members == 10
    eq, r13, r16 = along_the_stretch("ethanol-ensemble")
    assert r13["max_forces_std"] > 5 * eq["max_forces_std"]
    assert r16["max_forces_std"] > 5 * eq["max_forces_std"]
    assert r13["energy_std"] > 5 * eq["energy_std"]
    assert r13["bald"] > eq["bald"] + 1.0  # nats: the members disagree far more
    assert r13["energy_ensemble"].shape == (10,)


def test_default_novelty_model_is_the_mve_network_inside_and_rises_without_falling_back_outside():
    bundle = load_model("ethanol-novelty")
    assert bundle.posterior.kind == "novelty" and bundle.config.isolated_limit is not None
    distances = (0.97, 1.3, 1.6, 2.5, 4.0, 6.0)
    rows = along_the_stretch("ethanol-novelty", distances)
    mve = along_the_stretch("ethanol-mve", (0.97,))[0]
    # Inside the training data the limits change nothing: the network's energy and forces.
    assert rows[0]["energy"] == pytest.approx(mve["energy"], abs=1e-9)
    np.testing.assert_allclose(rows[0]["forces"], mve["forces"], atol=1e-5)
    eq, r13 = rows[0], rows[1]
    assert r13["max_forces_std"] > 5 * eq["max_forces_std"] and r13["energy_std"] > 5 * eq["energy_std"]
    assert r13["energy_var_epistemic"] > 25 * eq["energy_var_epistemic"]
    # The hydrogen leaves every cutoff (5 Å) by 6 Å: σ_E keeps rising, then stays; the force σ
    # dips by ~15 % between 1.6 and 2.5 Å (as the force error does) but never collapses.
    values = [r["energy_std"] for r in rows]
    assert all(b >= 0.99 * a for a, b in zip(values, values[1:])), values
    forces = [r["max_forces_std"] for r in rows]
    assert min(forces[1:]) > 50 * forces[0] and forces[-1] == max(forces)
    # ... and the energy goes to the radical's plus the hydrogen atom's E0.
    h_e0 = bundle.config.e0s[bundle.config.species.index(1)]
    radical = stretched(6.0)
    del radical[[i for i in range(len(radical)) if radical.numbers[i] == 1
                 and np.linalg.norm(radical.positions[i] - radical.positions[2]) > 5.5]]
    radical.calc = RACECalculator("ethanol-novelty")
    assert rows[-1]["energy"] == pytest.approx(radical.get_potential_energy() + h_e0, abs=1e-5)


def test_last_layer_laplace_epistemic_part_grows_off_the_training_data():
    eq, r13, _ = along_the_stretch("ethanol-llla")
    epi = [np.sqrt(r["forces_var_epistemic"].sum(axis=1).max()) for r in (eq, r13)]
    assert epi[0] > 0 and epi[1] > 2 * epi[0]
    # The mean is the MVE network's (float32 weights: the batched backward rounds differently).
    mve = along_the_stretch("ethanol-mve", (0.97,))[0]
    assert eq["energy"] == pytest.approx(mve["energy"], abs=1e-6)
    np.testing.assert_allclose(eq["forces"], mve["forces"], atol=1e-5)


RMD17_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "rmd17_ethanol" / "rmd17_ethanol_test_01.npz"


@pytest.mark.parametrize("name", ["ethanol-mve", "ethanol-llla"])
def test_single_network_models_ship_with_the_scales_fitted_on_validation(name):
    # As trained, their energy variance is ~10x too large on validation (the fitted scale is
    # ~0.1); the file must carry the scales that shipping (ase_race.training.ship) recorded next to them.
    bundle = load_model(name)
    assert bundle.calibration.to_dict() == bundle.metadata["shipping"]["calibration"]
    assert 0.05 < bundle.calibration.energy_var_scale < 0.2
    assert 0.5 < bundle.calibration.forces_var_scale < 2.0


@pytest.mark.skipif(not RMD17_TEST.exists(), reason="needs ../shared/data (rMD17 ethanol)")
@pytest.mark.parametrize("name", ["ethanol-mve", "ethanol-novelty"])
def test_shipped_variances_match_their_errors_on_held_out_structures(name):
    # Squared errors over predicted variances (z²) on test structures, never used in training
    # or calibration. ethanol-mve: as trained the energies give a mean z² of 0.06 (variance
    # ~17x too large), calibrated 0.58 (one hard validation structure pulls the scale up).
    # ethanol-novelty (fitted on validation and off-distribution structures): 0.64 and 0.59
    # on all 1000 test structures.
    data = np.load(RMD17_TEST)
    calc = RACECalculator(name)
    z2_energy, z2_forces = [], []
    for k in range(0, len(data["energies"]), 5):  # 200 of the 1000 test structures
        atoms = Atoms(numbers=data["nuclear_charges"], positions=data["coords"][k])
        atoms.calc = calc
        error = atoms.get_potential_energy() - data["energies"][k] * KCAL_MOL
        z2_energy.append(error**2 / calc.results["energy_var"])
        force_error = calc.results["forces"] - data["forces"][k] * KCAL_MOL
        z2_forces.append(np.mean(force_error**2 / calc.results["forces_var"]))  # (n, 3) per component
    assert 0.3 < np.mean(z2_energy) < 3.0
    assert 0.45 < np.mean(z2_forces) < 2.0


def test_shipped_models_give_the_recorded_predictions():
    """Every result of every shipped model equals the record of tests/make_shipped_reference.py
    (to float32 rounding across CPUs), run in a child process with the record's thread count."""
    import os
    import subprocess
    import sys

    script = Path(__file__).with_name("make_shipped_reference.py")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(script), "--check"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
