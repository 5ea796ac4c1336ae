"""Acquisition: expected indices on hand-built pools."""

import numpy as np
import pytest
from ase.build import molecule

from ase_race.active import acquisition_scores, select
from ase_race.active.acquisition import rdf_descriptor
from ase_race.calculator import RACECalculator
from ase_race.posteriors import EnsemblePosterior
from ase_race.testing import random_posterior


def test_top_n_and_diversity_on_a_hand_built_pool():
    scores = [0.1, 0.9, 0.85, 0.3, 0.8]
    assert select(scores, 3) == [1, 2, 4]
    # Structures 1 and 2 are near-duplicates (same descriptor); 4 is different.
    desc = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.001], [5.0, 5.0], [0.0, 5.0]])
    assert select(scores, 2) == [1, 2]
    assert select(scores, 2, diversity=10.0, descriptors=desc) == [1, 4]
    assert select(scores, 10) == [1, 2, 4, 3, 0]  # n larger than the pool: everything, ranked
    with pytest.raises(ValueError, match="descriptors"):
        select(scores, 2, diversity=1.0)


def test_scores_follow_the_calculator():
    members = [random_posterior("tiny", seed=s, species=(1, 6, 8), scale=2.0, dtype="float64").model for s in range(3)]
    calc = RACECalculator(EnsemblePosterior(members))
    pool = []
    for k, amplitude in enumerate([0.0, 0.05, 0.2]):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(amplitude, seed=k)
        pool.append(atoms)
    for strategy, key in [("energy-std", "energy_std"), ("bald-e", "bald_energy"), ("bald-f", "bald_forces"), ("bald-ef", "bald")]:
        scores = acquisition_scores(calc, pool, strategy)
        for atoms, score in zip(pool, scores):
            atoms.calc = calc
            atoms.get_potential_energy()
            assert score == pytest.approx(calc.results[key])
    a, b = acquisition_scores(calc, pool, "random", seed=1), acquisition_scores(calc, pool, "random", seed=1)
    assert np.array_equal(a, b) and a.shape == (3,)
    d = rdf_descriptor(pool[0])
    assert d.sum() == pytest.approx(36 / 9)  # 9·8/2 pairs, all within 6 Å, per atom


def test_select_command(tmp_path):
    from ase.io import read, write

    from ase_race import save_model
    from ase_race.cli.main import main

    pool = []
    for k in range(5):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.02 * (k + 1), seed=k)
        pool.append(atoms)
    write(tmp_path / "pool.extxyz", pool)
    members = [random_posterior("tiny", seed=s, species=(1, 6, 8), scale=2.0, dtype="float64").model for s in range(3)]
    model = save_model(tmp_path / "ens.pt", EnsemblePosterior(members))
    out = tmp_path / "sel.extxyz"
    assert main(["select", str(model), str(tmp_path / "pool.extxyz"), "-n", "2", "--strategy", "energy-std", "-o", str(out)]) == 0
    chosen = read(out, ":")
    scores = acquisition_scores(RACECalculator(model), pool, "energy-std")
    assert [a.info["pool_index"] for a in chosen] == list(np.argsort(-scores)[:2])
