"""Fall back to a reference calculator where the model is unsure, and keep what it says.

:class:`FallbackCalculator` evaluates the RACE model on every call. When the compared quantity
(``max_forces_std`` in eV/Å by default, or ``energy_std`` in eV) is above the threshold, and
the spacing and budget allow, it calls the reference calculator instead, returns the
reference energy and forces for that step (with the model's uncertainties alongside), and
appends the labelled structure to a dataset file through :class:`LabelledFrames`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.io import read, write

from .. import _keys as K
from .._atomic import atomic_write_bytes
from ..errors import PredictionError, RaceError, TrainingError
from .ase_calc import RACECalculator

log = logging.getLogger("ase_race.fallback")

POLICIES = ("model", "retry", "stop")


def structure_key(atoms: Atoms) -> str:
    """A fingerprint of numbers, positions (to 1e-6 Å), cell and pbc, for de-duplication."""
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(atoms.positions, dtype=np.float64), 6).tobytes())
    h.update(np.round(np.asarray(atoms.cell[:], dtype=np.float64), 6).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    return h.hexdigest()


def reference_fingerprint(calc) -> str:
    """Which reference labelled a frame: its class and parameters (``todict``), hashed.

    A stored label is reused only for the same fingerprint, so a run never takes the labels of
    another reference, or of the same one with other settings, from a shared dataset.
    """
    try:
        params = calc.todict()
    except Exception:  # a calculator without ASE's parameter dictionary: its class alone
        params = {}
    text = type(calc).__name__ + repr(sorted((str(k), repr(v)) for k, v in params.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LabelledFrames:
    """An extxyz dataset that only ever grows by whole frames.

    Each append writes the old content plus the new frame to a temporary file in the same
    folder, fsyncs it and renames it over the dataset (:mod:`ase_race._atomic`): a crash leaves
    either the old or the new file, never a truncated frame. There is no lock: two processes
    appending to one file at the same moment each write a whole file, and the later rename
    wins, so give concurrent runs their own dataset files. Frames already present (same :func:`structure_key`) are not
    written again, so a restarted run does not duplicate them, and their reference labels can
    be looked up (:meth:`label`) instead of being computed again.
    """

    KEY = "race_structure_key"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._keys: set[str] = set()
        self._labels: dict[str, tuple[float, np.ndarray, str]] = {}
        if self.path.exists() and self.path.stat().st_size:
            # The key stored with each frame, not one recomputed from the file: extxyz keeps
            # positions to 8 decimals, which can round differently from the original.
            for atoms in read(self.path, ":", format="extxyz"):
                key = str(atoms.info.get(self.KEY, structure_key(atoms)))
                self._keys.add(key)
                self._remember(key, atoms)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, atoms: Atoms) -> bool:
        return structure_key(atoms) in self._keys

    def label(self, atoms: Atoms, reference: str) -> tuple[float, np.ndarray] | None:
        """The stored (energy, forces) of this exact structure from the reference with
        fingerprint ``reference`` (:func:`reference_fingerprint`), or None."""
        found = self._labels.get(structure_key(atoms))
        if found is None or found[2] != reference:
            return None
        return found[0], found[1].copy()

    def _remember(self, key: str, atoms: Atoms) -> None:
        if "REF_energy" in atoms.info and "REF_forces" in atoms.arrays:
            self._labels[key] = (float(atoms.info["REF_energy"]), np.array(atoms.arrays["REF_forces"], dtype=np.float64),
                                 str(atoms.info.get("fallback_reference", "")))

    def append(self, atoms: Atoms) -> bool:
        """Append ``atoms`` (with its info/arrays); False if it is already there."""
        key = structure_key(atoms)
        if key in self._keys:
            return False
        atoms = atoms.copy()
        atoms.info[self.KEY] = key
        buffer = io.StringIO()
        write(buffer, atoms, format="extxyz")
        old = self.path.read_bytes() if self.path.exists() else b""
        atomic_write_bytes(self.path, old + buffer.getvalue().encode())
        self._keys.add(key)
        self._remember(key, atoms)
        return True


@dataclass
class Verification:
    """The reference's verdict on a geometry (eV, eV/Å)."""

    reference_energy: float
    model_energy: float
    reference_fmax: float  # largest |F| over atoms from the reference
    max_force_error: float  # largest |F_model − F_reference| component
    converged: bool  # reference_fmax ≤ the requested fmax


class FallbackCalculator(Calculator):
    """RACE where it is sure, the reference where it is not.

    Args:
        model: a :class:`RACECalculator` (or anything it accepts: a path, a shipped name).
        reference: any ASE calculator giving energy and forces (PySCF, VASP, GPAW, tblite, EMT…).
        threshold: the reference is called when ``quantity`` exceeds it (eV/Å for
            ``max_forces_std``, eV for ``energy_std``).
        quantity: ``max_forces_std`` (max over atoms of √trace of the force covariance) or
            ``energy_std``.
        dataset: extxyz file collecting the reference-labelled frames (``REF_energy``,
            ``REF_forces``, ``fallback_reason``, the triggering uncertainty, and the model's own
            prediction ``race_energy`` / ``race_forces``); None: keep none. A structure whose
            label is already in the file (a restarted run retracing its steps) takes that label
            instead of a new reference call, if the same reference with the same parameters
            made it (``fallback_reference`` in the frame); it counts as a reference call
            (``n_reused``). :meth:`verify` always calls the reference.
        min_interval: at least this many calls between two reference calls.
        budget: at most this many reference calls in total (None: unlimited).
        on_failure: when the reference raises: ``model`` logs it and returns the model's
            prediction; ``retry`` tries ``retries`` more times, then behaves like ``model``;
            ``stop`` raises :class:`RaceError`. Never silent: failures are logged and counted.
        retries: extra attempts for ``retry``.
        retrain_every: after every this many new reference frames, call ``retrain(bundle,
            frames)`` and continue with the model it returns; 0 = never.
        retrain: the retraining function (e.g. :func:`ase_race.training.finetune.retrainer`);
            it receives the model's current :class:`~ase_race.modelfile.ModelBundle` (posterior
            and calibration) and the list of collected ``ase.Atoms`` (with
            ``REF_energy``/``REF_forces``), and returns the bundle to continue with.

    Results are the model's properties, with ``energy``, ``free_energy`` and ``forces`` replaced
    by the reference's on reference steps; ``fallback_used`` (bool) says which.
    """

    def __init__(
        self,
        model,
        reference: Calculator,
        threshold: float,
        quantity: str = K.MAX_FORCES_STD,
        dataset: str | os.PathLike | None = None,
        min_interval: int = 0,
        budget: int | None = None,
        on_failure: str = "model",
        retries: int = 1,
        retrain_every: int = 0,
        retrain=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if quantity not in (K.MAX_FORCES_STD, K.ENERGY_STD):
            raise ValueError(f"quantity must be {K.MAX_FORCES_STD!r} or {K.ENERGY_STD!r}, got {quantity!r}")
        if on_failure not in POLICIES:
            raise ValueError(f"on_failure must be one of {POLICIES}, got {on_failure!r}")
        self.model = model if isinstance(model, RACECalculator) else RACECalculator(model)
        self.implemented_properties = tuple(self.model.implemented_properties) + ("fallback_used",)
        self.reference = reference
        self._reference_id = reference_fingerprint(reference)
        self.threshold = float(threshold)
        self.quantity = quantity
        self.frames = LabelledFrames(dataset) if dataset is not None else None
        self.min_interval = int(min_interval)
        self.budget = budget
        self.on_failure = on_failure
        self.retries = int(retries)
        if retrain_every and retrain is None:
            raise ValueError("retrain_every needs a retrain function")
        self.retrain_every, self.retrain = int(retrain_every), retrain
        self.collected: list[Atoms] = []  # reference frames of this run, for retraining
        self.n_retrains = 0
        self.n_retrain_failures = 0
        self.n_calls = 0  # calculate() calls
        self.n_reference = 0  # successful reference calls (including labels reused from the dataset)
        self.n_reused = 0  # of those, labels of structures already in the dataset (a restarted run)
        self.n_failures = 0
        self.last_reference_call: int | None = None
        #: (call index, quantity value, what happened) for every step above the threshold
        self.events: list[tuple[int, float, str]] = []

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.n_calls += 1
        atoms = self.atoms
        model_atoms = atoms.copy()
        model_atoms.calc = self.model
        broken = None
        try:
            model_atoms.get_potential_energy()
            results = dict(self.model.results)
            value = float(results[self.quantity])
        except PredictionError as error:  # NaN or inf from the model: as unsure as it gets
            broken, results, value = error, {}, math.inf
        results["fallback_used"] = False
        if value > self.threshold:
            outcome = self._try_reference(atoms, value, results)
            self.events.append((self.n_calls, value, outcome))
        if broken is not None and not results["fallback_used"]:
            raise broken  # no reference answer either: never return the model's NaN
        self.results = results

    def _allowed(self) -> str | None:
        if self.budget is not None and self.n_reference >= self.budget:
            return "budget exhausted"
        if self.last_reference_call is not None and self.n_calls - self.last_reference_call <= self.min_interval:
            return "too soon after the last reference call"
        return None

    def _try_reference(self, atoms: Atoms, value: float, results: dict) -> str:
        refused = self._allowed()
        if refused:
            return f"model ({refused})"
        stored = self.frames.label(atoms, self._reference_id) if self.frames is not None else None
        try:
            energy, forces = stored if stored is not None else self._call_reference(atoms)
        except Exception as error:  # every attempt failed; the policy decides
            self.last_reference_call = self.n_calls  # do not hammer a failing reference
            if self.on_failure == "stop":
                raise RaceError(f"the reference calculator failed at call {self.n_calls}: {error}") from error
            return f"model (reference failed: {type(error).__name__})"
        if stored is not None:
            # A restarted run passing the same structure again: the label from the dataset
            # stands in for the call it already paid for, and counts against the budget as
            # that call did, so the restarted run retraces the original one.
            self.n_reference += 1
            self.n_reused += 1
        self.last_reference_call = self.n_calls
        model_energy = results.get(K.ENERGY, math.nan)
        model_forces = np.array(results.get(K.FORCES, np.full((len(atoms), 3), math.nan)))
        results.update({K.ENERGY: energy, K.FREE_ENERGY: energy, K.FORCES: forces, "fallback_used": True})
        self._record(atoms, energy, forces, f"{self.quantity}>{self.threshold:g}", value, model_energy, model_forces)
        return "reference"

    def _call_reference(self, atoms: Atoms) -> tuple[float, np.ndarray]:
        """(energy, forces) from the reference, with the retry policy; re-raises the last failure."""
        attempts = 1 + (self.retries if self.on_failure == "retry" else 0)
        for attempt in range(attempts):
            try:
                ref_atoms = atoms.copy()
                ref_atoms.calc = self.reference
                energy = float(ref_atoms.get_potential_energy())
                forces = np.array(ref_atoms.get_forces(), dtype=np.float64)
                if not (np.isfinite(energy) and np.isfinite(forces).all()):
                    raise ValueError("the reference returned a non-finite energy or forces")  # never a label
                self.n_reference += 1
                return energy, forces
            except Exception as exc:  # any reference failure is handled by the policy
                self.n_failures += 1
                log.warning("reference calculation failed (%s: %s)", type(exc).__name__, exc)
                if attempt == attempts - 1:
                    raise

    def _record(self, atoms, energy, forces, reason, value, model_energy, model_forces) -> None:
        """Append the labelled frame to the dataset and to the frames kept for retraining."""
        if self.frames is not None:
            frame = atoms.copy()
            frame.info.update({"REF_energy": energy, "fallback_reason": reason,
                               f"race_{self.quantity}": value, "race_energy": model_energy, "call": self.n_calls,
                               "fallback_reference": self._reference_id})
            frame.arrays["REF_forces"] = forces
            frame.arrays["race_forces"] = model_forces  # what the model predicted: its error there
            self.frames.append(frame)
        labelled = atoms.copy()
        labelled.info["REF_energy"] = energy
        labelled.arrays["REF_forces"] = forces
        self.collected.append(labelled)
        if self.retrain_every and len(self.collected) % self.retrain_every == 0:
            self._retrain()

    def verify(self, atoms: Atoms, fmax: float) -> "Verification":
        """Check a converged geometry with the reference before it is called a minimum.

        Calls the reference at ``atoms`` whatever the uncertainty, spacing or budget (a
        deliberate check), appends the frame to the dataset with reason ``verify``, and returns
        the reference's largest atomic force against ``fmax`` together with the model's errors
        there. A reference that fails raises :class:`RaceError`: an unverified minimum must
        not pass as a verified one.
        """
        model_atoms = atoms.copy()
        model_atoms.calc = self.model
        model_energy = float(model_atoms.get_potential_energy())
        model_forces = np.array(model_atoms.get_forces())
        value = float(self.model.results[self.quantity])
        try:
            energy, forces = self._call_reference(atoms)
        except Exception as error:
            raise RaceError(f"the reference calculator failed while verifying the final geometry: {error}") from error
        self._record(atoms, energy, forces, "verify", value, model_energy, model_forces)
        ref_fmax = float(np.sqrt((forces**2).sum(axis=1)).max())
        return Verification(
            reference_energy=energy, model_energy=model_energy, reference_fmax=ref_fmax,
            max_force_error=float(np.abs(model_forces - forces).max()), converged=ref_fmax <= fmax,
        )

    def _retrain(self) -> None:
        """Swap in the model returned by ``retrain`` (the model calculator keeps its settings).

        A retraining that diverges (:class:`TrainingError`) is logged and counted, and the run
        goes on with the model it had: the reference calls already paid for are kept in the
        dataset, and the next retraining tries again with more frames.
        """
        try:
            bundle = self.retrain(self.model.bundle, list(self.collected))
        except TrainingError as err:
            self.n_retrain_failures += 1
            log.warning("retraining on %d reference frames failed, keeping the current model: %s",
                        len(self.collected), err)
            return
        self.model.bundle = bundle
        self.model.posterior = bundle.posterior
        self.model.calibration = bundle.calibration
        self.model.reset()
        self.n_retrains += 1
        log.info("retrained on %d reference frames (retrain %d)", len(self.collected), self.n_retrains)
