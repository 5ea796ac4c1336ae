"""Deep ensembles: M networks trained from different seeds, mixed as equally weighted members."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..graph import AtomicGraph
from ..nn import RACE, build_model
from .base import Posterior, Prediction, load_weights, rebuilt_in
from .mixture import mixture_prediction
from .stacked import StackedModel, stack_parameters


def _check_compatible(models: list[RACE]) -> None:
    first = models[0]
    for m in models[1:]:
        if m.config != first.config:
            raise ValueError("ensemble members must share one ModelConfig")
        for (name, a), (_, b) in zip(first.named_buffers(), m.named_buffers()):
            if not torch.equal(a, b):
                raise ValueError(f"ensemble members differ in buffer {name!r}")


class EnsemblePosterior(Posterior):
    """M RACE networks (MSE- or NLL-trained) evaluated in one batched pass.

    The predictive is the mixture rule (:mod:`.mixture`): mean of the members' means,
    aleatoric = mean of their variances (zero-free only for NLL members), epistemic = their
    spread. MSE members carry untrained variance heads; for them only the epistemic part is
    meaningful, and ``aleatoric=False`` (stored in the file) replaces their head variances by
    the floor ``cov_eps``.
    """

    kind = "ensemble"
    provides_ensemble = True

    def __init__(self, members: list[RACE], aleatoric: bool = True):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        _check_compatible(members)
        self.members = list(members)
        self.aleatoric = aleatoric
        self._stacked = StackedModel(members[0], stack_parameters(members))

    @property
    def config(self) -> ModelConfig:
        return self.members[0].config

    @property
    def n_members(self) -> int:
        return len(self.members)

    def networks(self) -> list[RACE]:
        return list(self.members)

    def with_networks(self, networks: list[RACE]) -> "EnsemblePosterior":
        return EnsemblePosterior(self._check_networks(networks), aleatoric=self.aleatoric)

    def describe(self) -> str:
        heads = "" if self.aleatoric else ", spread only"
        return f"{self.kind} ({self.n_members} members{heads})"

    def predict(self, graph: AtomicGraph, *, compute_stress: bool = False, edge_chunk: int | None = None) -> Prediction:
        out = self._stacked(graph, compute_stress=compute_stress, edge_chunk=edge_chunk)
        if not self.aleatoric:
            self._drop_heads(out)
        return mixture_prediction(out, compute_stress)

    def _drop_heads(self, out: dict) -> None:
        """MSE members: replace the untrained head variances by the floor ``cov_eps``.

        A floor rather than zero keeps the predictive proper and BALD finite (it is
        ½ log(1 + epistemic/floor) then, still ordered by the epistemic part).
        """
        eps = self.config.cov_eps
        out["energy_var"] = torch.full_like(out["energy_var"], eps)
        eye = torch.eye(3, dtype=out["forces_cov"].dtype, device=out["forces_cov"].device)
        out["forces_cov"] = (eps * eye).expand_as(out["forces_cov"]).clone()

    def predict_loop(self, graph: AtomicGraph, *, compute_stress: bool = False) -> Prediction:
        """The same predictive from a plain Python loop over members (reference and benchmark)."""
        outs = [m(graph, compute_forces=True, compute_stress=compute_stress) for m in self.members]
        keys = ["energy", "energy_var", "node_energy", "forces", "forces_cov"] + (["stress"] if compute_stress else [])
        stacked = {k: torch.stack([o[k].detach() for o in outs]) for k in keys}
        if not self.aleatoric:
            self._drop_heads(stacked)
        return mixture_prediction(stacked, compute_stress)

    def state_dict(self) -> dict[str, Any]:
        return {"members": [dict(m.state_dict()) for m in self.members], "aleatoric": self.aleatoric}

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]) -> "EnsemblePosterior":
        members = []
        for weights in state["members"]:
            model = build_model(config)
            load_weights(model, weights)
            members.append(model.eval())
        return cls(members, aleatoric=bool(state.get("aleatoric", True)))

    def to(self, device=None, dtype=None) -> "EnsemblePosterior":
        self.members = [rebuilt_in(m, dtype, device) for m in self.members]
        self._stacked = StackedModel(self.members[0], stack_parameters(self.members))
        return self
