"""Physics of the RACE network: symmetry, conservative forces, stress, extensivity, smoothness."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

try:
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # ASE < 3.29
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from ase_race import RACECalculator
from ase_race import _keys as K
from ase_race.config import ModelConfig
from ase_race.graph import from_atoms
from ase_race.nn.derivatives import derivative_inputs, energy_derivatives
from ase_race.testing import (
    finite_difference_forces,
    finite_strain_stress,
    random_orthogonal,
    random_posterior,
    transform,
)


def evaluate(posterior, atoms):
    atoms = atoms.copy()
    atoms.calc = RACECalculator(posterior)
    atoms.get_potential_energy()
    return atoms.calc.results


@pytest.mark.parametrize("reflect", [False, True])
def test_invariance_and_covariance(posterior64, ethanol, reflect):
    rot = random_orthogonal(11, reflect=reflect)
    perm = np.random.default_rng(1).permutation(len(ethanol))
    ref = evaluate(posterior64, ethanol)
    new = evaluate(posterior64, transform(ethanol, rot, translation=(1.0, -2.0, 0.5), permutation=perm))
    np.testing.assert_allclose(new["energy"], ref["energy"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(new["energy_var"], ref["energy_var"], rtol=1e-10)
    np.testing.assert_allclose(new["energies"], ref["energies"][perm], atol=1e-10)
    np.testing.assert_allclose(new["forces"], ref["forces"][perm] @ rot.T, atol=1e-10)
    # Total per-atom force variance (trace) is invariant; the covariance rotates as R Σ Rᵀ.
    np.testing.assert_allclose(new["forces_var"].sum(1), ref["forces_var"].sum(1)[perm], rtol=1e-10)
    np.testing.assert_allclose(new["forces_cov"], rot @ ref["forces_cov"][perm] @ rot.T, atol=1e-12)
    np.testing.assert_allclose(new["max_forces_std"], ref["max_forces_std"], rtol=1e-10)


def test_cholesky_covariance_is_not_equivariant(ethanol):
    """The paper's lab-frame Cholesky form gives Σ(Rx) ≠ R Σ(x) Rᵀ (documented, not hidden)."""
    post = random_posterior("tiny", seed=3, species=(1, 6, 8), force_cov="cholesky")
    rot = random_orthogonal(5)
    ref = evaluate(post, ethanol)
    new = evaluate(post, transform(ethanol, rot))
    # Its entries are built from invariants, so Σ itself is unchanged under rotation ...
    np.testing.assert_allclose(new["forces_cov"], ref["forces_cov"], rtol=1e-9)
    # ... which is not how a covariance of rotated forces must transform.
    rotated = rot @ ref["forces_cov"] @ rot.T
    assert np.abs(new["forces_cov"] - rotated).max() > 1e-3 * np.abs(rotated).max()
    # Energies and forces are still equivariant.
    np.testing.assert_allclose(new["forces"], ref["forces"] @ rot.T, atol=1e-10)


@pytest.mark.parametrize("name", ["ethanol", "silicon"])
def test_forces_are_minus_energy_gradient(posterior64, request, name):
    atoms = request.getfixturevalue(name)
    atoms.calc = RACECalculator(posterior64)
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3  # the check below is not vacuous
    np.testing.assert_allclose(forces, finite_difference_forces(atoms, 1e-4), atol=1e-7)


def test_stress_is_finite_strain_derivative(posterior64, silicon):
    silicon.calc = RACECalculator(posterior64)
    stress = silicon.get_stress()
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, finite_strain_stress(silicon, 1e-5), atol=1e-9)


def test_derivative_helper_stress_virial_members_and_rows(posterior64, silicon):
    """nn.derivatives, shared by the network, stacked members and the last-layer Jacobians:
    σ = (1/V) ∂E/∂ε against finite strains of E itself, W = −σV, and a member dimension or
    batched rows give each member / row its own derivatives."""
    model = posterior64.model
    graph = from_atoms(silicon, model.config.species, model.config.r_max, dtype=torch.float64)
    cell, volume = graph[K.CELL], float(abs(np.linalg.det(silicon.cell.array)))
    positions, strain = derivative_inputs(graph[K.POSITIONS], 1, stress=True)
    assert positions.requires_grad and not graph[K.POSITIONS].requires_grad
    d = energy_derivatives(model.outputs(graph, positions, strain)[K.ENERGY].sum(), positions, strain, cell)
    h, fd = 1e-5, np.zeros((3, 3))
    with torch.no_grad():
        for i in range(3):
            for j in range(3):
                energies = []
                for sign in (1, -1):
                    eps = torch.zeros(1, 3, 3, dtype=torch.float64)
                    eps[0, i, j] = sign * h
                    energies.append(float(model.outputs(graph, graph[K.POSITIONS], eps)[K.ENERGY].sum()))
                fd[i, j] = (energies[0] - energies[1]) / (2 * h) / volume
    assert np.abs(fd).max() > 1e-5
    np.testing.assert_allclose(d.stress[0].numpy(), fd, atol=1e-9)
    assert torch.equal(d.stress, -d.virial / torch.linalg.det(cell).abs()[:, None, None])
    np.testing.assert_allclose(d.virial[0].numpy(), -fd * volume, atol=1e-8)

    # Two members, the second with twice the energy: each gets its own derivatives.
    pos_m, strain_m = derivative_inputs(graph[K.POSITIONS], 1, stress=True, n_members=2)
    assert pos_m.shape == (2, len(silicon), 3) and strain_m.shape == (2, 1, 3, 3)
    total = sum((m + 1) * model.outputs(graph, pos_m[m], strain_m[m])[K.ENERGY].sum() for m in range(2))
    members = energy_derivatives(total, pos_m, strain_m, cell)
    for m in range(2):
        torch.testing.assert_close(members.forces[m], (m + 1) * d.forces, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(members.stress[m], (m + 1) * d.stress, rtol=1e-12, atol=1e-14)

    # Rows E and 3E differentiated in one batched backward pass.
    positions, strain = derivative_inputs(graph[K.POSITIONS], 1, stress=True)
    energy = model.outputs(graph, positions, strain)[K.ENERGY].sum()
    rows = energy_derivatives(torch.stack([energy, 3 * energy]), positions, strain, cell)
    assert rows.forces.shape == (2, len(silicon), 3) and rows.stress.shape == (2, 1, 3, 3)
    torch.testing.assert_close(rows.forces[0], d.forces, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.forces[1], 3 * d.forces, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.stress[1], 3 * d.stress, rtol=1e-12, atol=1e-14)


def test_supercell_is_extensive(posterior64, silicon):
    small = evaluate(posterior64, silicon)
    big = evaluate(posterior64, silicon * (2, 2, 2))
    np.testing.assert_allclose(big["energy"], 8 * small["energy"], rtol=1e-10)
    np.testing.assert_allclose(big["energy_var"], 8 * small["energy_var"], rtol=1e-10)
    np.testing.assert_allclose(big["forces"], np.tile(small["forces"], (8, 1)), atol=1e-10)
    np.testing.assert_allclose(big["stress"], small["stress"], atol=1e-10)


def test_paper_energy_variance_does_not_grow_with_size(silicon):
    post = random_posterior("tiny", seed=2, species=(14,), energy_var="paper")
    small, big = evaluate(post, silicon), evaluate(post, silicon * (2, 2, 2))
    np.testing.assert_allclose(big["energy_var"], small["energy_var"], rtol=1e-10)


def test_energy_is_smooth_across_the_cutoff():
    """A third atom leaving the cutoff sphere of the other two: E and F go smoothly to their
    limits (the envelope and its first two derivatives vanish at r_c)."""
    post = random_posterior("tiny", seed=4, species=(1, 8), scale=5.0)
    r_c = post.config.r_max

    def energy_and_force(distance_to_o):
        # Atom 2 on the −x axis, O between it and the H: its distance to O is its last contact.
        atoms = Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-distance_to_o, 0, 0]])
        atoms.calc = RACECalculator(post)
        return atoms.get_potential_energy(), -atoms.get_forces()[2, 0]

    far_e, far_f = energy_and_force(r_c + 0.5)
    assert far_f == 0.0  # beyond the cutoff of both atoms, nothing acts on it
    gaps = [abs(energy_and_force(r_c - d)[0] - far_e) for d in (0.2, 0.02)]
    assert gaps[0] > 1e-8  # the atom does interact inside the cutoff …
    assert gaps[1] < gaps[0] * 1e-3  # … and the energy joins its far value smoothly
    assert abs(energy_and_force(r_c - 1e-3)[1]) < 1e-9  # the force vanishes at r_c
    assert energy_and_force(r_c + 1e-6)[0] == far_e  # just outside: exactly the far value


def test_nve_conserves_energy(posterior64):
    atoms = molecule("CH3CH2OH")
    atoms.calc = RACECalculator(posterior64)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    totals, kinetic = [], []
    dyn.attach(lambda: (totals.append(atoms.get_total_energy()), kinetic.append(atoms.get_kinetic_energy())))
    dyn.run(1000)
    drift = max(totals) - min(totals)
    swing = max(kinetic) - min(kinetic)
    assert swing > 0.02  # forces do real work on the atoms
    # Stated bound: total energy stays within 1e-3 of the kinetic-energy swing over 1000 steps.
    assert drift < 1e-3 * swing, (drift, swing)
    assert atoms.calc.n_evaluations == 1001


def test_float32_agrees_with_float64(ethanol):
    """With realistic E0s (total energies ≈ −4200 eV) a float32 model still agrees to ~10 µeV,
    because E0s and the sum over atoms are done in float64."""
    e0s = (-13.568, -1025.277, -2035.571, -7870.0)
    post64 = random_posterior("tiny", seed=7, species=(1, 6, 8, 14), scale=2.0, e0s=e0s)
    ref = evaluate(post64, ethanol)
    assert ref["energy"] < -4000
    atoms = ethanol.copy()
    atoms.calc = RACECalculator(post64, dtype="float32")
    assert atoms.calc.posterior.model.embedding.weight.dtype == torch.float32
    assert post64.model.embedding.weight.dtype == torch.float64  # the caller's model is untouched
    np.testing.assert_allclose(atoms.get_potential_energy(), ref["energy"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-5)


def test_config_round_trip_and_strictness():
    cfg = ModelConfig.from_preset("paper", species=(1, 6, 7, 8), e0s=(-13.6, -1029.0, -1484.0, -2042.0))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_layer": 3})
    with pytest.raises(ValueError, match="one multiplicity"):
        ModelConfig(hidden_irreps="16x0e+8x1o")
    with pytest.raises(ValueError, match="force_cov"):
        ModelConfig(force_cov="diagonal")


def test_edge_chunking_gives_the_same_numbers(posterior64, silicon):
    """Checkpointed edge chunks (the large-system path) equal the plain path to round-off."""
    plain = RACECalculator(posterior64, edge_chunk=None)
    chunked = RACECalculator(posterior64, edge_chunk=20)
    atoms = silicon * (1, 1, 2)
    results = []
    for calc in (plain, chunked):
        atoms.calc = calc
        atoms.get_potential_energy()
        results.append(calc.results)
    n_edges = len(plain.neighbours.edges(atoms.positions, atoms.cell.array, atoms.pbc).i)
    assert n_edges > 4 * 20  # several chunks
    for key in ("energy", "forces", "stress", "energy_var", "forces_cov"):
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-12, atol=1e-13, err_msg=key)


def test_paper_preset_builds_and_is_invariant(ethanol):
    """The paper's 5-layer, 128-feature preset with both parities up to l = 3."""
    post = random_posterior("paper", seed=0, species=(1, 6, 8))
    assert len(post.model.layers) == 5
    assert sum(p.numel() for p in post.model.parameters()) > 3_000_000
    rot = random_orthogonal(2, reflect=True)
    ref, new = evaluate(post, ethanol), evaluate(post, transform(ethanol, rot))
    np.testing.assert_allclose(new["energy"], ref["energy"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(new["forces"], ref["forces"] @ rot.T, atol=1e-9)
