"""``RACECalculator``: the ASE calculator with predictive variances (docs/calculator.md)."""

from __future__ import annotations

import copy
import math
import os
import threading

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from .. import _keys as K
from ..errors import PredictionError
from ..evaluation import Calibration, apply_calibration, max_forces_std
from ..graph import MIN_DISTANCE, NeighbourCache, from_atoms
from ..modelfile import ModelBundle, load_model
from ..nn import TORCH_DTYPES
from ..posteriors import Posterior, Prediction
from ..posteriors.bald import bald_energy, bald_forces

_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _voigt(tensor: np.ndarray) -> np.ndarray:
    """(3, 3) → (6,) in ASE's Voigt order xx, yy, zz, yz, xz, xy."""
    return np.array([tensor[a, b] for a, b in _VOIGT])


#: keywords passed on to ase.calculators.calculator.Calculator
ASE_CALCULATOR_KEYWORDS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")


class RACECalculator(Calculator):
    """ASE calculator for a RACE model file, reporting variances alongside every property.

    One :meth:`calculate` fills every property below, so MD, optimisers and loggers that ask
    for several of them cost one network evaluation per step. Units: eV, Å, eV/Å, eV/Å³;
    ``*_var`` are variances (squared units), ``*_std`` their square roots.

    ======================== =========== =======================================================
    property                 shape       meaning
    ======================== =========== =======================================================
    energy, free_energy      float       predictive mean energy (eV)
    energies                 (n,)        per-atom energy contributions (eV), summing to energy
    forces                   (n, 3)      −∂E/∂r (eV/Å)
    stress                   (6,)        Voigt, periodic cells only (eV/Å³)
    energy_var / _std        float       total predictive variance (eV²) / std (eV)
    energy_var_aleatoric     float       data-noise part (eV²)
    energy_var_epistemic     float       model-uncertainty part (eV²); 0 for a single model
    forces_cov               (n, 3, 3)   total per-atom force covariance ((eV/Å)²)
    forces_var / _std        (n, 3)      its diagonal / square root
    forces_var_aleatoric     (n, 3)      data-noise part
    forces_var_epistemic     (n, 3)      model part; 0 for a single model
    stress_var               (6,)        epistemic stress variance ((eV/Å³)²); 0 for one model
    max_forces_std           float       max_i √(trace forces_cov_i) (eV/Å)
    energy_ensemble          (M,)        member/sample energies (sampling posteriors only)
    forces_ensemble          (M, n, 3)   member/sample forces (sampling posteriors only)
    stress_ensemble          (M, 6)      member/sample stresses (sampling posteriors, periodic)
    bald_energy              float       BALD of the energy (nats; 0 for MVE)
    bald_forces              float       BALD of the forces, summed over atoms (nats)
    bald                     float       bald_energy + bald_forces (BALD-EF)
    ======================== =========== =======================================================

    The calibration stored in the model file (:mod:`ase_race.evaluation.calibration`) multiplies
    both parts of every variance by the same factor.

    Args:
        model: path to a model file, the name of a shipped model, or a loaded
            :class:`~ase_race.modelfile.ModelBundle` / :class:`~ase_race.posteriors.Posterior`
            (copied, so the object passed in is left as it was).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available, else CPU).
        dtype: ``torch.float32``/``torch.float64`` or their names (default: the model's).
        skin: neighbour-list skin (Å); the list is rebuilt only when an atom moved more than
            ``skin / 2`` or the cell, pbc or atom count changed.
        min_distance: atoms closer than this (Å) are refused as overlapping.
        edge_chunk: structures with more edges than this (about 300 atoms of a liquid at
            r_c = 5 Å) are evaluated in edge chunks with activation checkpointing: the same
            numbers with bounded memory, at some extra time; ``None`` turns chunking off.

    One calculator may be shared by several threads: :meth:`get_property` (behind every
    ``atoms.get_*``) holds a lock from the state check to the returned copy, so a thread never
    reads the results of another thread's structure. The threads then take turns; for parallel
    evaluation give each thread its own calculator. ``calc.results`` read directly is whatever
    the last evaluation left.
    """

    implemented_properties = (
        K.ENERGY, K.FREE_ENERGY, K.ENERGIES, K.FORCES, "stress",
        K.ENERGY_VAR, K.ENERGY_STD, K.ENERGY_VAR_ALEATORIC, K.ENERGY_VAR_EPISTEMIC,
        K.FORCES_VAR, K.FORCES_STD, K.FORCES_VAR_ALEATORIC, K.FORCES_VAR_EPISTEMIC,
        K.FORCES_COV, K.STRESS_VAR, K.MAX_FORCES_STD, K.ENERGY_ENSEMBLE, K.FORCES_ENSEMBLE,
        K.STRESS_ENSEMBLE, K.BALD_ENERGY, K.BALD_FORCES, K.BALD,
    )  # fmt: skip

    def __init__(
        self,
        model: str | os.PathLike | ModelBundle | Posterior,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        skin: float = 0.5,
        min_distance: float = MIN_DISTANCE,
        edge_chunk: int | None = 4096,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - set(ASE_CALCULATOR_KEYWORDS))
        if unknown:
            accepted = ["model", "device", "dtype", "skin", "min_distance", "edge_chunk", *ASE_CALCULATOR_KEYWORDS]
            raise TypeError(f"RACECalculator got unknown keyword arguments {unknown}; it accepts {accepted}")
        super().__init__(**kwargs)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str):
            dtype = TORCH_DTYPES[dtype]
        if isinstance(model, Posterior):
            model = ModelBundle(model)
        if isinstance(model, ModelBundle):
            # Work on a copy: the caller's posterior keeps its device and dtype.
            bundle = copy.deepcopy(model)
            bundle.posterior.to(device=device, dtype=dtype)
        else:
            bundle = load_model(model, device=device, dtype=dtype)
        self.bundle = bundle
        self.posterior: Posterior = bundle.posterior
        self.calibration: Calibration = bundle.calibration
        self.device = torch.device(device)
        self.dtype = self.posterior.dtype
        self.min_distance = float(min_distance)
        self.edge_chunk = edge_chunk
        self.neighbours = NeighbourCache(self.posterior.config.r_max, skin)
        #: number of network evaluations (one per calculate())
        self.n_evaluations = 0
        self._lock = threading.RLock()

    def get_property(self, name, atoms=None, allow_calculation=True):
        # ASE checks the state, calculates and reads self.results in three steps; another thread's
        # calculate() in between would hand this one its forces.
        with self._lock:
            return super().get_property(name, atoms, allow_calculation)

    def __getstate__(self):  # a lock does not copy or pickle; each copy gets its own
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def species(self) -> tuple[int, ...]:
        return self.posterior.config.species

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self._refuse_unavailable(properties or ())
        if "numbers" in system_changes:
            self.neighbours.reset()
        atoms = self.atoms
        if len(atoms) == 0:  # nothing to evaluate: zero energy, no forces, no uncertainty
            self.results = self._empty_results(bool(atoms.pbc.all()))
            return
        graph = from_atoms(
            atoms,
            self.species,
            self.posterior.config.r_max,
            cache=self.neighbours,
            min_distance=self.min_distance,
            dtype=self.dtype,
            device=self.device,
        )
        periodic = bool(atoms.pbc.all())
        prediction = self.posterior.predict(graph, compute_stress=periodic, edge_chunk=self.edge_chunk)
        self.n_evaluations += 1
        results = self._results(prediction, periodic)
        bad = [k for k, v in results.items() if isinstance(v, (float, np.ndarray)) and not np.all(np.isfinite(v))]
        if bad:
            raise PredictionError(f"the model gave non-finite {', '.join(sorted(bad))} for {atoms.get_chemical_formula()}; "
                                  "refusing to return them")
        self.results = results

    def _refuse_unavailable(self, properties) -> None:
        """Raise before evaluating when a property cannot be had for these atoms (otherwise ASE
        would evaluate the network a second time before reporting the property missing)."""
        if "stress" in properties or K.STRESS_VAR in properties:
            if not self.atoms.pbc.all():
                raise PropertyNotImplementedError(
                    f"stress needs a cell periodic in all three directions (pbc={self.atoms.pbc.tolist()})"
                )
        wanted = {K.ENERGY_ENSEMBLE, K.FORCES_ENSEMBLE, K.STRESS_ENSEMBLE} & set(properties)
        if wanted and not self.posterior.provides_ensemble:
            raise PropertyNotImplementedError(
                f"{sorted(wanted)} need a sampling posterior (ensemble, SWAG, IVON, all-weight Laplace); this model is "
                f"{self.posterior.kind!r}"
            )

    def _empty_results(self, periodic: bool) -> dict:
        """The results of a structure without atoms, for every posterior alike."""
        results = {K.ENERGY: 0.0, K.FREE_ENERGY: 0.0, K.ENERGIES: np.zeros(0), K.FORCES: np.zeros((0, 3)),
                   K.FORCES_COV: np.zeros((0, 3, 3)), K.MAX_FORCES_STD: 0.0}
        for key in (K.ENERGY_VAR, K.ENERGY_STD, K.ENERGY_VAR_ALEATORIC, K.ENERGY_VAR_EPISTEMIC,
                    K.BALD_ENERGY, K.BALD_FORCES, K.BALD):
            results[key] = 0.0
        for key in (K.FORCES_VAR, K.FORCES_STD, K.FORCES_VAR_ALEATORIC, K.FORCES_VAR_EPISTEMIC):
            results[key] = np.zeros((0, 3))
        if periodic:
            results["stress"], results[K.STRESS_VAR] = np.zeros(6), np.zeros(6)
        if self.posterior.provides_ensemble:
            m = self.posterior.n_samples_or_members
            results[K.ENERGY_ENSEMBLE], results[K.FORCES_ENSEMBLE] = np.zeros(m), np.zeros((m, 0, 3))
            if periodic:
                results[K.STRESS_ENSEMBLE] = np.zeros((m, 6))
        return results

    def _results(self, p: Prediction, periodic: bool) -> dict:
        """Prediction (one structure) → ASE results: float64 numpy arrays and Python floats.

        Variances are calibrated by :func:`~ase_race.evaluation.apply_calibration` (in float64);
        the BALD terms are those of the networks' own (uncalibrated) mixture.
        """
        as_np = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
        c = apply_calibration(p, self.calibration)
        e_ale, e_epi = float(c.energy_var_aleatoric[0]), float(c.energy_var_epistemic[0])
        cov_ale, cov_epi = c.forces_cov_aleatoric, c.forces_cov_epistemic
        cov = cov_ale + cov_epi
        diag = lambda t: as_np(torch.diagonal(t, dim1=1, dim2=2)).copy()  # noqa: E731
        forces_var = diag(cov)
        energy = float(p.energy[0])
        one_graph = torch.zeros(cov.shape[0], dtype=torch.long, device=cov.device)
        results = {
            K.ENERGY: energy,
            K.FREE_ENERGY: energy,
            K.ENERGIES: as_np(p.node_energy),
            K.FORCES: as_np(p.forces),
            K.ENERGY_VAR: e_ale + e_epi,
            K.ENERGY_STD: math.sqrt(e_ale + e_epi),
            K.ENERGY_VAR_ALEATORIC: e_ale,
            K.ENERGY_VAR_EPISTEMIC: e_epi,
            K.FORCES_COV: as_np(cov),
            K.FORCES_VAR: forces_var,
            K.FORCES_STD: np.sqrt(forces_var),
            K.FORCES_VAR_ALEATORIC: diag(cov_ale),
            K.FORCES_VAR_EPISTEMIC: diag(cov_epi),
            K.MAX_FORCES_STD: float(max_forces_std(cov, one_graph, 1)[0]),
        }
        if periodic:
            results["stress"] = _voigt(as_np(p.stress[0]))
            results[K.STRESS_VAR] = _voigt(as_np(c.stress_var_epistemic[0]))
        results[K.BALD_ENERGY] = float(bald_energy(p)[0])
        results[K.BALD_FORCES] = float(bald_forces(p)[0])
        results[K.BALD] = results[K.BALD_ENERGY] + results[K.BALD_FORCES]
        if p.energy_ensemble is not None:
            results[K.ENERGY_ENSEMBLE] = as_np(p.energy_ensemble[:, 0])
        if p.forces_ensemble is not None:
            results[K.FORCES_ENSEMBLE] = as_np(p.forces_ensemble)
        if periodic and p.stress_ensemble is not None:
            results[K.STRESS_ENSEMBLE] = np.stack([_voigt(member) for member in as_np(p.stress_ensemble[:, 0])])
        return results
