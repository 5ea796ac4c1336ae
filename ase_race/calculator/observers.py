"""Keep uncertainties with the structures: copy them into ``atoms.info`` / ``atoms.arrays``.

ASE's extxyz and trajectory writers store only standard calculator properties, so the
variances a ``RACECalculator`` reports would be dropped. :func:`store_uncertainties` copies
them under ``race_``-prefixed names, which extxyz keeps (scalars as frame info, per-atom arrays
as columns):

=============================== ============ ===========
atoms.info key                  type         unit
=============================== ============ ===========
race_energy_var                 float        eV²
race_energy_std                 float        eV
race_energy_var_aleatoric       float        eV²
race_energy_var_epistemic       float        eV²
race_max_forces_std             float        eV/Å
race_stress_var (periodic only) (6,)         (eV/Å³)²
=============================== ============ ===========

``atoms.arrays`` gets ``race_forces_var``, ``race_forces_std``, ``race_forces_var_aleatoric``
and ``race_forces_var_epistemic``, each (n, 3).
"""

from __future__ import annotations

from ase import Atoms
from ase.io import write

from .. import _keys as K
from ..errors import RaceError

INFO_KEYS = (
    K.ENERGY_VAR, K.ENERGY_STD, K.ENERGY_VAR_ALEATORIC, K.ENERGY_VAR_EPISTEMIC, K.MAX_FORCES_STD, K.STRESS_VAR,
    K.BALD_ENERGY, K.BALD_FORCES, K.BALD,
)  # fmt: skip
ARRAY_KEYS = (K.FORCES_VAR, K.FORCES_STD, K.FORCES_VAR_ALEATORIC, K.FORCES_VAR_EPISTEMIC)


def store_uncertainties(atoms: Atoms) -> Atoms:
    """Copy the uncertainties of ``atoms.calc`` for the current geometry into ``atoms``
    (returns it). If the atoms changed since the last calculation, they are evaluated first.

    Raises ``RuntimeError`` if the atoms have no RACECalculator attached.
    """
    calc = atoms.calc
    if calc is None or K.ENERGY_VAR not in calc.implemented_properties:
        raise RuntimeError("atoms have no RACECalculator attached")
    if K.ENERGY_VAR not in calc.results or calc.check_state(atoms):
        atoms.get_potential_energy()
    for key in INFO_KEYS:
        if key in calc.results:
            atoms.info[K.INFO_PREFIX + key] = calc.results[key]
    for key in ARRAY_KEYS:
        atoms.arrays[K.INFO_PREFIX + key] = calc.results[key].copy()
    return atoms


class UncertaintyWriter:
    """Dynamics observer that appends the current frame, with uncertainties, to an extxyz file.

    Usage: ``dyn.attach(UncertaintyWriter(atoms, "md.extxyz"), interval=10)``.
    """

    def __init__(self, atoms: Atoms, filename: str, append: bool = False):
        self.atoms = atoms
        self.filename = filename
        self._first = not append

    def __call__(self) -> None:
        store_uncertainties(self.atoms)
        write(self.filename, self.atoms, format="extxyz", append=not self._first)
        self._first = False


class UncertaintyLog:
    """Dynamics observer that records the uncertainty along a trajectory.

    Each call appends one row: ``step``, ``time_fs``, ``temperature_K``, ``energy`` (eV,
    potential), ``energy_std`` (eV), ``max_forces_std`` (eV/Å) and ``epistemic_share`` (the
    epistemic fraction of the total force variance; 0 for a single model). Usage:
    ``dyn.attach(UncertaintyLog(atoms, dyn), interval=10)``.
    """

    FIELDS = ("step", "time_fs", "temperature_K", "energy", "energy_std", "max_forces_std", "epistemic_share")

    def __init__(self, atoms: Atoms, dynamics=None):
        self.atoms = atoms
        self.dynamics = dynamics
        self.rows: list[dict[str, float]] = []

    def __call__(self) -> None:
        self.rows.append(self.row())

    def row(self) -> dict[str, float]:
        """The current values (the calculator's results for the current geometry)."""
        from ase import units

        calc = self.atoms.calc
        if K.ENERGY_VAR not in calc.results or calc.check_state(self.atoms):
            self.atoms.get_potential_energy()
        results = calc.results
        step = self.dynamics.nsteps if self.dynamics is not None else len(self.rows)
        dt = self.dynamics.dt if self.dynamics is not None else 0.0
        total = float(results[K.FORCES_VAR].sum())
        return {
            "step": step,
            "time_fs": step * dt / units.fs,
            "temperature_K": float(self.atoms.get_temperature()),
            "energy": float(results[K.ENERGY]),
            "energy_std": float(results[K.ENERGY_STD]),
            "max_forces_std": float(results[K.MAX_FORCES_STD]),
            "epistemic_share": float(results[K.FORCES_VAR_EPISTEMIC].sum()) / total if total > 0 else 0.0,
        }


class UncertaintyExceeded(RaceError):
    """Raised by :class:`UncertaintyStop`: the run left the region where the model is trusted."""

    def __init__(self, step: int, quantity: str, value: float, threshold: float):
        super().__init__(f"step {step}: {quantity} = {value:.4g} exceeds the threshold {threshold:.4g}")
        self.step, self.quantity, self.value, self.threshold = step, quantity, value, threshold


class UncertaintyStop:
    """Dynamics/optimiser observer that stops the run when the model becomes unsure.

    At every call it compares ``quantity`` of the current structure (``max_forces_std``, eV/Å:
    max over atoms of √trace of the force covariance; or ``energy_std``, eV) with
    ``threshold`` and raises :class:`UncertaintyExceeded` at the first value above it, which
    ends ``dyn.run`` at that step; the atoms keep that step's structure. Attach with
    ``interval=1`` to stop at the first step above it: ``dyn.attach(UncertaintyStop(atoms, 0.5, dynamics=dyn))``.
    """

    def __init__(self, atoms: Atoms, threshold: float, quantity: str = K.MAX_FORCES_STD, dynamics=None):
        if quantity not in (K.MAX_FORCES_STD, K.ENERGY_STD):
            raise ValueError(f"quantity must be {K.MAX_FORCES_STD!r} or {K.ENERGY_STD!r}, got {quantity!r}")
        self.atoms, self.threshold, self.quantity, self.dynamics = atoms, float(threshold), quantity, dynamics
        self.calls = 0

    def __call__(self) -> None:
        calc = self.atoms.calc
        if K.ENERGY_VAR not in calc.results or calc.check_state(self.atoms):
            self.atoms.get_potential_energy()
        value = float(calc.results[self.quantity])
        step = self.dynamics.nsteps if self.dynamics is not None else self.calls
        self.calls += 1
        if value > self.threshold:
            raise UncertaintyExceeded(step, self.quantity, value, self.threshold)
