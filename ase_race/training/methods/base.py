"""The fitting side of a posterior method: its options, its hooks into the training loop, its fit.

A method subclasses :class:`Method`, sets ``kind`` (the name users write as ``method:``) and,
when it has settings, ``Options`` (a frozen dataclass deriving from :class:`MethodOptions`).
Defining the subclass registers it; :func:`registered_methods` lists them for the training
config and the CLI. The predictive side of the same method is a
:class:`~ase_race.posteriors.Posterior` registered under its own kind.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

from ...config import coerce_field
from ...errors import ConfigError, warn_caller
from ...posteriors import Posterior


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: strict construction from a dict."""

    #: option names that change the training run itself: a checkpoint resumes only when they
    #: match (the others act after training, e.g. the number of test samples).
    training_keys: ClassVar[tuple[str, ...]] = ()
    #: option names of earlier releases → their names now (configs and checkpoints that hold
    #: them are read, with a FutureWarning).
    renamed: ClassVar[Mapping[str, str]] = MappingProxyType({})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                if new in data:
                    raise ConfigError(f"{cls.__name__}: give {new!r} only ({old!r} is its earlier name)")
                warn_caller(f"{cls.__name__}: option {old!r} is deprecated; write {new!r} instead")
                data[new] = data.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: coerce_field(k, types[k], v) for k, v in data.items()})

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass
class Fitted:
    """What a method's fit returns: the posterior and a summary for the model file's metadata."""

    posterior: Posterior
    summary: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """One way of fitting a posterior from a training and a validation set.

    Class attributes:
        kind: the ``method`` name in training configs.
        Options: the options dataclass (``config.<kind>``), or None.
        legacy: flat training-config keys of earlier releases → option names.
    """

    kind: ClassVar[str]
    Options: ClassVar[type | None] = None
    legacy: ClassVar[dict[str, str]] = {}
    _registry: ClassVar[dict[str, type["Method"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            Method._registry[cls.kind] = cls

    @classmethod
    def legacy_keys(cls) -> dict[str, str]:
        return dict(cls.legacy)

    @classmethod
    def read_legacy(cls, options: Any, old: Mapping[str, Any], method: str) -> Any:
        """``options`` with the values of flat legacy keys applied. A key several methods share
        (``test_samples``) applies only to the method that runs."""
        shared = {"test_samples"}
        changes = {cls.legacy[k]: v for k, v in old.items() if k not in shared or method == cls.kind}
        return options.replace(**changes) if changes else options

    @classmethod
    def training_settings(cls, options: Any) -> dict[str, Any]:
        """The options that must match for a checkpoint of this method to resume."""
        if options is None:
            return {}
        return {k: getattr(options, k) for k in options.training_keys}

    @classmethod
    def requires(cls, options: Any) -> tuple[str, ...]:
        """Optional packages (keys of :data:`ase_race.extras.EXTRAS`) a fit with ``options`` needs."""
        return ()

    @classmethod
    def hooks(cls, config):
        """The method's :class:`~ase_race.training.loop.TrainingHooks` for a run of ``config``
        (None: the plain loop)."""
        return None

    @abstractmethod
    def fit(self, config, model_config, train, valid, *, in_memory: bool = False,
            on_step: Callable | None = None) -> Fitted | None:
        """Fit the posterior on ``train`` (a :class:`~ase_race.training.batches.GraphDataset`),
        selecting and validating on ``valid``.

        Args:
            config: the :class:`~ase_race.training.config.TrainConfig`; ``config.<kind>`` holds
                this method's options.
            model_config: the network's :class:`~ase_race.config.ModelConfig`, filled from the data.
            in_memory: no checkpoints or files (a run that cannot be resumed).
            on_step: callback ``f(trainer)`` after every optimiser step.
        Returns:
            the fitted posterior, or None on data-parallel ranks other than 0.
        """


def registered_methods() -> dict[str, type[Method]]:
    """kind → Method class, for every method the package defines."""
    from . import mve, ensemble, swag, ivon, laplace, novelty  # noqa: F401, I001  importing registers them, in this order

    return dict(Method._registry)


def method_class(kind: str) -> type[Method]:
    methods = registered_methods()
    if kind not in methods:
        raise ConfigError(f"unknown method {kind!r}; choose one of {sorted(methods)}")
    return methods[kind]


def summary(states: list) -> dict[str, Any]:
    """Epochs, best epoch, wall time and throughput of one or more training runs."""
    wall = sum(s.elapsed_s for s in states)
    return {
        "best_epoch": [s.best_epoch for s in states] if len(states) > 1 else states[0].best_epoch,
        "epochs": [s.epoch for s in states] if len(states) > 1 else states[0].epoch,
        "wall_time_s": wall,
        "structures_per_s": sum(s.structures_seen for s in states) / max(wall, 1e-9),
    }


def base_network(path, method: str):
    """The one network of the model file ``path`` that ``method`` is fitted around."""
    from ...modelfile import load_model

    networks = load_model(path).posterior.networks()
    if len(networks) != 1:
        raise ConfigError(f"{path}: {method} needs a single-network model file, not one with {len(networks)} networks")
    return networks[0]
