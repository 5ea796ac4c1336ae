"""rMD17 (revised MD17) .npz files → extxyz with REF_energy / REF_forces in eV and eV/Å.

The npz files store energies in kcal/mol and forces in kcal/mol/Å (forces, not gradients);
``old_energies``/``old_forces`` (the noisy original MD17 labels) are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write
from ase.units import kcal, mol

KCAL_MOL = kcal / mol  # eV per kcal/mol


def npz_to_frames(path: str | Path) -> list[Atoms]:
    data = np.load(path)
    frames = []
    for k in range(len(data["energies"])):
        atoms = Atoms(numbers=data["nuclear_charges"], positions=data["coords"][k])
        atoms.info["REF_energy"] = float(data["energies"][k]) * KCAL_MOL
        atoms.arrays["REF_forces"] = data["forces"][k] * KCAL_MOL
        frames.append(atoms)
    return frames


def convert(data_dir: Path, out_dir: Path, molecule: str = "ethanol", split: str = "01") -> dict[str, Path]:
    """Write ``train.extxyz`` (train_SPLIT), ``test.extxyz`` (test_SPLIT) and ``e0s.extxyz``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part in ("train", "test"):
        paths[part] = out_dir / f"{part}.extxyz"
        write(paths[part], npz_to_frames(data_dir / f"rmd17_{molecule}_{part}_{split}.npz"), format="extxyz")
    paths["e0s"] = data_dir / "isolated_atoms_PBE_def2-SVP.xyz"
    return paths
