"""The revised MD17 data set (rMD17): its ``.npz`` files as labelled structures, in eV and eV/Å.

Each file holds ``nuclear_charges`` (n,), ``coords`` (N, n, 3) in Å, ``energies`` (N,) in
kcal/mol and ``forces`` (N, n, 3) in kcal/mol/Å (forces, not gradients); ``old_energies`` /
``old_forces`` (the noisy original MD17 labels) are ignored. Labels are converted with
1 kcal/mol = ``KCAL_MOL`` eV. :func:`~ase_race.data.read_structures` (and so
:func:`~ase_race.data.read_frames` and every command that reads structures) reads ``.npz``
files through :func:`read_rmd17_atoms`; :func:`convert` writes a molecule's train and test files as extxyz with
``REF_energy`` / ``REF_forces``, the form the recipes in recipes/ read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io.formats import string2index
from ase.units import kcal, mol

from ..errors import DataError
from .readers import Frame, KeyMap, frame_from_atoms
from .writers import write_structures

KCAL_MOL = kcal / mol  # eV per kcal/mol
_KEYS = ("nuclear_charges", "coords", "energies", "forces")


def read_rmd17_atoms(path: str | Path, index: str | int | slice = ":") -> list[Atoms]:
    """The selected structures of an rMD17 ``.npz`` file as ``ase.Atoms`` (no cell, no pbc),
    with ``info["REF_energy"]`` in eV and ``arrays["REF_forces"]`` (n, 3) in eV/Å.

    ``index`` selects as in :func:`ase.io.read` (``":"``, ``"::5"``, ``-1``, a slice).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    with np.load(path) as data:
        missing = [k for k in _KEYS if k not in data.files]
        if missing:
            raise DataError(f"{path}: not an rMD17 file: it lacks {missing} (has {sorted(data.files)})")
        numbers, coords, energies, forces = (data[k] for k in _KEYS)
    picked = string2index(index) if isinstance(index, str) else index
    order = range(len(energies))[picked] if isinstance(picked, slice) else [range(len(energies))[picked]]
    frames = []
    for k in order:
        atoms = Atoms(numbers=numbers, positions=coords[k])
        atoms.info["REF_energy"] = float(energies[k]) * KCAL_MOL
        atoms.arrays["REF_forces"] = forces[k] * KCAL_MOL
        frames.append(atoms)
    return frames


def read_rmd17(path: str | Path, index: str | int | slice = ":") -> list[Frame]:
    """The selected structures of an rMD17 ``.npz`` file as frames (energy eV, forces eV/Å)."""
    return [
        frame_from_atoms(atoms, KeyMap(), source=f"{path}: frame {k}")
        for k, atoms in enumerate(read_rmd17_atoms(path, index))
    ]


def convert(data_dir: str | Path, out_dir: str | Path, molecule: str = "ethanol", split: str = "01") -> dict[str, Path]:
    """Write ``out_dir/train.extxyz`` (``rmd17_MOLECULE_train_SPLIT.npz``) and ``test.extxyz``.

    Returns the paths under ``train`` and ``test``, and under ``e0s`` the isolated-atom file
    of ``data_dir`` (``isolated_atoms_PBE_def2-SVP.xyz``, the rMD17 level of theory).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part in ("train", "test"):
        paths[part] = out_dir / f"{part}.extxyz"
        write_structures(paths[part], read_rmd17_atoms(data_dir / f"rmd17_{molecule}_{part}_{split}.npz"))
    paths["e0s"] = data_dir / "isolated_atoms_PBE_def2-SVP.xyz"
    return paths
