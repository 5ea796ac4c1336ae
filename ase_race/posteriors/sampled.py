"""Gaussian posteriors over all weights, predicted by Monte Carlo: SWAG, IVON and diagonal Laplace.

Each holds a mean network θ̄ and a recipe for θ ~ q(θ). At prediction time S weight samples
are drawn once (from a generator seeded with ``sample_seed``, never the global RNG) and kept,
so repeated calls, e.g. the steps of an MD run, see the same samples and a smooth potential.
The S samples are evaluated together by :class:`~.stacked.StackedModel` and mixed with the
rule of :mod:`~.mixture`, exactly like the members of an ensemble.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from typing import Any

import torch

from ..config import ModelConfig
from ..graph import AtomicGraph
from ..nn import RACE, build_model
from .base import Posterior, Prediction, load_weights, rebuilt_in
from .mixture import mixture_prediction
from .stacked import StackedModel, flat_parameters, unflatten


class SampledPosterior(Posterior):
    """Base class: a mean network plus a Gaussian over its flattened parameters (P,).

    Subclasses implement :meth:`draw` and the tensors they store.
    """

    provides_ensemble = True
    default_samples: int = 16

    def __init__(self, model: RACE, n_samples: int | None = None, sample_seed: int = 0):
        self.model = model.eval()
        self.n_samples = int(n_samples or self.default_samples)
        self.sample_seed = int(sample_seed)
        self._stacked: StackedModel | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def networks(self) -> list[RACE]:
        return [self.model]

    def with_networks(self, networks: list[RACE]) -> "SampledPosterior":
        new = copy.copy(self)
        new.model = self._check_networks(networks)[0].eval()
        new._stacked = None  # the samples are drawn again around the new mean
        return new

    def describe(self) -> str:
        return f"{self.kind} ({self.n_samples} samples)"

    @property
    def mean(self) -> torch.Tensor:
        """θ̄, (P,)."""
        return flat_parameters(self.model)

    @abstractmethod
    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples θ ~ q(θ), (n, P) in float64."""

    def samples(self) -> torch.Tensor:
        """The S fixed samples (S, P) used for prediction."""
        generator = torch.Generator().manual_seed(self.sample_seed)
        return self.draw(self.n_samples, generator)

    def set_samples(self, n_samples: int, sample_seed: int | None = None) -> None:
        """Change the number of test samples (and their seed); they are drawn again."""
        self.n_samples = int(n_samples)
        if sample_seed is not None:
            self.sample_seed = int(sample_seed)
        self._stacked = None

    def _stacked_model(self) -> StackedModel:
        if self._stacked is None:
            params = unflatten(self.model, self.samples().to(self.model.dtype))
            device = next(self.model.parameters()).device
            self._stacked = StackedModel(self.model, {k: v.to(device) for k, v in params.items()})
        return self._stacked

    def predict(self, graph: AtomicGraph, *, compute_stress: bool = False, edge_chunk: int | None = None) -> Prediction:
        out = self._stacked_model()(graph, compute_stress=compute_stress, edge_chunk=edge_chunk)
        return mixture_prediction(out, compute_stress)

    def _base_state(self) -> dict[str, Any]:
        return {"weights": dict(self.model.state_dict()), "n_samples": self.n_samples, "sample_seed": self.sample_seed}

    @staticmethod
    def _model_from_state(config: ModelConfig, state: dict[str, Any]) -> RACE:
        model = build_model(config)
        load_weights(model, state["weights"])
        return model

    def to(self, device=None, dtype=None) -> "SampledPosterior":
        self.model = rebuilt_in(self.model, dtype, device)
        self._stacked = None
        return self


class DiagonalGaussianPosterior(SampledPosterior):
    """θ ~ N(θ̄, diag(v)): the shared form of IVON and diagonal Laplace."""

    def __init__(self, model: RACE, variance: torch.Tensor, n_samples=None, sample_seed: int = 0, hyper=None):
        super().__init__(model, n_samples, sample_seed)
        if variance.shape != (flat_parameters(model).numel(),):
            raise ValueError("the variance must have one entry per parameter")
        self.variance = variance.double().cpu()
        self.hyper = {k: float(v) for k, v in (hyper or {}).items()}

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.variance.numel(), generator=generator, dtype=torch.float64)
        return self.mean.double().cpu() + z * self.variance.sqrt()

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "variance": self.variance, "hyper": self.hyper}

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]):
        return cls(
            cls._model_from_state(config, state), state["variance"], state["n_samples"], state["sample_seed"],
            state.get("hyper"),
        )


class IVONPosterior(DiagonalGaussianPosterior):
    """IVON's variational posterior: N(m, 1 / (λ (h + δ))) per weight.

    m: the optimiser's mean (the network's weights), h: its Hessian estimate, λ: the effective
    sample size, δ: the weight decay. ``hyper`` records λ and δ; ``variance`` is the result.
    """

    kind = "ivon"
    default_samples = 16

    @classmethod
    def from_optimizer_state(cls, model: RACE, hess: torch.Tensor, ess: float, weight_decay: float, **kwargs):
        variance = 1.0 / (ess * (hess.double().cpu() + weight_decay))
        return cls(model, variance, hyper={"ess": ess, "weight_decay": weight_decay}, **kwargs)


class DiagLaplacePosterior(DiagonalGaussianPosterior):
    """Laplace over every weight with a diagonal GGN: N(θ*, (H/σ² + α)⁻¹), sampled.

    ``hyper`` records the prior precision α and noise σ found by marginal likelihood.
    """

    kind = "laplace"
    default_samples = 16


class SWAGPosterior(SampledPosterior):
    """SWAG: N(θ̄, ½ diag(θ²̄ − θ̄²) + D Dᵀ / (2(K − 1))) from K deviation columns D.

    Stored: the mean θ̄ (the network's weights), the second moment θ²̄ and D (K, P).
    """

    kind = "swag"
    default_samples = 30

    def __init__(self, model: RACE, sq_mean: torch.Tensor, deviations: torch.Tensor, n_samples=None, sample_seed: int = 0):
        super().__init__(model, n_samples, sample_seed)
        self.sq_mean = sq_mean.double().cpu()
        self.deviations = deviations.double().cpu()
        if self.deviations.shape[0] < 2:
            raise ValueError("SWAG needs at least two deviation columns")

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        mean = self.mean.double().cpu()
        diag = (self.sq_mean - mean**2).clamp(min=0.0)
        k = self.deviations.shape[0]
        z1 = torch.randn(n, mean.numel(), generator=generator, dtype=torch.float64)
        z2 = torch.randn(n, k, generator=generator, dtype=torch.float64)
        return mean + math.sqrt(0.5) * diag.sqrt() * z1 + (z2 @ self.deviations) / math.sqrt(2 * (k - 1))

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "sq_mean": self.sq_mean, "deviations": self.deviations}

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]) -> "SWAGPosterior":
        return cls(
            cls._model_from_state(config, state), state["sq_mean"], state["deviations"], state["n_samples"],
            state["sample_seed"],
        )
