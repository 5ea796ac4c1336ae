"""The ASE contract of RACECalculator: properties, one evaluation per step, stored uncertainties."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.io import read
from ase.md.langevin import Langevin

from ase_race import RACECalculator, store_uncertainties
from ase_race.calculator import UncertaintyWriter
from ase_race.graph import from_atoms

ALWAYS = {
    "energy": (), "free_energy": (), "energies": ("n",), "forces": ("n", 3),
    "energy_var": (), "energy_std": (), "energy_var_aleatoric": (), "energy_var_epistemic": (),
    "forces_var": ("n", 3), "forces_std": ("n", 3), "forces_var_aleatoric": ("n", 3),
    "forces_var_epistemic": ("n", 3), "forces_cov": ("n", 3, 3), "max_forces_std": (),
}


def test_every_property_in_one_calculation(posterior64, ethanol):
    calc = RACECalculator(posterior64)
    ethanol.calc = calc
    for name, shape in ALWAYS.items():
        value = calc.get_property(name, ethanol)
        expected = tuple(len(ethanol) if s == "n" else s for s in shape)
        assert np.shape(value) == expected, name
        assert isinstance(value, float) or value.dtype == np.float64, name
    assert calc.n_evaluations == 1
    r = calc.results
    assert r["free_energy"] == r["energy"]
    np.testing.assert_allclose(r["energies"].sum(), r["energy"], rtol=1e-12)
    np.testing.assert_allclose(r["energy_std"] ** 2, r["energy_var"], rtol=1e-12)
    np.testing.assert_allclose(r["forces_std"] ** 2, r["forces_var"], rtol=1e-12)
    np.testing.assert_allclose(np.diagonal(r["forces_cov"], axis1=1, axis2=2), r["forces_var"])
    # A single model: everything is aleatoric, the epistemic parts are exactly zero.
    assert r["energy_var_epistemic"] == 0.0 and not r["forces_var_epistemic"].any()
    assert r["energy_var"] == r["energy_var_aleatoric"] > 0
    np.testing.assert_allclose(r["max_forces_std"], np.sqrt(r["forces_var"].sum(1)).max())
    # Covariances are symmetric positive definite.
    assert np.allclose(r["forces_cov"], r["forces_cov"].transpose(0, 2, 1))
    assert np.linalg.eigvalsh(r["forces_cov"]).min() > 0
    # Not a periodic cell: no stress, refused without evaluating the network again.
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        ethanol.get_stress()
    with pytest.raises(PropertyNotImplementedError, match="sampling posterior"):
        calc.get_property("energy_ensemble", ethanol)
    assert calc.n_evaluations == 1


def test_periodic_cell_gives_stress_and_its_variance(posterior64, silicon):
    silicon.calc = RACECalculator(posterior64)
    assert silicon.get_stress().shape == (6,)
    assert silicon.calc.results["stress_var"].shape == (6,)
    assert not silicon.calc.results["stress_var"].any()  # epistemic only: zero for one model


def test_calculator_matches_network(posterior64, silicon):
    silicon.calc = RACECalculator(posterior64)
    graph = from_atoms(silicon, posterior64.config.species, posterior64.config.r_max)
    direct = posterior64.model(graph, compute_forces=True, compute_stress=True)
    silicon.get_potential_energy()
    r = silicon.calc.results
    assert r["energy"] == direct["energy"].item()
    assert np.array_equal(r["forces"], direct["forces"].detach().numpy())
    assert r["energy_var"] == direct["energy_var"].item()
    assert np.array_equal(r["forces_cov"], direct["forces_cov"].detach().numpy())
    voigt = direct["stress"][0].detach().numpy()[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    assert np.array_equal(silicon.get_stress(), voigt)


def test_one_evaluation_per_md_step(posterior64, ethanol, tmp_path):
    calc = RACECalculator(posterior64, skin=0.5)
    ethanol.calc = calc
    dyn = Langevin(ethanol, 0.5 * units.fs, temperature_K=300, friction=0.01, fixcm=False, rng=np.random.default_rng(0))
    seen = []
    # Loggers asking for energy, its std and max_forces_std must reuse the step's results.
    dyn.attach(lambda: seen.append((ethanol.get_potential_energy(), calc.get_property("energy_std", ethanol),
                                    calc.get_property("max_forces_std", ethanol))))
    dyn.attach(UncertaintyWriter(ethanol, str(tmp_path / "md.extxyz")), interval=5)
    dyn.run(40)
    assert calc.n_evaluations == 41  # the initial forces + one per step
    assert 1 <= calc.neighbours.n_builds < 41  # the skin spares most rebuilds
    frames = read(tmp_path / "md.extxyz", ":")
    assert len(frames) == 9
    last = frames[-1]
    np.testing.assert_allclose(last.info["race_energy_std"], seen[-1][1])
    np.testing.assert_allclose(last.info["race_max_forces_std"], seen[-1][2])
    np.testing.assert_allclose(last.arrays["race_forces_std"], calc.results["forces_std"])


def test_store_uncertainties_requires_a_race_calculator(ethanol):
    with pytest.raises(RuntimeError, match="no RACECalculator attached"):
        store_uncertainties(ethanol)


def test_isolated_atom(posterior64):
    atoms = Atoms("O", positions=[[0, 0, 0]])
    atoms.calc = RACECalculator(posterior64)
    assert np.isfinite(atoms.get_potential_energy())
    assert not atoms.get_forces().any()


def test_dtype_and_device_are_per_calculator(posterior64, ethanol, tmp_path):
    from ase_race import save_model

    path = save_model(tmp_path / "m.pt", posterior64)
    calc32 = RACECalculator(path, dtype=torch.float32, device="cpu")
    calc64 = RACECalculator(path)
    assert calc32.dtype == torch.float32 and calc64.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32  # untouched
    e32 = calc32.get_potential_energy(ethanol)
    e64 = calc64.get_potential_energy(ethanol)
    assert e32 != e64 and abs(e32 - e64) < 1e-4


def test_changes_of_cell_pbc_and_atoms_give_fresh_results(posterior64, silicon):
    """The neighbour-list cache must never serve a stale list: after each change the results
    equal those of a brand-new calculator."""
    calc = RACECalculator(posterior64)
    atoms = silicon.copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    changes = [
        lambda a: a.set_cell(a.cell.array * 1.03, scale_atoms=True),  # cell
        lambda a: a.set_pbc([True, True, False]),  # pbc
        lambda a: a.pop(),  # atom count
        lambda a: a.set_atomic_numbers([1] + list(a.numbers[1:])),  # species
    ]
    for change in changes:
        change(atoms)
        atoms.get_potential_energy()
        fresh = atoms.copy()
        fresh.calc = RACECalculator(posterior64)
        fresh.get_potential_energy()
        np.testing.assert_allclose(calc.results["energy"], fresh.calc.results["energy"], rtol=1e-12)
        np.testing.assert_allclose(calc.results["forces"], fresh.calc.results["forces"], atol=1e-12)


def test_works_under_no_grad(posterior64, ethanol):
    ethanol.calc = RACECalculator(posterior64)
    with torch.no_grad():
        forces = ethanol.get_forces()
    assert np.abs(forces).max() > 0


def test_store_uncertainties_follows_the_atoms(posterior64, ethanol):
    ethanol.calc = RACECalculator(posterior64)
    ethanol.get_potential_energy()
    first = ethanol.calc.results["energy_std"]
    ethanol.positions[0] += 0.2
    store_uncertainties(ethanol)  # evaluates the moved atoms instead of copying stale numbers
    assert ethanol.info["race_energy_std"] == ethanol.calc.results["energy_std"] != first


def test_one_calculator_shared_by_four_threads_gives_each_its_own_answers(posterior64):
    """Each thread asks for the forces of its own molecule; a calculate() of another thread
    between ASE's state check and its read of the results would hand it the wrong forces."""
    import threading

    from ase.build import molecule

    calc = RACECalculator(posterior64, device="cpu")
    names = ("CH3CH2OH", "CH4", "H2O", "CH3OH")
    systems = []
    for k, name in enumerate(names):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=k)
        atoms.calc = calc
        systems.append((atoms, atoms.get_forces().copy(), atoms.get_potential_energy()))
    wrong, errors = [], []

    def work(k):
        atoms, forces, energy = systems[k]
        rng = np.random.default_rng(k)
        try:
            for _ in range(25):
                # move the atoms a little and back, so every call is a fresh evaluation
                delta = rng.normal(scale=1e-3, size=atoms.positions.shape)
                atoms.positions += delta
                moved = atoms.get_forces()
                atoms.positions -= delta
                got, e = atoms.get_forces(), atoms.get_potential_energy()
                if moved.shape != forces.shape or not np.allclose(got, forces, atol=1e-9) or abs(e - energy) > 1e-9:
                    wrong.append(k)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(systems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
