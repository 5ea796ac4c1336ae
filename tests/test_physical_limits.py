"""The network's physical limits: an isolated atom has its E0 exactly, atoms with enough
neighbours are untouched, forces stay −∇E through the blend, and the aleatoric cap holds."""

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from ase_race import RACECalculator
from ase_race.config import ModelConfig
from ase_race.errors import ConfigError
from ase_race.nn import heads
from ase_race.posteriors import MVEPosterior
from ase_race.testing import finite_difference_forces, random_model

E0S = (-13.6, -1025.3, -2035.6)


def _posterior(**overrides):
    config = ModelConfig.from_preset("tiny", species=(1, 6, 8), e0s=E0S, scale=0.7, shift=-0.4, dtype="float64", **overrides)
    return MVEPosterior(random_model(config, seed=11))


def _energy(posterior, atoms):
    atoms = atoms.copy()
    atoms.calc = RACECalculator(posterior)
    return atoms.get_potential_energy(), atoms.calc


def test_an_isolated_atom_and_separated_atoms_have_their_e0_exactly():
    limited, plain = _posterior(isolated_limit=1.0), _posterior()
    for symbol, e0 in zip("HCO", E0S):
        assert _energy(limited, Atoms(symbol))[0] == e0
        assert _energy(plain, Atoms(symbol))[0] != pytest.approx(e0, abs=1e-3)  # without: a learned offset
    far = Atoms("CO", positions=[[0, 0, 0], [0, 0, 4.5]])  # beyond r_max = 4 Å
    assert _energy(limited, far)[0] == pytest.approx(E0S[1] + E0S[2], abs=1e-12)


def test_atoms_with_enough_neighbours_are_unchanged_and_partial_ones_blend():
    limited, plain = _posterior(isolated_limit=0.5), _posterior()
    limited.model.load_state_dict(plain.model.state_dict())
    ethanol = molecule("CH3CH2OH")
    e_lim, c_lim = _energy(limited, ethanol)
    e_plain, c_plain = _energy(plain, ethanol)
    assert e_lim == e_plain
    np.testing.assert_array_equal(c_lim.results["forces"], c_plain.results["forces"])
    # a pair at 3.5 Å (coordination u(3.5/4) ≈ 0.05 < n_on) lies between E0 and the plain network
    pair = Atoms("HO", positions=[[0, 0, 0], [0, 0, 3.5]])
    e0 = E0S[0] + E0S[2]
    e_partial, e_free = _energy(limited, pair)[0], _energy(plain, pair)[0]
    assert 0 < abs(e_partial - e0) < abs(e_free - e0)


def test_forces_are_minus_the_gradient_through_the_isolated_limit():
    limited = _posterior(isolated_limit=1.0)
    for d in (2.5, 3.2, 3.8):  # coordination from ≈ 0.6 to ≈ 0: the blend is active
        atoms = Atoms("HCO", positions=[[0, 0, 0], [0.3, 0.1, d], [0.2, 1.1, -0.4]])
        atoms.calc = RACECalculator(limited)
        np.testing.assert_allclose(atoms.get_forces(), finite_difference_forces(atoms, 1e-5), atol=1e-6)


def test_the_aleatoric_cap_bounds_every_variance_and_leaves_small_ones_alone():
    cap = math.log(0.25)
    small, large = torch.tensor([-12.0, -8.0], dtype=torch.float64), torch.tensor([5.0, 50.0, 500.0])
    # ℓ − cap(ℓ) = softplus(c − ℓ) − (c − ℓ) ≈ e^(ℓ − c) well below the cap
    assert ((small - heads.soft_cap(small, cap)).abs() <= torch.exp(small - cap)).all()
    assert (heads.soft_cap(large, cap) <= cap).all()
    scale, k = 0.7, 2
    cov = heads.covariance_equivariant(torch.tensor([40.0], dtype=torch.float64), torch.full((1, k, 3), 1e4, dtype=torch.float64), scale, 1e-8, cap)
    assert float(torch.linalg.eigvalsh(cov).max()) <= (1 + k) * math.exp(cap) + 1e-8
    chol = heads.covariance_cholesky(torch.full((1, 6), 30.0, dtype=torch.float64), scale, 1e-8, cap)
    assert math.isfinite(float(chol.sum())) and float(torch.linalg.eigvalsh(chol).max()) < 1e3 * math.exp(cap)
    # in a network: a compressed pair may not report σ² above the cap per atom
    capped, free = _posterior(max_log_var=cap), _posterior()
    capped.model.load_state_dict(free.model.state_dict())
    squeezed = Atoms("OO", positions=[[0, 0, 0], [0, 0, 0.6]])
    calc = _energy(capped, squeezed)[1]
    assert calc.results["energy_var"] <= 2 * math.exp(cap)
    # a cap far above the network's variances changes them by ≈ e^(ℓ − cap)
    high = _posterior(max_log_var=math.log(1e4))
    high.model.load_state_dict(free.model.state_dict())
    ethanol = molecule("CH3CH2OH")
    assert _energy(high, ethanol)[1].results["energy_var"] == pytest.approx(_energy(free, ethanol)[1].results["energy_var"], rel=1e-3)


def test_invalid_limits_are_refused():
    with pytest.raises(ConfigError, match="isolated_limit"):
        ModelConfig.from_preset("tiny", isolated_limit=0.0)
    with pytest.raises(ConfigError, match="isolated_limit"):
        ModelConfig.from_preset("tiny", isolated_limit=float("inf"))
    for value in (float("inf"), float("nan"), 800.0):
        with pytest.raises(ConfigError, match="max_log_var"):
            ModelConfig.from_preset("tiny", max_log_var=value)


def test_cached_isolated_outputs_equal_fresh_ones_and_follow_new_weights():
    from ase_race import _keys as K
    from ase_race.graph import from_atoms

    posterior = _posterior(isolated_limit=1.0)
    model = posterior.model
    pair = Atoms("HO", positions=[[0, 0, 0], [0, 0, 3.5]])
    graph = from_atoms(pair, (1, 6, 8), model.config.r_max, dtype=torch.float64)

    def energy(cache):
        return model.outputs(graph, graph[K.POSITIONS], None, cache_isolated=cache)[K.ENERGY]

    assert torch.equal(energy(True), energy(False))
    other = random_model(model.config, seed=12)
    model.load_state_dict(other.state_dict())  # in place: the cache must notice
    assert torch.equal(energy(True), energy(False))


def test_the_cache_misses_after_a_write_through_data():
    from ase_race import _keys as K
    from ase_race.graph import from_atoms

    model = _posterior(isolated_limit=1.0).model
    graph = from_atoms(Atoms("HO", positions=[[0, 0, 0], [0, 0, 3.5]]), (1, 6, 8), model.config.r_max, dtype=torch.float64)
    before = model.outputs(graph, graph[K.POSITIONS], None, cache_isolated=True)[K.ENERGY]
    for p in model.parameters():
        p.data.mul_(1.1)  # does not bump the tensors' versions
    after = model.outputs(graph, graph[K.POSITIONS], None, cache_isolated=True)[K.ENERGY]
    assert not torch.equal(before, after)
    assert torch.equal(after, model.outputs(graph, graph[K.POSITIONS], None)[K.ENERGY])


def test_stress_is_the_strain_derivative_through_the_isolated_limit():
    from ase_race.testing import finite_strain_stress

    atoms = Atoms("HCO", positions=[[0.2, 0.1, 0.3], [0.5, 0.4, 3.4], [0.3, 1.4, 6.2]], cell=[4.5, 4.8, 9.0], pbc=True)
    atoms.calc = RACECalculator(_posterior(isolated_limit=2.0))
    np.testing.assert_allclose(atoms.get_stress(), finite_strain_stress(atoms, 1e-6), atol=1e-8)
