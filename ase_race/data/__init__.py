"""Labelled structures for training and evaluation: readers (rMD17 ``.npz`` included), E0s and
dataset statistics."""

from .e0 import dataset_statistics, fit_e0s, isolated_atom_e0s
from .readers import Frame, KeyMap, frames_from_pymatgen, read_frames, read_vasprun, split_frames
from .rmd17 import read_rmd17

__all__ = [
    "Frame",
    "KeyMap",
    "dataset_statistics",
    "fit_e0s",
    "frames_from_pymatgen",
    "isolated_atom_e0s",
    "read_frames",
    "read_rmd17",
    "read_vasprun",
    "split_frames",
]
