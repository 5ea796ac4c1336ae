"""Every field and result name used across ``ase_race``, with its shape and unit.

Graph fields describe a batch of ``n_graphs`` structures holding ``n_atoms`` atoms and
``n_edges`` directed edges in total. Result names are the keys of
:attr:`ase_race.RACECalculator.results`; a name ending in ``_var`` is a variance (squared
units) and one ending in ``_std`` its square root, never the other way round.
"""

from typing import Final

# --- atomic graph fields -------------------------------------------------------------------
POSITIONS: Final[str] = "positions"  # (n_atoms, 3) Å
SPECIES: Final[str] = "species"  # (n_atoms,) int64, index into the model's species list
NUMBERS: Final[str] = "numbers"  # (n_atoms,) int64, atomic numbers Z
BATCH: Final[str] = "batch"  # (n_atoms,) int64, graph index of each atom
PTR: Final[str] = "ptr"  # (n_graphs + 1,) int64, first atom of each graph
EDGE_INDEX: Final[str] = "edge_index"  # (2, n_edges) int64, rows (sender j, receiver i)
EDGE_SHIFTS: Final[str] = "edge_shifts"  # (n_edges, 3) integer-valued, periodic image S of j
CELL: Final[str] = "cell"  # (n_graphs, 3, 3) Å, rows are lattice vectors
PBC: Final[str] = "pbc"  # (n_graphs, 3) bool

# --- per-atom and per-structure model outputs (before any posterior mixing) ------------------
NODE_ENERGY: Final[str] = "node_energy"  # (n_atoms,) eV, scale·e_i + shift + E0(Z_i)
NODE_LOG_VAR: Final[str] = "node_log_var"  # (n_atoms,) log(eV²), per-atom energy log-variance
ENERGY: Final[str] = "energy"  # (n_graphs,) eV
ENERGY_VAR: Final[str] = "energy_var"  # (n_graphs,) eV²
FORCES: Final[str] = "forces"  # (n_atoms, 3) eV/Å
FORCES_COV: Final[str] = "forces_cov"  # (n_atoms, 3, 3) (eV/Å)²
FEATURES: Final[str] = "features"  # (n_atoms, P) last-layer features φ (see RACE.outputs)
STRESS: Final[str] = "stress"  # (n_graphs, 3, 3) eV/Å³; the calculator reports 6 Voigt numbers
VIRIAL: Final[str] = "virial"  # (n_graphs, 3, 3) eV

# --- calculator results (ASE property names) --------------------------------------------
FREE_ENERGY: Final[str] = "free_energy"  # float eV, equal to energy (no electronic entropy)
ENERGIES: Final[str] = "energies"  # (n_atoms,) eV per-atom energy contributions
ENERGY_STD: Final[str] = "energy_std"  # float eV
ENERGY_VAR_ALEATORIC: Final[str] = "energy_var_aleatoric"  # float eV²
ENERGY_VAR_EPISTEMIC: Final[str] = "energy_var_epistemic"  # float eV²
FORCES_VAR: Final[str] = "forces_var"  # (n_atoms, 3) (eV/Å)², diagonal of forces_cov
FORCES_STD: Final[str] = "forces_std"  # (n_atoms, 3) eV/Å
FORCES_VAR_ALEATORIC: Final[str] = "forces_var_aleatoric"  # (n_atoms, 3) (eV/Å)²
FORCES_VAR_EPISTEMIC: Final[str] = "forces_var_epistemic"  # (n_atoms, 3) (eV/Å)²
STRESS_VAR: Final[str] = "stress_var"  # (6,) (eV/Å³)², Voigt order xx yy zz yz xz xy
MAX_FORCES_STD: Final[str] = "max_forces_std"  # float eV/Å, max_i sqrt(trace forces_cov_i)
ENERGY_ENSEMBLE: Final[str] = "energy_ensemble"  # (n_members,) eV, sampling posteriors only
FORCES_ENSEMBLE: Final[str] = "forces_ensemble"  # (n_members, n_atoms, 3) eV/Å
STRESS_ENSEMBLE: Final[str] = "stress_ensemble"  # (n_members, 6) eV/Å³ Voigt, periodic only
BALD_ENERGY: Final[str] = "bald_energy"  # float nats, mutual information of energy and weights
BALD_FORCES: Final[str] = "bald_forces"  # float nats, the same for the forces (summed over atoms)
BALD: Final[str] = "bald"  # float nats, bald_energy + bald_forces (BALD-EF)

# --- names under which uncertainties are copied into atoms.info / atoms.arrays ------------
INFO_PREFIX: Final[str] = "race_"  # e.g. atoms.info["race_energy_std"]
