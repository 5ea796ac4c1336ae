"""Atomic graphs: neighbour lists and ``ase.Atoms`` → tensor conversion."""

from .atomic_graph import (
    MIN_DISTANCE,
    AtomicGraph,
    batch_graphs,
    check_atoms,
    from_atoms,
    num_graphs,
)
from .neighbours import Edges, NeighbourCache, brute_force_edges, vesin_edges

__all__ = [
    "MIN_DISTANCE",
    "AtomicGraph",
    "Edges",
    "NeighbourCache",
    "batch_graphs",
    "brute_force_edges",
    "check_atoms",
    "from_atoms",
    "num_graphs",
    "vesin_edges",
]
