"""Isolated-atom energies (E0s) and the dataset statistics that set a model's scale."""

from __future__ import annotations

import warnings
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
    """Least-squares E0s: E ≈ Σ_Z count_Z · E0(Z) over the frames.

    When the compositions do not determine every E0 (the count matrix has rank below the
    number of species, e.g. every frame is the same molecule) the minimum-norm solution is
    returned, one arbitrary split of the energy among the elements, and a ``UserWarning`` says
    so and points to isolated-atom E0s (:func:`isolated_atom_e0s`).
    """
    counts = np.array([[np.count_nonzero(f.atoms.numbers == z) for z in species] for f in frames], float)
    energies = np.array([f.energy for f in frames])
    solution, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
    if rank < len(species):
        formulas = sorted({f.atoms.get_chemical_formula() for f in frames})
        shown = ", ".join(formulas[:3]) + (", ..." if len(formulas) > 3 else "")
        warnings.warn(
            f"fitted E0s are not determined by the data: the {len(frames)} frames have {len(formulas)} "
            f"composition(s) ({shown}), which fix only {rank} combination(s) of the {len(species)} "
            "per-element E0s, so the least-squares E0s split the energy among the elements arbitrarily "
            "(minimum-norm solution). Use isolated-atom energies instead: e0s: isolated in the training "
            "config, with IsolatedAtom frames (config_type=IsolatedAtom) in the training data or in an "
            "e0s_file (for rMD17: isolated_atoms_PBE_def2-SVP.xyz), or give e0s as a mapping element → eV",
            UserWarning,
            stacklevel=2,
        )
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
