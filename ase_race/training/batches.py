"""Training batches: precomputed graphs of labelled frames, collated with their references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import _keys as K
from ..data import Frame
from ..graph import AtomicGraph, batch_graphs, from_atoms


@dataclass
class Batch:
    """A collated batch: the graph and the reference labels (float64 energies).

    ``ref``: ``energy`` (B,), ``forces`` (n, 3), ``weight`` (B,), ``atom_weight`` (n,).
    """

    graph: AtomicGraph
    ref: dict[str, torch.Tensor]

    @property
    def n_structures(self) -> int:
        return int(self.ref["energy"].shape[0])


class GraphDataset:
    """Frames turned into graphs once (positions do not change during training)."""

    def __init__(self, frames: Sequence[Frame], species: Sequence[int], cutoff: float, dtype: torch.dtype):
        self.frames = list(frames)
        self.dtype = dtype
        self.graphs = [from_atoms(f.atoms, species, cutoff, dtype=dtype) for f in self.frames]

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Batch:
        frames = [self.frames[i] for i in indices]
        graph = batch_graphs([self.graphs[i] for i in indices])
        n_atoms = torch.tensor([len(f.atoms) for f in frames])
        weight = torch.tensor([f.weight for f in frames], dtype=self.dtype)
        ref = {
            "energy": torch.tensor([f.energy for f in frames], dtype=torch.float64),
            "forces": torch.as_tensor(np.concatenate([f.forces for f in frames]), dtype=self.dtype),
            "weight": weight,
            "atom_weight": torch.repeat_interleave(weight, n_atoms),
        }
        return Batch(
            {k: v.to(device) for k, v in graph.items()},
            {k: v.to(device) for k, v in ref.items()},
        )

    def batches(self, batch_size: int, device="cpu"):
        """Consecutive batches in file order (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))), device)


def predictions_for_loss(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "energy": out[K.ENERGY],
        "energy_var": out[K.ENERGY_VAR],
        "forces": out[K.FORCES],
        "forces_cov": out[K.FORCES_COV],
    }
