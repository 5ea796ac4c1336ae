import pytest
import torch
from ase.build import bulk, molecule

from ase_race.testing import random_posterior


@pytest.fixture(autouse=True)
def _global_torch_state_untouched():
    """Every test also checks that ase_race left torch's global state alone."""
    dtype, threads, rng = torch.get_default_dtype(), torch.get_num_threads(), torch.get_rng_state()
    yield
    assert torch.get_default_dtype() == dtype, "torch default dtype was changed"
    assert torch.get_num_threads() == threads, "torch thread count was changed"
    assert torch.equal(torch.get_rng_state(), rng), "torch's global random generator was used"


@pytest.fixture
def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture
def silicon():
    atoms = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
    atoms.rattle(0.05, seed=4)
    return atoms


@pytest.fixture(scope="session")
def posterior64():
    """Tiny float64 model knowing H, C, O, Si, with noticeable forces."""
    return random_posterior("tiny", seed=7, species=(1, 6, 8, 14), scale=2.0)


def emt_frames(n=12, seed=0):
    """Small labelled molecules (EMT energies and forces, a real if crude potential)."""
    import numpy as np
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = molecule("CH4" if k % 2 else "H2O")
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


@pytest.fixture
def emt_file(tmp_path):
    from ase.io import write

    path = tmp_path / "emt.extxyz"
    write(path, emt_frames(), format="extxyz")
    return path
