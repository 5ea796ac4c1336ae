"""Mean–variance estimation (MVE): one network, aleatoric uncertainty only."""

from __future__ import annotations

from typing import Any

import torch

from .. import _keys as K
from ..config import ModelConfig
from ..graph import AtomicGraph
from ..nn import RACE, build_model
from .base import Posterior, Prediction, load_weights, rebuilt_in


class MVEPosterior(Posterior):
    """A single RACE network with mean–variance heads.

    The predictive is the network's own Gaussian: energy variance from the energy head, force
    covariance from the force head. Epistemic parts are exactly zero (one model has no spread
    over weights); ``stress_var`` is therefore zero too, since there is no stress variance head.
    """

    kind = "mve"

    def __init__(self, model: RACE):
        self.model = model

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def predict(
        self, graph: AtomicGraph, *, compute_stress: bool = False, edge_chunk: int | None = None
    ) -> Prediction:
        out = self.model(graph, compute_forces=True, compute_stress=compute_stress, edge_chunk=edge_chunk)
        energy = out[K.ENERGY].detach()
        cov = out[K.FORCES_COV].detach()
        stress = out[K.STRESS].detach() if compute_stress else None
        return Prediction(
            energy=energy,
            node_energy=out[K.NODE_ENERGY].detach(),
            energy_var_aleatoric=out[K.ENERGY_VAR].detach(),
            energy_var_epistemic=torch.zeros_like(energy),
            forces_cov_aleatoric=cov,
            forces_cov_epistemic=torch.zeros_like(cov),
            forces=out[K.FORCES].detach(),
            stress=stress,
            stress_var_epistemic=torch.zeros_like(stress) if compute_stress else None,
        )

    def networks(self) -> list[RACE]:
        return [self.model]

    def with_networks(self, networks: list[RACE]) -> "MVEPosterior":
        return MVEPosterior(self._check_networks(networks)[0])

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.model.state_dict())}

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]) -> "MVEPosterior":
        model = build_model(config)
        load_weights(model, state["weights"])
        return cls(model)

    def to(self, device=None, dtype=None) -> "MVEPosterior":
        self.model = rebuilt_in(self.model, dtype, device)
        return self
