"""Neighbour lists: vesin for production, a brute-force reference for tests, and a skin cache.

Convention (shared by every module): an edge ``(i, j, S)`` links centre atom ``i`` to
neighbour ``j`` in periodic image ``S`` (integers), with the edge vector

    r_ij = r_j − r_i + S · cell            (Å; ``cell`` rows are lattice vectors)

and ``|r_ij| < cutoff``. Lists are *full*: both ``(i, j, S)`` and ``(j, i, −S)`` appear. An atom
may neighbour several images of another atom (or of itself) when the cell is smaller than the
cutoff.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import vesin


@dataclass(frozen=True)
class Edges:
    """A neighbour list. ``i``, ``j``: (n_edges,) int64; ``shifts``: (n_edges, 3) int64;
    ``vectors``: (n_edges, 3) Å, the edge vectors r_ij at the positions the list was made for."""

    i: np.ndarray
    j: np.ndarray
    shifts: np.ndarray
    vectors: np.ndarray

    def within(self, cutoff: float) -> "Edges":
        """The subset of edges shorter than ``cutoff``."""
        keep = np.einsum("ec,ec->e", self.vectors, self.vectors) < cutoff * cutoff
        return Edges(self.i[keep], self.j[keep], self.shifts[keep], self.vectors[keep])


def _box_for_vesin(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """vesin needs a usable box even along non-periodic directions; those vectors are ignored
    for images, so replace any that are zero with an orthogonal unit vector."""
    box = np.array(cell, dtype=np.float64)
    if pbc.all() or not pbc.any():
        return box if pbc.any() else np.zeros((3, 3))
    for d in np.flatnonzero(~pbc):
        if np.linalg.norm(box[d]) < 1e-12:
            others = [box[k] for k in range(3) if k != d]
            normal = np.cross(others[0], others[1])
            if np.linalg.norm(normal) < 1e-12:  # two vectors missing: pick a spare axis
                normal = np.eye(3)[d]
            box[d] = normal / np.linalg.norm(normal)
    return box


def vesin_edges(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Edges:
    """Full neighbour list from vesin.

    Args:
        positions: (n_atoms, 3) Å.
        cell: (3, 3) Å, rows are lattice vectors (ignored where ``pbc`` is False).
        pbc: (3,) bool.
        cutoff: Å.
    """
    pbc = np.asarray(pbc, dtype=bool)
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts, vectors = nl.compute(
        np.ascontiguousarray(positions, dtype=np.float64),
        _box_for_vesin(cell, pbc),
        [bool(p) for p in pbc],
        quantities="ijSD",
    )
    return Edges(i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64), vectors)


def brute_force_edges(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> Edges:
    """O(N² · images) reference list, for tests. Same convention as :func:`vesin_edges`."""
    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cell = _box_for_vesin(cell, pbc)
    reach = []
    for d in range(3):
        if not pbc[d]:
            reach.append(range(1))
            continue
        # Distance between the lattice planes spanned by the other two vectors.
        normal = np.cross(cell[(d + 1) % 3], cell[(d + 2) % 3])
        spacing = abs(cell[d] @ normal) / np.linalg.norm(normal)
        n = int(np.ceil(cutoff / spacing))
        reach.append(range(-n, n + 1))
    out_i, out_j, out_s, out_v = [], [], [], []
    for s in itertools.product(*reach):
        s = np.array(s, dtype=np.int64)
        d_vec = positions[None, :, :] - positions[:, None, :] + s @ cell
        dist = np.linalg.norm(d_vec, axis=-1)
        mask = dist < cutoff
        if not s.any():
            np.fill_diagonal(mask, False)
        ii, jj = np.nonzero(mask)
        out_i.append(ii)
        out_j.append(jj)
        out_s.append(np.repeat(s[None], len(ii), axis=0))
        out_v.append(d_vec[ii, jj])
    return Edges(
        np.concatenate(out_i).astype(np.int64),
        np.concatenate(out_j).astype(np.int64),
        np.concatenate(out_s).reshape(-1, 3),
        np.concatenate(out_v).reshape(-1, 3),
    )


class NeighbourCache:
    """Reuses one neighbour list while atoms move less than half a skin.

    The list is built with ``cutoff + skin``. While the cell, pbc and atom count are unchanged and
    no atom has moved more than ``skin / 2`` since the build, no pair can have come from beyond
    ``cutoff + skin`` to within ``cutoff``, so filtering the stored pairs by their current length
    gives exactly the list a fresh build would. ``n_builds`` counts the vesin calls.
    """

    def __init__(self, cutoff: float, skin: float = 0.5):
        if skin < 0:
            raise ValueError(f"skin must be non-negative, got {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.n_builds = 0
        self._ref_positions: np.ndarray | None = None
        self._ref_cell: np.ndarray | None = None
        self._ref_pbc: np.ndarray | None = None
        self._edges: Edges | None = None

    def _still_valid(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        if self._edges is None or self._ref_positions.shape != positions.shape:
            return False
        if not (np.array_equal(cell, self._ref_cell) and np.array_equal(pbc, self._ref_pbc)):
            return False
        moved = np.einsum("nc,nc->n", positions - self._ref_positions, positions - self._ref_positions)
        return float(moved.max(initial=0.0)) < (0.5 * self.skin) ** 2

    def edges(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> Edges:
        """Edges shorter than ``cutoff`` at ``positions`` (same arguments as :func:`vesin_edges`)."""
        positions = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        if not self._still_valid(positions, cell, pbc):
            self._edges = vesin_edges(positions, cell, pbc, self.cutoff + self.skin)
            self._ref_positions, self._ref_cell, self._ref_pbc = positions.copy(), cell.copy(), pbc.copy()
            self.n_builds += 1
        e = self._edges
        vectors = positions[e.j] - positions[e.i] + e.shifts @ cell
        return Edges(e.i, e.j, e.shifts, vectors).within(self.cutoff)

    def reset(self) -> None:
        """Forget the stored list (the next call rebuilds)."""
        self._edges = None
