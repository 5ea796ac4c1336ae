"""Acquisition functions over a pool of structures (docs/active_learning.md).

Scores (higher = more worth labelling):

    random     uniform random numbers (the baseline)
    energy-std the predictive energy std σ_E (eV)
    bald-e     BALD of the energy (nats)         see :mod:`ase_race.posteriors.bald`
    bald-f     BALD of the forces (nats, summed over atoms)
    bald-ef    their sum

:func:`select` takes the ``n`` best, or, with ``diversity`` > 0, picks greedily and divides a
candidate's score by 1 + diversity·(similarity to the nearest already chosen structure), with
similarity exp(−d²/ℓ²) between radial-distribution descriptors (d the Euclidean distance, ℓ
the median pool distance): near-duplicates of a chosen structure drop down the ranking.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

from .. import _keys as K

STRATEGIES = ("random", "energy-std", "bald-e", "bald-f", "bald-ef")
_RESULT = {"energy-std": K.ENERGY_STD, "bald-e": K.BALD_ENERGY, "bald-f": K.BALD_FORCES, "bald-ef": K.BALD}


def acquisition_scores(calc, pool: list[Atoms], strategy: str, seed: int = 0) -> np.ndarray:
    """One score per structure of ``pool`` from a RACE calculator (``random`` needs none)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy == "random":
        return np.random.default_rng(seed).random(len(pool))
    scores = np.empty(len(pool))
    for k, atoms in enumerate(pool):
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
        scores[k] = float(calc.results[_RESULT[strategy]])
    return scores


def rdf_descriptor(atoms: Atoms, r_max: float = 6.0, bins: int = 48) -> np.ndarray:
    """Histogram of interatomic distances below ``r_max`` (minimum image), per atom."""
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))[np.triu_indices(len(atoms), 1)]
    hist, _ = np.histogram(d[d < r_max], bins=bins, range=(0.0, r_max))
    return hist / max(len(atoms), 1)


def select(scores, n: int, diversity: float = 0.0, descriptors: np.ndarray | None = None) -> list[int]:
    """Indices of the ``n`` structures to label, best first.

    Args:
        scores: (N,) acquisition scores.
        n: how many to pick (at most N).
        diversity: 0 = plain top-n; > 0 = greedy with the similarity penalty (needs descriptors).
        descriptors: (N, D) structure descriptors (e.g. :func:`rdf_descriptor`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = min(int(n), scores.size)
    if diversity <= 0:
        return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]
    if descriptors is None:
        raise ValueError("diversity > 0 needs descriptors")
    x = np.asarray(descriptors, dtype=np.float64)
    dist2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scale = np.median(dist2[np.triu_indices(len(x), 1)]) if len(x) > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    similarity = np.exp(-dist2 / scale)
    # Scores may be negative (BALD of nearly identical members): shift so the penalty divides
    # a positive number.
    positive = scores - scores.min() + 1e-12
    chosen: list[int] = []
    nearest = np.zeros(scores.size)
    for _ in range(n):
        adjusted = positive / (1.0 + diversity * nearest)
        adjusted[chosen] = -np.inf
        best = int(np.argmax(adjusted))
        chosen.append(best)
        nearest = np.maximum(nearest, similarity[best])
    return chosen
