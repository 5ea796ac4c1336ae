"""Reusable contract checks for ``ase_race`` models and posteriors.

Used by the project's tests and available to plug-ins. Library code never imports this module.
Nothing here touches torch's global RNG or default dtype: seeded work runs inside
``torch.random.fork_rng``.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

from .config import ModelConfig
from .nn import RACE, build_model
from .posteriors import MVEPosterior


def random_model(config: ModelConfig, seed: int = 0) -> RACE:
    """A RACE network with seeded random weights; the global RNG state is left unchanged."""
    return build_model(config, seed)


def random_posterior(preset: str = "tiny", seed: int = 0, **overrides) -> MVEPosterior:
    """An MVE posterior around :func:`random_model` built from a preset plus overrides."""
    return MVEPosterior(random_model(ModelConfig.from_preset(preset, **overrides), seed))


def random_orthogonal(seed: int, reflect: bool = False) -> np.ndarray:
    """A random 3×3 rotation (det +1), or rotation-reflection (det −1) when ``reflect``."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if reflect else q


def transform(atoms: Atoms, rotation: np.ndarray, translation=(0.0, 0.0, 0.0), permutation=None) -> Atoms:
    """Copy of ``atoms`` with r → R r + t (cell rows rotated too) and atoms reordered."""
    out = atoms.copy()
    out.calc = None
    out.positions = atoms.positions @ rotation.T + np.asarray(translation)
    out.cell = atoms.cell.array @ rotation.T
    if permutation is not None:
        out = out[np.asarray(permutation)]
    return out


def finite_difference_forces(atoms: Atoms, delta: float = 1e-4) -> np.ndarray:
    """−∂E/∂r by central differences with ``atoms.calc``; (n, 3) eV/Å."""
    work = atoms.copy()
    work.calc = atoms.calc
    forces = np.zeros((len(atoms), 3))
    for a in range(len(atoms)):
        for c in range(3):
            energies = []
            for sign in (1, -1):
                work.positions[a, c] = atoms.positions[a, c] + sign * delta
                energies.append(work.get_potential_energy())
            work.positions[a, c] = atoms.positions[a, c]
            forces[a, c] = -(energies[0] - energies[1]) / (2 * delta)
    return forces


def finite_strain_stress(atoms: Atoms, delta: float = 1e-5) -> np.ndarray:
    """(1/V) ∂E/∂ε by central differences of symmetric strains; Voigt (6,) eV/Å³."""
    work = atoms.copy()
    work.calc = atoms.calc
    cell0, volume = atoms.cell.array.copy(), atoms.get_volume()
    stress = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[i, j] += sign * delta
                work.set_cell(cell0 @ strain, scale_atoms=True)
                energies.append(work.get_potential_energy())
            stress[i, j] = (energies[0] - energies[1]) / (2 * delta) / volume
    stress = 0.5 * (stress + stress.T)
    return stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
