"""Off-distribution probe structures built from one molecule: what a stress test labels.

Every builder returns :class:`Probe`\\ s: a structure, the kind of probe it belongs to, the name of
its scan and the scanned coordinate (a bond length or a pair distance in Å, a normal-mode
amplitude in Å, or the frame index of an MD run). Kinds:

* ``bond_stretch`` / ``bond_compress``: one bond of every element pair bonded in the molecule
  (d < 1.2 × the sum of covalent radii), the smaller fragment moved along the bond from the
  equilibrium length out to ``max_distance`` (to dissociation) or in to 0.7 r₀;
* ``atom_pair``: two atoms of every pair of the molecule's elements, alone, at a range of
  distances (the far ones are separated atoms);
* ``small_molecule``: other molecules of the same elements (``ase.build.molecule`` names);
* ``normal_mode``: displacements along the molecule's softest and stiffest normal modes (of
  the calculator that is given: the model's own Hessian by finite differences);
* ``md`` and ``hot_md``: Langevin frames at a normal and at a high temperature, driven by the
  given calculator.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.data import covalent_radii

KINDS = ("bond_stretch", "bond_compress", "atom_pair", "small_molecule", "normal_mode", "hot_md", "md")


@dataclass
class Probe:
    """One structure of a stress test. ``coordinate`` is in Å (or a frame index for MD)."""

    atoms: Atoms
    kind: str
    scan: str
    coordinate: float


def sound(probe: Probe, min_distance: float = 0.5) -> bool:
    """False for a probe with two atoms closer than ``min_distance`` Å (a broken structure that
    the calculator refuses, not a physical one)."""
    d = probe.atoms.get_all_distances()
    return len(probe.atoms) < 2 or d[np.triu_indices(len(probe.atoms), 1)].min() >= min_distance


def bonds(atoms: Atoms, factor: float = 1.2) -> list[tuple[int, int]]:
    """Index pairs (i < j) closer than ``factor`` × the sum of their covalent radii."""
    d = atoms.get_all_distances()
    radii = covalent_radii[atoms.numbers]
    return [(i, j) for i, j in itertools.combinations(range(len(atoms)), 2) if d[i, j] < factor * (radii[i] + radii[j])]


def bond_scans(atoms: Atoms, max_distance: float = 6.0, n_stretch: int = 8,
               compress: tuple[float, ...] = (0.7, 0.8, 0.9), first_stretch: float = 1.1) -> list[Probe]:
    """Pull one bond of every bonded element pair to ``max_distance`` Å and compress it.

    The bond is cut and the smaller of the two fragments it leaves (the hydrogen of a C–H
    bond, the CH₃ of ethanol's C–C bond) is moved rigidly along the bond axis, so that a pull
    is a dissociation into the two fragments; in a ring, only the bond's terminal atom moves.
    Stretched lengths are evenly spaced from ``first_stretch`` × r₀ to ``max_distance``;
    compressed ones are ``compress`` × r₀.
    """
    pairs = bonds(atoms)
    seen, probes = set(), []
    symbols = atoms.get_chemical_symbols()
    for i, j in pairs:
        name = "–".join(sorted((symbols[i], symbols[j])))
        if name in seen:
            continue
        seen.add(name)
        side_i, side_j = _fragment(pairs, i, (i, j)), _fragment(pairs, j, (i, j))
        if side_i & side_j:  # a ring: the bond does not cut the molecule
            fixed, moved, fragment = i, j, {j}
        else:
            (fixed, _), (moved, fragment) = sorted(((i, side_i), (j, side_j)), key=lambda t: (-len(t[1]), t[0]))
        fragment = sorted(fragment)
        axis = atoms.positions[moved] - atoms.positions[fixed]
        r0 = float(np.linalg.norm(axis))
        axis /= r0
        lengths = [("bond_compress", f * r0) for f in compress]
        lengths += [("bond_stretch", r) for r in np.linspace(first_stretch * r0, max(max_distance, 1.2 * r0), n_stretch)]
        for kind, r in lengths:
            probe = atoms.copy()
            probe.positions[fragment] += (r - r0) * axis
            probes.append(Probe(probe, kind, f"{name} bond ({symbols[fixed]}{fixed}–{symbols[moved]}{moved})", float(r)))
    return probes


def _fragment(pairs, start: int, cut: tuple[int, int]) -> set[int]:
    """Atoms reachable from ``start`` along ``pairs`` without crossing the bond ``cut``."""
    seen, todo = {start}, [start]
    while todo:
        a = todo.pop()
        for i, j in pairs:
            if (i, j) == cut:
                continue
            for x, y in ((i, j), (j, i)):
                if x == a and y not in seen:
                    seen.add(y)
                    todo.append(y)
    return seen


def atom_pairs(elements, distances: tuple[float, ...] = (0.9, 1.2, 1.6, 2.2, 3.0, 4.5, 6.0)) -> list[Probe]:
    """Two atoms of every pair of ``elements`` (symbols or numbers) at each of ``distances`` Å."""
    symbols = sorted({Atoms([e]).get_chemical_symbols()[0] for e in elements}, key=lambda s: Atoms(s).numbers[0])
    probes = []
    for a, b in itertools.combinations_with_replacement(symbols, 2):
        for r in distances:
            probes.append(Probe(Atoms(a + b, positions=[[0, 0, 0], [0, 0, r]]), "atom_pair", f"{a}–{b} pair", float(r)))
    return probes


def small_molecules(names: Sequence[str]) -> list[Probe]:
    """The molecules ``names`` (``ase.build.molecule`` names, e.g. "H2O", "CH3OH") at their
    tabulated geometries, one probe each."""
    from ase.build import molecule

    return [Probe(molecule(name), "small_molecule", name, 0.0) for name in names]


def hessian(atoms: Atoms, calc, delta: float = 0.005) -> np.ndarray:
    """(3n, 3n) eV/Å² by central differences of the forces of ``calc``."""
    n = len(atoms)
    h = np.zeros((3 * n, 3 * n))
    work = atoms.copy()
    work.calc = calc
    for k in range(3 * n):
        rows = []
        for sign in (1, -1):
            work.positions = atoms.positions.copy()
            work.positions[k // 3, k % 3] += sign * delta
            rows.append(work.get_forces().reshape(-1))
        h[k] = -(rows[0] - rows[1]) / (2 * delta)
    return 0.5 * (h + h.T)


def normal_mode_scans(atoms: Atoms, calc, n_soft: int = 3, n_stiff: int = 2,
                      amplitudes: tuple[float, ...] = (-0.45, -0.25, 0.25, 0.45, 0.7)) -> list[Probe]:
    """Displacements along normal modes of ``calc`` at ``atoms`` (ideally a minimum of it).

    The mass-weighted Hessian's eigenvectors, with the six (five for a linear molecule) of
    lowest |eigenvalue| (translations and rotations) left out, are turned back into Cartesian
    displacements and scaled so that the atom moving most moves ``amplitude`` Å.
    """
    masses = np.repeat(atoms.get_masses(), 3)
    weighted = hessian(atoms, calc) / np.sqrt(np.outer(masses, masses))
    # Project translations and rotations out (finite differences leave them slightly mixed in).
    rigid_space = _rigid_motions(atoms)
    projector = np.eye(len(masses)) - rigid_space @ rigid_space.T
    values, vectors = np.linalg.eigh(projector @ weighted @ projector)
    rigid = rigid_space.shape[1]
    order = np.argsort(np.abs(values))[rigid:]
    order = order[np.argsort(values[order])]
    chosen = list(order[:n_soft]) + [m for m in order[::-1][:n_stiff] if m not in order[:n_soft]]
    probes = []
    for rank, m in enumerate(chosen):
        shape = (vectors[:, m] / np.sqrt(masses)).reshape(-1, 3)
        shape /= np.abs(np.linalg.norm(shape, axis=1)).max()
        # 1 eV/(Å² amu) = 9.6485e27 s⁻²; ν̃ = ω / (2πc) with c in cm/s
        wavenumber = np.sign(values[m]) * np.sqrt(abs(values[m]) * 9.648533e27) / (2 * np.pi * 2.99792458e10)
        for a in amplitudes:
            probe = atoms.copy()
            probe.positions = atoms.positions + a * shape
            probes.append(Probe(probe, "normal_mode", f"mode {m} ({wavenumber:.0f} cm⁻¹)", float(a)))
    return probes


def _rigid_motions(atoms: Atoms) -> np.ndarray:
    """Orthonormal (3n, k) basis of mass-weighted translations and rotations (k = 5 or 6)."""
    sqrt_m = np.sqrt(atoms.get_masses())
    r = atoms.positions - atoms.get_center_of_mass()
    motions = []
    for axis in np.eye(3):
        motions.append((sqrt_m[:, None] * axis).ravel())
        motions.append((sqrt_m[:, None] * np.cross(axis, r)).ravel())
    q, s, _ = np.linalg.svd(np.array(motions).T, full_matrices=False)
    return q[:, s > 1e-6 * s.max()]


def md_frames(atoms: Atoms, calc, temperature: float, n_frames: int, interval: int = 20, timestep_fs: float = 0.5,
              seed: int = 0, kind: str = "md") -> list[Probe]:
    """``n_frames`` Langevin frames every ``interval`` steps at ``temperature`` K, driven by ``calc``."""
    from ase import units
    from ase.md.langevin import Langevin
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE before 3.28
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    work = atoms.copy()
    work.calc = calc
    rng = np.random.default_rng(seed)
    thermalize_momenta(work, temperature_K=temperature, rng=rng)
    dyn = Langevin(work, timestep_fs * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    probes = []
    for k in range(n_frames):
        dyn.run(interval)
        frame = work.copy()
        frame.calc = None
        probes.append(Probe(frame, kind, f"{kind} at {temperature:.0f} K", float(k)))
    return probes
