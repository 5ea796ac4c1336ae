"""max_forces_std: the largest per-atom √trace Σ_i of each structure, as a loop would find it."""

import numpy as np
import pytest
import torch

from ase_race.evaluation import max_forces_std


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_a_loop_over_structures_and_atoms(dtype):
    rng = np.random.default_rng(3)
    n_atoms = [3, 1, 5]
    a = rng.normal(size=(sum(n_atoms), 3, 3))
    cov = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(3)
    expected = []
    start = 0
    for n in n_atoms:
        expected.append(max(np.sqrt(np.trace(cov[i])) for i in range(start, start + n)))
        start += n
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(n_atoms))
    got = max_forces_std(torch.tensor(cov, dtype=dtype), batch)
    assert got.shape == (3,) and got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-14)


def test_a_structure_without_atoms_gives_zero():
    cov = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * torch.tensor([4.0, 9.0], dtype=torch.float64)[:, None, None]
    got = max_forces_std(cov, torch.tensor([0, 2]), n_graphs=3)
    np.testing.assert_array_equal(got.numpy(), [np.sqrt(12.0), 0.0, np.sqrt(27.0)])
