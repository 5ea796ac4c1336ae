"""Distance-aware epistemic uncertainty on one network: how far each atom is from training.

One RACE network gives the mean and the aleatoric part (its own heads, as for MVE, with a
calibration factor each). The epistemic part is read from the distance of each atom's
environment to the training environments, measured in the network's own feature space (the
readouts' hidden scalars φ_i ∈ R^P, the features the energy is a linear function of):

    x_i = (φ_i − μ_Z) / s_Z                       standardised per species Z = Z_i
    δ_i = min_r ‖x_i − x_r^(Z)‖ / q_Z              x_r^(Z): reference environments of species Z
    m_i = max(0, n_Z − n_i)                        missing coordination, n_i = Σ_j u(r_ij)
    g(δ; A, δ₀, p) = A · tanh((δ/δ₀)^p)            grows as δ^p, saturates at A

    var E_b   = f_E · var_ale E_b + (Σ_{i∈b} e_i)²,       e_i = g_E(δ_i) + b_E m_i         eV²
    cov F_j   = f_F · cov_ale F_j + (v_j + Σ_i w_ji v_i) I₃,  v_i = g_F(δ_i)² + (b_F m_i)²   (eV/Å)²
    var σ_b   = (Σ_{i∈b} e_i / V_b)²  per stress component                                (eV/Å³)²

with w_ji = u(r_ji) the radial envelope for the neighbours i of j (the force on j is
−Σ_i ∂E_i/∂r_j: an unfamiliar neighbour makes it uncertain too). Atoms' energy errors are
taken as fully correlated (a wrong environment shifts the whole energy one way).

μ_Z, s_Z are the training atoms' feature mean and spread, the references a farthest-point
subset of the training atoms, q_Z the ``quantile`` of validation atoms' distances (δ ≈ 1 marks
the edge of the training distribution), n_Z the smallest coordination of a training atom of
species Z, and (f, A, δ₀, p, b) for energies and for forces maximise the Gaussian likelihood of
calibration data, in- and off-distribution together (:mod:`ase_race.training.methods.novelty`).
g saturates because errors off-distribution do not grow without bound (a wrong molecule is
wrong by eV, not by 10³ eV); m_i grows monotonically while a bond is pulled apart, since every
atom of the bond loses coordination, so the variance keeps rising until the fragments part.

Why it does not collapse where an ensemble does: an atom that leaves every neighbour's cutoff
has, with ``isolated_limit``, features of zero (the isolated atom's own are subtracted; no
training atom is near them), or without it the isolated atom's features, and no coordination
at all, so δ_i and m_i stay large however far it goes (members of an ensemble all agree on an
isolated atom). Both are constants of the structure for the derivatives (evaluated without
gradients), so the forces cost what the single network's cost; the search is one (n_Z × N_Z)
distance matrix per species.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _keys as K
from ..config import ModelConfig
from ..errors import ModelFileError
from ..graph import AtomicGraph
from ..nn import RACE, build_model
from ..nn.derivatives import derivative_inputs, energy_derivatives
from .base import Posterior, Prediction, load_weights, rebuilt_in

PARAMETERS = ("energy_aleatoric", "energy_scale", "energy_width", "energy_power", "energy_bond",
              "forces_aleatoric", "forces_scale", "forces_width", "forces_power", "forces_bond")


class NoveltyPosterior(Posterior):
    """A single network plus feature-space novelty δ_i for the epistemic variance.

    Args:
        model: the network (mean and aleatoric heads).
        mean, spread: μ_Z and s_Z, (S, P) in the order of ``config.species``.
        references: per species, (N_Z, P) standardised reference features x_r^(Z).
        radius: q_Z (S,), the distance that counts as δ = 1.
        floor: n_Z (S,), the smallest coordination of a training atom of each species.
        parameters: the calibration constants named in ``PARAMETERS``: per quantity the
            aleatoric factor f, the scale A (eV, or eV/Å for forces), the width δ₀, the power p
            and b (eV, or eV/Å, per missing neighbour).
    """

    kind = "novelty"

    def __init__(self, model: RACE, mean: torch.Tensor, spread: torch.Tensor, references: list[torch.Tensor],
                 radius: torch.Tensor, floor: torch.Tensor, parameters: dict[str, float]):
        n_species, width = len(model.config.species), model.config.num_layers * model.config.readout_hidden
        if mean.shape != (n_species, width) or spread.shape != (n_species, width) or radius.shape != (n_species,):
            raise ValueError(f"novelty statistics must be ({n_species}, {width}) and ({n_species},), got "
                             f"{tuple(mean.shape)}, {tuple(spread.shape)}, {tuple(radius.shape)}")
        if len(references) != n_species or any(r.ndim != 2 or r.shape[1] != width or r.shape[0] == 0 for r in references):
            raise ValueError(f"novelty references must be {n_species} non-empty (N, {width}) tensors")
        if floor.shape != (n_species,):
            raise ValueError(f"novelty coordination floors must be ({n_species},), got {tuple(floor.shape)}")
        for name, t in (("mean", mean), ("spread", spread), ("radius", radius), ("floor", floor), *(
                (f"references of species {z}", r) for z, r in zip(model.config.species, references))):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"novelty {name} has non-finite entries")
        if not (spread > 0).all() or not (radius > 0).all() or not (floor >= 0).all():
            raise ValueError("novelty spreads and radii must be positive, coordination floors non-negative")
        missing = set(PARAMETERS) - set(parameters)
        if missing:
            raise ValueError(f"novelty parameters {sorted(missing)} are missing")
        bad = [k for k in PARAMETERS if not (math.isfinite(float(parameters[k])) and float(parameters[k]) >= 0)]
        bad += [k for k in PARAMETERS if k.endswith(("_width", "_power")) and not float(parameters[k]) > 0]
        if bad:
            raise ValueError(f"novelty parameters {sorted(set(bad))} must be finite and non-negative "
                             "(widths and powers positive)")
        self.model = model
        self.mean, self.spread, self.radius = mean.double(), spread.double(), radius.double()
        self.references = [r.double() for r in references]
        self._norms = [(r * r).sum(1) for r in self.references]
        self.floor = floor.double()
        self.parameters = {k: float(parameters[k]) for k in PARAMETERS}

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @torch.no_grad()
    def novelty(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """δ_i (n,): each atom's distance to the nearest reference of its species, over q_Z.

        Args:
            features: φ (n, P) as returned by ``RACE.outputs(..., last_layer_features=True)``.
            species: species indices (n,) into ``config.species``.
        """
        features = features.detach().to(torch.float64)
        device = features.device
        delta = features.new_zeros(features.shape[0])
        for z in range(len(self.references)):
            mask = species == z
            if not bool(mask.any()):
                continue
            x = (features[mask] - self.mean[z].to(device)) / self.spread[z].to(device)
            refs, norms = self.references[z].to(device), self._norms[z].to(device)
            # |x − r|² = |x|² − 2 x·r + |r|² as matrix products (torch.cdist is ~30× slower for a
            # few atoms against thousands of references on a CPU), in chunks of atoms so that
            # memory stays bounded (≈ 2²⁷ distances at a time) on large systems
            chunk = max(1, (1 << 27) // refs.shape[0])
            nearest = torch.cat([
                ((xc * xc).sum(1, keepdim=True) - 2.0 * xc @ refs.T + norms[None, :]).min(dim=1).values
                for xc in x.split(chunk)])
            delta[mask] = nearest.clamp(min=0.0).sqrt() / self.radius[z].to(device)
        return delta

    @torch.no_grad()
    def deficit(self, graph: AtomicGraph) -> torch.Tensor:
        """m_i = max(0, n_Z − n_i) (n,): how many (envelope-weighted) neighbours each atom has
        fewer than any training atom of its species."""
        n = self.model.coordination(graph, graph[K.POSITIONS], graph[K.CELL]).to(torch.float64)
        return (self.floor.to(n.device)[graph[K.SPECIES]] - n).clamp(min=0.0)

    def atom_terms(self, delta: torch.Tensor, deficit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_i in eV, v_i in (eV/Å)²), both (n,), from the novelty δ_i and the deficit m_i."""
        p = self.parameters

        def g(q):
            return p[f"{q}_scale"] * torch.tanh((delta / p[f"{q}_width"]) ** p[f"{q}_power"])

        return g("energy") + p["energy_bond"] * deficit, g("forces") ** 2 + (p["forces_bond"] * deficit) ** 2

    def predict(
        self, graph: AtomicGraph, *, compute_stress: bool = False, edge_chunk: int | None = None
    ) -> Prediction:
        cell = graph[K.CELL]
        n_graphs = cell.shape[0]
        with torch.enable_grad():
            positions, strain = derivative_inputs(graph[K.POSITIONS], n_graphs, stress=compute_stress)
            out = self.model.outputs(graph, positions, strain, edge_chunk, last_layer_features=True, cache_isolated=True)
            d = energy_derivatives(out[K.ENERGY].sum(), positions, strain, cell)
        energy_atom, force_atom_var = self.atom_terms(self.novelty(out[K.FEATURES], graph[K.SPECIES]), self.deficit(graph))
        with torch.no_grad():
            force_var = force_atom_var + self.model.neighbour_sum(graph, graph[K.POSITIONS], cell, force_atom_var)
        energy_std = energy_atom.new_zeros(n_graphs).index_add(0, graph[K.BATCH], energy_atom)
        energy = out[K.ENERGY].detach()
        cov = out[K.FORCES_COV].detach()
        eye = torch.eye(3, dtype=cov.dtype, device=cov.device)
        stress, stress_var = None, None
        if compute_stress:
            stress = d.stress.detach()
            volume = torch.linalg.det(cell).abs().to(torch.float64)
            stress_std = torch.where(volume > 0, energy_std / volume.clamp(min=1e-12), torch.zeros_like(energy_std))
            stress_var = (stress_std**2)[:, None, None].expand(n_graphs, 3, 3).to(stress.dtype).clone()
        p = self.parameters
        return Prediction(
            energy=energy,
            node_energy=out[K.NODE_ENERGY].detach(),
            energy_var_aleatoric=p["energy_aleatoric"] * out[K.ENERGY_VAR].detach(),
            energy_var_epistemic=(energy_std**2).to(energy.dtype),
            forces_cov_aleatoric=p["forces_aleatoric"] * cov,
            forces_cov_epistemic=force_var.to(cov.dtype)[:, None, None] * eye,
            forces=d.forces.detach(),
            stress=stress,
            stress_var_epistemic=stress_var,
        )

    def describe(self) -> str:
        n = sum(r.shape[0] for r in self.references)
        return f"novelty ({n} reference environments)"

    def networks(self) -> list[RACE]:
        return [self.model]

    def with_networks(self, networks: list[RACE]) -> "NoveltyPosterior":
        """The same statistics around new weights (after fine-tuning, refit them to be exact)."""
        return NoveltyPosterior(self._check_networks(networks)[0], self.mean, self.spread, self.references,
                                self.radius, self.floor, self.parameters)

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.model.state_dict()),
            "mean": self.mean, "spread": self.spread, "radius": self.radius, "floor": self.floor,
            "references": {str(z): r for z, r in zip(self.config.species, self.references)},
            "parameters": dict(self.parameters),
        }

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]) -> "NoveltyPosterior":
        model = build_model(config)
        load_weights(model, state["weights"])
        try:
            references = [state["references"][str(z)] for z in config.species]
        except KeyError as error:
            raise ModelFileError(f"the novelty posterior has no reference environments for species {error}") from None
        try:
            return cls(model, state["mean"], state["spread"], references, state["radius"], state["floor"],
                       state["parameters"])
        except ValueError as error:
            raise ModelFileError(f"invalid novelty posterior state: {error}") from None

    def to(self, device=None, dtype=None) -> "NoveltyPosterior":
        self.model = rebuilt_in(self.model, dtype, device)
        if device is not None:
            self.mean, self.spread, self.radius, self.floor = (
                t.to(device) for t in (self.mean, self.spread, self.radius, self.floor))
            self.references = [r.to(device) for r in self.references]
            self._norms = [n.to(device) for n in self._norms]
        return self
