"""Labelled structures for training and evaluation: readers (rMD17 ``.npz`` included), E0s and
dataset statistics. :func:`read_structures` is the one reader of structure files for every
command (``ase.Atoms``, labels kept); :func:`read_frames` turns them into labelled frames;
:func:`write_structures` is the one writer (extended XYZ, atomic)."""

from .e0 import dataset_statistics, fit_e0s, isolated_atom_e0s
from .readers import Frame, KeyMap, frames_from_pymatgen, read_frames, read_structures, read_vasprun, split_frames
from .rmd17 import read_rmd17, read_rmd17_atoms
from .writers import write_structures

__all__ = [
    "Frame",
    "KeyMap",
    "dataset_statistics",
    "fit_e0s",
    "frames_from_pymatgen",
    "isolated_atom_e0s",
    "read_frames",
    "read_rmd17",
    "read_rmd17_atoms",
    "read_structures",
    "read_vasprun",
    "split_frames",
    "write_structures",
]
