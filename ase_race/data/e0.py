"""Isolated-atom energies (E0s) and the dataset statistics that set a model's scale."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataError
from ..graph.neighbours import vesin_edges
from .readers import Frame


def isolated_atom_e0s(frames: Sequence[Frame], species: Sequence[int], every_single_atom: bool = False) -> dict[int, float]:
    """E0 per element from single-atom frames marked ``config_type=IsolatedAtom``.

    ``every_single_atom`` takes every one-atom frame, marked or not: a file given as
    ``e0s_file`` holds nothing else (3BPA's ``iso_atoms.xyz`` has no ``config_type``).
    """
    e0s = {}
    for f in frames:
        if f.is_isolated_atom or (every_single_atom and len(f.atoms) == 1):
            if len(f.atoms) != 1:
                raise DataError(f"{f.source}: an IsolatedAtom frame must hold one atom, not {len(f.atoms)}")
            e0s[int(f.atoms.numbers[0])] = float(f.energy)
    missing = sorted(set(species) - set(e0s))
    if missing:
        raise DataError(f"no isolated-atom energy for atomic numbers {missing}")
    return {z: e0s[z] for z in species}


def fit_e0s(frames: Sequence[Frame], species: Sequence[int]) -> dict[int, float]:
    """Least-squares E0s: E ≈ Σ_Z count_Z · E0(Z) over the frames (minimum-norm solution when
    the composition does not determine every E0, e.g. one molecule type)."""
    counts = np.array([[np.count_nonzero(f.atoms.numbers == z) for z in species] for f in frames], float)
    energies = np.array([f.energy for f in frames])
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(e) for z, e in zip(species, solution)}


def dataset_statistics(frames: Sequence[Frame], e0s: dict[int, float], cutoff: float) -> dict[str, float]:
    """Statistics that set a model's normalisation.

    Returns:
        ``avg_num_neighbors``: N̄, mean neighbours within ``cutoff``;
        ``shift``: mean per-atom energy after removing E0s (eV);
        ``scale``: RMS force component (eV/Å; times 1 Å it is the energy scale), or the
        per-atom energy std when no forces are present.
    """
    if not frames:
        raise DataError("no training frames")
    n_edges = n_atoms = 0
    per_atom, forces = [], []
    for f in frames:
        a = f.atoms
        n_edges += len(vesin_edges(a.positions, a.cell.array, a.pbc, cutoff).i)
        n_atoms += len(a)
        if f.energy is not None:
            per_atom.append((f.energy - sum(e0s[int(z)] for z in a.numbers)) / len(a))
        if f.forces is not None:
            forces.append(f.forces.ravel())
    shift = float(np.mean(per_atom)) if per_atom else 0.0
    if forces:
        scale = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    else:
        scale = float(np.std(per_atom)) if len(per_atom) > 1 else 1.0
    return {"avg_num_neighbors": n_edges / n_atoms, "shift": shift, "scale": scale if scale > 0 else 1.0}
