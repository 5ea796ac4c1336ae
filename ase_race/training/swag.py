"""SWAG moments collected while training (Maddox et al. 2019).

After every snapshot θ_t (t = 1 … T):

    θ̄   = (1/T) Σ_t θ_t            running mean
    θ²̄  = (1/T) Σ_t θ_t²           running second moment (element-wise)
    D    = [θ_t − θ̄_t] for the last K snapshots, θ̄_t being the mean after snapshot t

which is what :class:`~ase_race.posteriors.SWAGPosterior` samples from.
"""

from __future__ import annotations

import torch


class SWAGCollector:
    """Running SWAG statistics of a flattened parameter vector (P,), kept in float64."""

    def __init__(self, n_params: int, rank: int):
        self.rank = rank
        self.count = 0
        self.mean = torch.zeros(n_params, dtype=torch.float64)
        self.sq_mean = torch.zeros(n_params, dtype=torch.float64)
        self.deviations: list[torch.Tensor] = []

    def collect(self, theta: torch.Tensor) -> None:
        theta = theta.detach().double().cpu()
        self.count += 1
        self.mean += (theta - self.mean) / self.count
        self.sq_mean += (theta**2 - self.sq_mean) / self.count
        self.deviations.append(theta - self.mean)
        self.deviations = self.deviations[-self.rank :]

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "mean": self.mean,
            "sq_mean": self.sq_mean,
            "deviations": torch.stack(self.deviations) if self.deviations else torch.zeros(0, self.mean.numel(), dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean, self.sq_mean = state["mean"].double(), state["sq_mean"].double()
        self.deviations = list(state["deviations"].unbind(0))
