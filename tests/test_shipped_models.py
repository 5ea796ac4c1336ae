"""The shipped rMD17 ethanol models: they load by name, and their epistemic uncertainty grows
steeply as the hydroxyl O–H bond is pulled out of the training distribution."""

import numpy as np
import pytest
from ase.build import molecule

from ase_race import RACECalculator, load_model


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


def test_last_layer_laplace_epistemic_part_grows_off_the_training_data():
    eq, r13, _ = along_the_stretch("ethanol-llla")
    epi = [np.sqrt(r["forces_var_epistemic"].sum(axis=1).max()) for r in (eq, r13)]
    assert epi[0] > 0 and epi[1] > 2 * epi[0]
    # The mean is the MVE network's (float32 weights: the batched backward rounds differently).
    mve = along_the_stretch("ethanol-mve", (0.97,))[0]
    assert eq["energy"] == pytest.approx(mve["energy"], abs=1e-6)
    np.testing.assert_allclose(eq["forces"], mve["forces"], atol=1e-5)
