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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.io import read, write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers then race as before
    fcntl = None

from .. import _keys as K
from .._atomic import atomic_write_bytes
from ..errors import PredictionError, RaceError, TrainingError
from .ase_calc import RACECalculator

log = logging.getLogger("ase_race.fallback")

POLICIES = ("model", "retry", "stop")


def structure_key(atoms: Atoms) -> str:
    """A fingerprint of numbers, positions (to 1e-6 Å), cell and pbc, written with each frame.

    For people and other tools; :class:`LabelledFrames` matches structures by distance, since
    two positions a hair apart can round to different keys.
    """
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(atoms.positions, dtype=np.float64), 6).tobytes())
    h.update(np.round(np.asarray(atoms.cell[:], dtype=np.float64), 6).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    return h.hexdigest()


def _bucket(numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bytes:
    """What two matching structures share exactly: species in order, cell to 1e-4 Å, pbc."""
    return (np.asarray(numbers, dtype=np.int64).tobytes() + np.round(np.asarray(cell, dtype=np.float64), 4).tobytes()
            + np.asarray(pbc, dtype=bool).tobytes())


def _pack(*arrays) -> str:
    """float64 values as hex (little-endian), ``h``-prefixed so extxyz never reads a number."""
    return "h" + np.concatenate([np.ravel(np.asarray(a, dtype="<f8")) for a in arrays]).tobytes().hex()


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text[1:]), dtype="<f8").copy()


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
    """An extxyz dataset that only ever grows by whole frames, shared safely between writers.

    **Exact.** extxyz keeps 8 decimals; each frame also carries its positions and its reference
    labels (``REF_energy``, ``REF_forces``) as exact float64 (hex, info key ``race_exact``), and
    those are what :meth:`label` returns: a restarted run that reuses a label gets the same bits
    the reference gave, so its trajectory retraces the original one exactly.

    **Matched by distance.** A structure is "already there" when a stored frame has the same
    species in the same order, the same cell and pbc, and positions within ``tolerance`` Å
    (max over components; default 1e-6 Å, far below any MD step). That holds for frames written
    without the exact record too (8 decimals are 5e-9 Å).

    **Safe to share.** An append takes an exclusive lock on the hidden file ``.<dataset>.lock``
    (``fcntl.flock``: processes on one host, and NFS clients where the server supports it; the
    file stays, as removing a lock file races with its next user), reads what other
    writers appended since this process last looked, skips the frame if one of them already
    stored it, and writes old content plus the new frame to a temporary file renamed over the
    dataset (:mod:`ase_race._atomic`): a crash leaves the old or the new file, never a truncated
    frame, and no writer's frame is lost.

    **A failed write loses nothing.** If writing fails (a full disk), the temporary file is
    removed, the frame is kept in :attr:`pending` and the error is raised; the next append, or
    :meth:`flush`, writes the pending frames first.
    """

    KEY = "race_structure_key"
    EXACT = "race_exact"

    def __init__(self, path: str | os.PathLike, tolerance: float = 1e-6):
        self.path = Path(path)
        if self.path.is_dir():
            raise RaceError(f"fallback dataset {self.path} is a directory, not a file")
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.tolerance = float(tolerance)
        self.pending: list[Atoms] = []
        self._groups: dict[bytes, list[tuple[np.ndarray, tuple[float, np.ndarray, str] | None]]] = {}
        self._count = 0
        self._read_upto = 0  # bytes of the file already indexed
        self._signature = None  # (inode, size, mtime) of the file as last indexed
        self._refresh()

    def __len__(self) -> int:
        return self._count + len(self.pending)

    def __contains__(self, atoms: Atoms) -> bool:
        return self._find(atoms) is not None or any(self._matches(p, atoms) for p in self.pending)

    def label(self, atoms: Atoms, reference: str) -> tuple[float, np.ndarray] | None:
        """The stored (energy, forces) of this structure from the reference with fingerprint
        ``reference`` (:func:`reference_fingerprint`), or None: exact copies, ready to use."""
        self._refresh()
        found = self._find(atoms)
        if found is None or found[1] is None or found[1][2] != reference:
            return None
        energy, forces, _ = found[1]
        return energy, forces.copy()

    def append(self, atoms: Atoms) -> bool:
        """Append ``atoms`` (with its info/arrays); False if it is already there.

        Raises the ``OSError`` of a failed write, with the frame kept in :attr:`pending`.
        """
        if atoms in self:
            return False
        atoms = atoms.copy()
        self.pending.append(atoms)
        self.flush()
        return True

    def flush(self) -> None:
        """Write the :attr:`pending` frames (under the lock); raise ``OSError`` if that fails."""
        if not self.pending:
            return
        with self._locked():
            self._refresh()
            frames = [self._with_exact(f) for f in self.pending if self._find(f) is None]  # another writer's?
            if frames:
                buffer = io.StringIO()
                write(buffer, frames, format="extxyz")
                old = self.path.read_bytes() if self.path.exists() else b""
                data = old + buffer.getvalue().encode()
                atomic_write_bytes(self.path, data)
                # Index what was just written from memory; under the lock nobody else wrote since.
                for frame in frames:
                    self._index(frame)
                st = self.path.stat()
                self._read_upto, self._signature = len(data), (st.st_ino, st.st_size, st.st_mtime_ns)
            self.pending = []

    @contextmanager
    def _locked(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _with_exact(self, atoms: Atoms) -> Atoms:
        frame = atoms.copy()
        frame.info[self.KEY] = structure_key(atoms)
        if "REF_energy" in frame.info and "REF_forces" in frame.arrays:
            frame.info[self.EXACT] = _pack(atoms.positions, [frame.info["REF_energy"]], frame.arrays["REF_forces"])
        else:
            frame.info[self.EXACT] = _pack(atoms.positions)
        return frame

    def _refresh(self) -> None:
        """Index the frames appended to the file since it was last read (by anyone)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._signature is not None:  # removed under us: start over
                self._reset()
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return
        data = self.path.read_bytes()
        if len(data) < self._read_upto:  # not an append of what was read: index it anew
            self._reset()
        new = data[self._read_upto:]
        if new.strip():
            try:
                frames = read(io.StringIO(new.decode()), ":", format="extxyz")
            except Exception as error:
                raise RaceError(f"fallback dataset {self.path} cannot be read as extxyz "
                                f"(after byte {self._read_upto}): {error}") from error
            for frame in frames:
                self._index(frame)
        self._read_upto, self._signature = len(data), signature

    def _reset(self) -> None:
        self._groups, self._count, self._read_upto, self._signature = {}, 0, 0, None

    def _index(self, frame: Atoms) -> None:
        positions = np.array(frame.positions, dtype=np.float64)
        label = None
        exact = frame.info.get(self.EXACT)
        n = 3 * len(frame)
        if isinstance(exact, str) and exact.startswith("h"):
            values = _unpack(exact)
            if values.size in (n, 2 * n + 1):
                positions = values[:n].reshape(-1, 3)
                if values.size == 2 * n + 1:
                    label = (float(values[n]), values[n + 1:].reshape(-1, 3))
        if label is None and "REF_energy" in frame.info and "REF_forces" in frame.arrays:
            label = (float(frame.info["REF_energy"]), np.array(frame.arrays["REF_forces"], dtype=np.float64))
        if label is not None:
            label = (*label, str(frame.info.get("fallback_reference", "")))
        key = _bucket(frame.numbers, frame.cell[:], frame.pbc)
        self._groups.setdefault(key, []).append((positions, label))
        self._count += 1

    def _find(self, atoms: Atoms):
        """The stored (positions, label) matching ``atoms`` within the tolerance, or None."""
        group = self._groups.get(_bucket(atoms.numbers, atoms.cell[:], atoms.pbc), ())
        for entry in reversed(group):  # a restart retraces the latest frames most often
            if self._close(entry[0], atoms.positions):
                return entry
        return None

    def _matches(self, a: Atoms, b: Atoms) -> bool:
        return (_bucket(a.numbers, a.cell[:], a.pbc) == _bucket(b.numbers, b.cell[:], b.pbc)
                and self._close(a.positions, b.positions))

    def _close(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Positions within the tolerance (max over components, Å)."""
        return float(np.abs(np.asarray(a, dtype=np.float64) - b).max(initial=0.0)) <= self.tolerance


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
        energy_tolerance: eV/atom. At the first reference energy of the run, ``|E_ref −
            E_model| / N`` above this raises :class:`RaceError` before anything is stored: the
            two are not on one energy scale (another level of theory, such as xTB against a PBE
            model, or other reference energies of the isolated atoms), and mixing them would
            make the trajectory jump and the collected labels useless for this model. The
            default of 1 eV/atom is far above any model's error on its own level of theory
            and far below the gap between methods (xTB and PBE differ by hundreds of eV per
            atom). None: no check.

    A reference that is missing its package (``ImportError``) is a setup error, raised at the
    first call whatever ``on_failure`` says; a non-finite reference result is a failed call,
    never a label. A dataset write that fails (a full disk) is logged, counted
    (``n_write_failures``) and kept in memory to be written with the next frame or by
    ``frames.flush()``; with ``on_failure="stop"`` it raises :class:`RaceError`.

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
        energy_tolerance: float | None = 1.0,
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
        self.n_write_failures = 0  # dataset appends that failed (their frames wait in frames.pending)
        self.energy_tolerance = None if energy_tolerance is None else float(energy_tolerance)
        self._scale_checked = self.energy_tolerance is None
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
        except ImportError:
            raise  # a missing package is not a failed calculation: no policy retries it
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
        self._check_energy_scale(energy, model_energy, len(atoms))
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
            except ImportError:
                raise
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
            try:
                self.frames.append(frame)
            except OSError as error:
                self.n_write_failures += 1
                if self.on_failure == "stop":
                    raise RaceError(f"could not write the reference frame of call {self.n_calls} to "
                                    f"{self.frames.path}: {error}") from error
                log.warning("could not write to %s (%s); %d frame(s) kept in memory, written with the next one",
                            self.frames.path, error, len(self.frames.pending))
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
        except ImportError:
            raise
        except Exception as error:
            raise RaceError(f"the reference calculator failed while verifying the final geometry: {error}") from error
        self._check_energy_scale(energy, model_energy, len(atoms))
        self._record(atoms, energy, forces, "verify", value, model_energy, model_forces)
        ref_fmax = float(np.sqrt((forces**2).sum(axis=1)).max())
        return Verification(
            reference_energy=energy, model_energy=model_energy, reference_fmax=ref_fmax,
            max_force_error=float(np.abs(model_forces - forces).max()), converged=ref_fmax <= fmax,
        )

    def _check_energy_scale(self, reference_energy: float, model_energy: float, n_atoms: int) -> None:
        """Refuse a reference on another energy scale than the model (see ``energy_tolerance``)."""
        if self._scale_checked or not math.isfinite(model_energy) or n_atoms == 0:
            return
        gap = abs(reference_energy - model_energy) / n_atoms
        if gap > self.energy_tolerance:
            raise RaceError(
                f"the reference ({type(self.reference).__name__}) gives {reference_energy:.4f} eV where the model gives "
                f"{model_energy:.4f} eV for {n_atoms} atoms: {gap:.3g} eV/atom apart, more than the tolerance of "
                f"{self.energy_tolerance:g} eV/atom. They are not on one energy scale (another level of theory, or other "
                f"isolated-atom energies); use the reference the model was trained on, or raise the tolerance "
                f"(energy_tolerance, --fallback-energy-tolerance) if the offset is intended")
        self._scale_checked = True

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
