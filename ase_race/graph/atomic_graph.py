"""``ase.Atoms`` → atomic graph tensors, input checks, and batching.

An *atomic graph* is a plain ``dict[str, torch.Tensor]`` keyed by the names in
:mod:`ase_race._keys`; one graph may hold several structures (``batch``/``ptr``). Edge ``e``
joins centre ``edge_index[0, e] = i`` to neighbour ``edge_index[1, e] = j`` with vector
``r_j − r_i + edge_shifts[e] · cell[batch[i]]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from .. import _keys as K
from ..errors import StructureError, UnknownElementError
from .neighbours import Edges, NeighbourCache, vesin_edges

AtomicGraph = dict[str, torch.Tensor]

#: Two atoms closer than this (Å) are refused as overlapping. The shortest real bond (H₂) is
#: 0.74 Å; anything much below that is a broken structure, and the radial basis (∝ 1/r)
#: would return meaningless, huge values.
MIN_DISTANCE = 0.5


def check_atoms(atoms: Atoms, species: Sequence[int]) -> None:
    """Raise :class:`StructureError` for input no model can evaluate.

    Checks: NaN/inf positions or cell, a periodic cell whose periodic vectors span no volume,
    and elements not in ``species`` (atomic numbers).
    """
    positions = atoms.positions
    if not np.all(np.isfinite(positions)):
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        raise StructureError(f"positions of atoms {bad[:10].tolist()} are NaN or infinite")
    cell = np.asarray(atoms.cell)
    if not np.all(np.isfinite(cell)):
        raise StructureError("the cell contains NaN or infinite values")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        periodic = cell[pbc]
        # Gram determinant: squared volume/area/length spanned by the periodic vectors.
        gram = np.linalg.det(periodic @ periodic.T)
        if not gram > 1e-12:
            raise StructureError(
                f"the cell has zero volume along its periodic directions (pbc={pbc.tolist()}, "
                f"cell={cell.tolist()}); set a real cell or turn pbc off"
            )
    unknown = sorted(set(atoms.numbers.tolist()) - set(species))
    if unknown:
        raise UnknownElementError(
            f"element(s) {[chemical_symbols[z] for z in unknown]} not known to this model, "
            f"which knows {[chemical_symbols[z] for z in species]}"
        )


def check_distances(edges: Edges, min_distance: float = MIN_DISTANCE) -> None:
    """Raise :class:`StructureError` if any edge is shorter than ``min_distance`` (Å)."""
    if len(edges.i) == 0 or min_distance <= 0:
        return
    d2 = np.einsum("ec,ec->e", edges.vectors, edges.vectors)
    e = int(np.argmin(d2))
    if d2[e] < min_distance**2:
        raise StructureError(
            f"atoms {edges.i[e]} and {edges.j[e]} are {np.sqrt(d2[e]):.3f} Å apart, closer than "
            f"the minimum distance {min_distance} Å; the structure looks broken "
            "(pass min_distance to change the limit)"
        )


def species_index(numbers: np.ndarray, species: Sequence[int]) -> np.ndarray:
    """Map atomic numbers to indices into ``species`` (which must contain all of them)."""
    lookup = np.full(max(max(species), int(numbers.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[np.asarray(species)] = np.arange(len(species))
    return lookup[numbers]


def from_atoms(
    atoms: Atoms,
    species: Sequence[int],
    cutoff: float,
    *,
    cache: NeighbourCache | None = None,
    min_distance: float = MIN_DISTANCE,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> AtomicGraph:
    """Build the graph of one structure.

    Args:
        atoms: the structure; not modified.
        species: atomic numbers known to the model (defines the ``species`` index).
        cutoff: neighbour cutoff r_c (Å).
        cache: optional :class:`NeighbourCache` (same cutoff) reused between calls, e.g. in MD.
        min_distance: shortest allowed interatomic distance (Å).
        dtype, device: of the floating-point tensors.
    """
    check_atoms(atoms, species)
    positions = atoms.positions
    cell = np.asarray(atoms.cell, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if cache is not None:
        edges = cache.edges(positions, cell, pbc)
    else:
        edges = vesin_edges(positions, cell, pbc, cutoff)
    check_distances(edges, min_distance)
    n = len(atoms)
    numbers = atoms.numbers.astype(np.int64)
    as_long = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)  # noqa: E731
    return {
        K.POSITIONS: torch.as_tensor(positions, dtype=dtype, device=device),
        K.NUMBERS: as_long(numbers),
        K.SPECIES: as_long(species_index(numbers, species)),
        K.BATCH: torch.zeros(n, dtype=torch.long, device=device),
        K.PTR: as_long(np.array([0, n])),
        K.EDGE_INDEX: as_long(np.stack([edges.i, edges.j])),
        K.EDGE_SHIFTS: torch.as_tensor(edges.shifts, dtype=dtype, device=device),
        K.CELL: torch.as_tensor(cell, dtype=dtype, device=device).unsqueeze(0),
        K.PBC: torch.as_tensor(pbc, device=device).unsqueeze(0),
    }


def batch_graphs(graphs: Sequence[AtomicGraph]) -> AtomicGraph:
    """Concatenate graphs (each possibly a batch already) into one batch.

    Edge indices and batch numbers are offset so that the result evaluates to the same
    per-structure energies as the inputs evaluated one by one.
    """
    if not graphs:
        raise ValueError("batch_graphs needs at least one graph")
    atom_offset, graph_offset = 0, 0
    edge_index, batch, ptr = [], [], [graphs[0][K.PTR][:1]]
    for g in graphs:
        edge_index.append(g[K.EDGE_INDEX] + atom_offset)
        batch.append(g[K.BATCH] + graph_offset)
        ptr.append(g[K.PTR][1:] + atom_offset)
        atom_offset += g[K.POSITIONS].shape[0]
        graph_offset += g[K.CELL].shape[0]
    cat = lambda key: torch.cat([g[key] for g in graphs])  # noqa: E731
    return {
        K.POSITIONS: cat(K.POSITIONS),
        K.NUMBERS: cat(K.NUMBERS),
        K.SPECIES: cat(K.SPECIES),
        K.BATCH: torch.cat(batch),
        K.PTR: torch.cat(ptr),
        K.EDGE_INDEX: torch.cat(edge_index, dim=1),
        K.EDGE_SHIFTS: cat(K.EDGE_SHIFTS),
        K.CELL: cat(K.CELL),
        K.PBC: cat(K.PBC),
    }


def num_graphs(graph: AtomicGraph) -> int:
    return int(graph[K.CELL].shape[0])
