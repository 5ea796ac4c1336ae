"""The posterior interface: what the trainer produces and the calculator consumes.

A :class:`Posterior` wraps one or more RACE networks and turns an atomic graph into a
:class:`Prediction`, with the variance already split into its aleatoric and epistemic parts.
Implementations register themselves by ``kind``; :func:`make_posterior` and the model file
look them up there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import ModelConfig
from ..errors import ConfigError, ModelFileError
from ..graph import AtomicGraph


@dataclass
class Prediction:
    """Posterior predictive for a batch of ``B`` structures with ``n`` atoms in total.

    Variances are in squared units. ``*_epistemic`` are zero for single-model posteriors.
    """

    energy: torch.Tensor  # (B,) eV
    node_energy: torch.Tensor  # (n,) eV
    energy_var_aleatoric: torch.Tensor  # (B,) eV²
    energy_var_epistemic: torch.Tensor  # (B,) eV²
    forces_cov_aleatoric: torch.Tensor  # (n, 3, 3) (eV/Å)²
    forces_cov_epistemic: torch.Tensor  # (n, 3, 3) (eV/Å)²
    forces: torch.Tensor | None = None  # (n, 3) eV/Å
    stress: torch.Tensor | None = None  # (B, 3, 3) eV/Å³
    stress_var_epistemic: torch.Tensor | None = None  # (B, 3, 3) (eV/Å³)², per component
    energy_ensemble: torch.Tensor | None = None  # (M, B) eV, sampling posteriors only
    forces_ensemble: torch.Tensor | None = None  # (M, n, 3) eV/Å, sampling posteriors only
    stress_ensemble: torch.Tensor | None = None  # (M, B, 3, 3) eV/Å³, sampling posteriors with stress
    energy_var_ensemble: torch.Tensor | None = None  # (M, B) eV², members' own variances
    forces_cov_ensemble: torch.Tensor | None = None  # (M, n, 3, 3) (eV/Å)², members' own

    @property
    def energy_var(self) -> torch.Tensor:
        """Total energy variance (B,) eV²."""
        return self.energy_var_aleatoric + self.energy_var_epistemic

    @property
    def forces_cov(self) -> torch.Tensor:
        """Total force covariance (n, 3, 3) (eV/Å)²."""
        return self.forces_cov_aleatoric + self.forces_cov_epistemic


class Posterior(ABC):
    """An approximate posterior over RACE weights with a predictive for atomic graphs.

    Its whole predictive life cycle sits in its class: :meth:`predict`, the networks it is
    built on (:meth:`networks`, :meth:`with_networks`: fine-tuning moves them without knowing
    the kind), and its stored state (:meth:`state_dict`, :meth:`from_state_dict`, versioned by
    ``state_version``). Fitting it from data is the job of the training method of the same
    name in :mod:`ase_race.training.methods`.
    """

    kind: ClassVar[str]
    #: True for posteriors that evaluate members or samples (energy_ensemble, forces_ensemble).
    provides_ensemble: ClassVar[bool] = False
    #: layout version of :meth:`state_dict`; bump it (and handle the old one in
    #: :meth:`upgrade_state`) whenever the stored tensors or keys change.
    state_version: ClassVar[int] = 1
    _registry: ClassVar[dict[str, type["Posterior"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Posterior._registry[cls.kind] = cls

    @property
    @abstractmethod
    def config(self) -> ModelConfig:
        """Hyperparameters of the underlying network(s)."""

    @abstractmethod
    def predict(
        self, graph: AtomicGraph, *, compute_stress: bool = False, edge_chunk: int | None = None
    ) -> Prediction:
        """Predictive mean and variances for ``graph`` (forces always, stress on request).

        ``edge_chunk`` bounds memory on large graphs (see :meth:`ase_race.nn.RACE.forward`).
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors (and plain values) that, with the config, rebuild this posterior."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]) -> "Posterior":
        """Inverse of :meth:`state_dict`."""

    @abstractmethod
    def networks(self) -> list:
        """The trainable RACE networks: the members of an ensemble, else the one (mean) network."""

    @abstractmethod
    def with_networks(self, networks: list) -> "Posterior":
        """A posterior of the same kind whose networks are ``networks`` (same architecture, as
        many as :meth:`networks` returns); everything else (a covariance, SWAG moments, an
        IVON Hessian, the sample seed) is kept, and sampled posteriors redraw around the new mean."""

    def describe(self) -> str:
        """A short human-readable description: the kind and how many members or samples."""
        return self.kind

    @classmethod
    def load_state(cls, config: ModelConfig, state: dict[str, Any], version: int = 1) -> "Posterior":
        """:meth:`from_state_dict` for a state written with layout ``version``."""
        if version > cls.state_version:
            raise ModelFileError(
                f"written by a newer ase-race (the {cls.kind!r} posterior state has layout version {version}, "
                f"this ase-race reads up to {cls.state_version}); upgrade ase-race to load it"
            )
        for old in range(version, cls.state_version):
            state = cls.upgrade_state(state, old)
        return cls.from_state_dict(config, state)

    @classmethod
    def upgrade_state(cls, state: dict[str, Any], version: int) -> dict[str, Any]:
        """A version-``version`` state brought to version + 1 (override when bumping)."""
        raise ConfigError(f"no upgrade of the {cls.kind!r} posterior state from version {version}")

    def _check_networks(self, networks: list) -> list:
        networks = list(networks)
        if len(networks) != len(self.networks()):
            raise ValueError(f"a {self.kind!r} posterior has {len(self.networks())} networks, got {len(networks)}")
        for network in networks:
            if network.config != self.config:
                raise ValueError(f"the new networks must share the posterior's ModelConfig ({self.kind!r})")
        return networks

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Posterior":
        """Move to ``device`` and/or cast to ``dtype`` (returns self)."""

    @property
    def n_samples_or_members(self) -> int:
        """M for ensembles, S for sampled posteriors, 1 otherwise."""
        return getattr(self, "n_members", getattr(self, "n_samples", 1))

    @property
    def dtype(self) -> torch.dtype:
        from ..nn import TORCH_DTYPES

        return TORCH_DTYPES[self.config.dtype]


def load_weights(model, weights: dict[str, torch.Tensor]):
    """``model.load_state_dict(weights)`` after checking that every stored tensor has the kind of
    dtype (floating, integer, boolean) of the network's own: load_state_dict would silently cast
    an int64 weight, so a damaged file would load. Returns ``model``."""
    own = model.state_dict()
    for name, value in weights.items():
        if name in own and isinstance(value, torch.Tensor) and _dtype_kind(value) != _dtype_kind(own[name]):
            raise ModelFileError(f"weight {name!r} is stored as {value.dtype}; the network's is {own[name].dtype}")
    model.load_state_dict(weights)
    return model


def _dtype_kind(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() else "bool" if t.dtype == torch.bool else "int"


def rebuilt_in(model, dtype: torch.dtype | None, device=None):
    """``model`` in ``dtype`` (rebuilt from its config, since the config names the dtype) and on
    ``device``, in eval mode; the same object when the dtype already matches."""
    from ..nn import TORCH_DTYPES, build_model

    if dtype is not None and dtype != model.dtype:
        name = {v: k for k, v in TORCH_DTYPES.items()}[dtype]
        new = build_model(model.config.replace(dtype=name))
        new.load_state_dict(model.state_dict())
        model = new
    return model.to(device=device).eval()


BUILT_IN = ("mve", "ensemble", "sampled", "last_layer", "novelty")


def posterior_class(kind: str) -> type[Posterior]:
    """The registered posterior class for ``kind``."""
    import importlib

    for module in BUILT_IN:  # importing a module registers its kinds
        importlib.import_module(f"{__package__}.{module}")

    try:
        return Posterior._registry[kind]
    except KeyError:
        raise ConfigError(
            f"unknown posterior kind {kind!r}; known kinds are {sorted(Posterior._registry)}"
        ) from None
