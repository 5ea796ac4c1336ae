"""``TrainConfig``: everything a training run needs, as frozen, round-trippable data.

The generic settings (data, model, optimisation, output) are fields of :class:`TrainConfig`.
The options of each posterior method are a small frozen dataclass owned by that method's
module in :mod:`ase_race.training.methods` and nested under its kind, in YAML as in Python::

    method: swag
    swag:
      start_epoch: 50
      rank: 40

``config.swag`` is then a :class:`~ase_race.training.methods.swag.SWAGOptions`. Every
registered method has a section (with its defaults) whichever method runs, so a config can
be switched to another method with ``replace(method=...)``. The flat keys of earlier releases
(``swag_start_epoch``, ``members``, ``laplace_subset``, ``test_samples``, ...) are still read,
with a ``FutureWarning`` naming the key to use instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..config import LOSSES, ModelConfig, coerce_field
from ..errors import ConfigError, warn_caller


class ReadOnlyDict(dict):
    """A dict that refuses changes (the frozen config's mappings); copies and pickles as a dict."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a TrainConfig is frozen: build a new one with replace()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self):
        return (ReadOnlyDict, (dict(self),))

    def __deepcopy__(self, memo):
        import copy

        return ReadOnlyDict(copy.deepcopy(dict(self), memo))


def _methods():
    from .methods import registered_methods  # the registry imports the trainer: not at import time

    return registered_methods()


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Settings of one training run; every key has a default (docs/training.md lists them).

    Data: ``train_file`` (or frames passed to :func:`~ase_race.training.fit`), ``valid_file``
    (else ``valid_fraction`` of the training set, split with ``seed``; a value ≥ 1 is a count),
    ``test_file`` (evaluated at the end), ``e0s_file``, ``n_train`` (cap on training frames,
    taken after the split), ``energy_key`` / ``forces_key`` / ``stress_key`` (label keys, falling
    back to values ASE attaches), ``e0s`` (``"isolated"``: IsolatedAtom frames in ``e0s_file`` or
    the training data; ``"fit"``: least squares; or a mapping element → eV).

    Model: ``preset`` plus ``model`` (overrides of :class:`~ase_race.config.ModelConfig` fields;
    species, e0s, scale, shift and avg_num_neighbors are filled from the data unless given).

    Optimisation: ``loss`` (mse | nll_e | nll_jef), ``energy_weight`` λ_E, ``forces_weight``
    λ_F, ``beta`` (β-NLL), ``warmup_epochs`` (mean-only MSE before the NLL switches on),
    ``batch_size``, ``max_epochs``, ``lr``, ``weight_decay``, ``amsgrad``, ``clip_grad`` (max
    gradient norm; 0 = off), ``ema_decay`` (0 = off), ``plateau_patience`` / ``plateau_factor``
    / ``min_lr`` (plateau learning-rate decay on the validation loss; factor 1 = no decay),
    ``max_time_s`` (stop after this wall time, 0 = no limit).

    Posterior: ``method`` (a registered kind: mve | ensemble | swag | ivon | laplace) and one
    options section per method (``config.ensemble``, ``config.swag``, ...; see each method's
    module and docs/posteriors/).

    Output: ``output_dir`` (checkpoint, metrics.csv, the model file), ``model_name``,
    ``checkpoint_every`` (steps between checkpoints; one is always written at epoch ends),
    ``seed``, ``device``.
    """

    train_file: str = ""
    valid_file: str = ""
    test_file: str = ""
    e0s_file: str = ""
    valid_fraction: float = 0.05
    n_train: int = 0
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    stress_key: str = "REF_stress"
    e0s: Any = "isolated"
    preset: str = "small"
    model: Mapping[str, Any] = field(default_factory=dict)
    method: str = "mve"
    loss: str = "nll_jef"
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    beta: float = 0.0
    warmup_epochs: int = 0
    batch_size: int = 8
    max_epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 0.0
    amsgrad: bool = True
    clip_grad: float = 10.0
    ema_decay: float = 0.99
    plateau_patience: int = 10
    plateau_factor: float = 0.8
    min_lr: float = 1e-5
    max_time_s: float = 0.0
    output_dir: str = "race_run"
    model_name: str = "model"
    checkpoint_every: int = 100
    seed: int = 0
    device: str = ""
    #: kind → that method's options (read-only); reach them as ``config.<kind>``
    options: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, **kwargs: Any) -> None:
        methods = _methods()
        fields = {f.name: f for f in dataclasses.fields(self)}
        legacy = {key for method in methods.values() for key in method.legacy_keys()}
        unknown = sorted(set(kwargs) - set(fields) - set(methods) - legacy)
        if unknown:
            valid = sorted(set(fields) - {"options"} | set(methods))
            raise ConfigError(f"unknown training config keys {unknown}; valid keys are {valid}")
        for name, f in fields.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()
            object.__setattr__(self, name, coerce_field(name, f.type, value))
        object.__setattr__(self, "model", ReadOnlyDict(self.model))
        sections: dict[str, Any] = {}
        given = dict(self.options)
        for kind, method in methods.items():
            if method.Options is None:
                if kwargs.get(kind) is not None:
                    raise ConfigError(f"method {kind!r} has no options; remove the {kind!r} section")
                sections[kind] = None
                continue
            # Precedence, lowest first: defaults (or the sections being replaced), the flat keys
            # of earlier releases, the section itself; so that a section option given on top of
            # an old config (a CLI flag, an override) wins.
            section = given.get(kind)
            section = method.Options() if section is None else _section(method, kind, section)
            old = {k: v for k, v in kwargs.items() if k in method.legacy_keys()}
            if old:
                section = method.read_legacy(section, old, kwargs.get("method", "mve"))
            if kwargs.get(kind) is not None:
                section = _merge(method, kind, section, kwargs[kind])
            sections[kind] = section
        for key in sorted(legacy & set(kwargs)):
            owners = [kind for kind, m in methods.items() if key in m.legacy_keys()]
            target = kwargs.get("method", "mve") if len(owners) > 1 else owners[0]
            name = methods[target].legacy_keys().get(key) if target in owners else None
            warn_deprecated(key, f"{target}.{name}" if name else f"<{'|'.join(owners)}>.{key} (ignored by method {target!r})")
        object.__setattr__(self, "options", ReadOnlyDict(sections))
        self._validate()

    def __reduce__(self):
        return (TrainConfig.from_dict, (self.to_dict(),))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: a method's options section.
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.method not in self.options:
            raise ConfigError(f"method={self.method!r} is not one of {tuple(self.options)}")
        if self.batch_size < 1 or self.max_epochs < 0 or self.checkpoint_every < 1:
            raise ConfigError("batch_size and checkpoint_every must be ≥ 1 and max_epochs ≥ 0")
        positive = {"lr": self.lr, "valid_fraction": self.valid_fraction}
        for key, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        for key in ("energy_weight", "forces_weight", "beta", "weight_decay", "clip_grad", "min_lr", "max_time_s",
                    "warmup_epochs", "n_train", "plateau_patience"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a non-negative number, got {value!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.plateau_factor <= 1:
            raise ConfigError(f"plateau_factor must be in (0, 1] (1 = no decay), got {self.plateau_factor}")
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise ConfigError(f"unknown model keys {unknown} in the training config")

    @property
    def method_options(self) -> Any:
        """The options section of ``method`` (None for a method without options)."""
        return self.options[self.method]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict: the fields, then one section per method (YAML's layout)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out["model"] = dict(self.model)
        for kind, section in self.options.items():
            if section is not None:
                out[kind] = dataclasses.asdict(section)
        return out

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied and validated; a section given as a dict updates
        only the keys it names (``replace(swag={"rank": 8})``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TrainConfig(**{**data, **changes})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a (nested) dict, refusing unknown keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read a YAML file (or start from defaults when ``path`` is None) and apply
        ``key=value`` overrides; ``model.KEY=value`` sets a model field and ``swag.KEY=value``
        (any method's kind) an option of that method. Values are YAML."""
        import yaml

        data: dict[str, Any] = {}
        if path:
            with open(path) as handle:
                data = yaml.safe_load(handle) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: a training config must be a YAML mapping")
        data = {**data, "model": dict(data.get("model") or {})}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            parsed = yaml.safe_load(value)
            section, dot, name = key.partition(".")
            if dot:
                if not isinstance(data.get(section, {}), dict):
                    raise ConfigError(f"override {item!r}: {section!r} is not a section")
                current = dict(data.get(section) or {})
                for spelling in _spellings(section, name):
                    current.pop(spelling, None)  # the override wins over the file's other name for it
                data[section] = {**current, name: parsed}
            else:
                data[key] = parsed
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def _section(method, kind: str, value: Any) -> Any:
    """An options section from a dict or an instance of the method's options class."""
    if isinstance(value, method.Options):
        return value
    if isinstance(value, Mapping):
        return method.Options.from_dict(value)
    raise ConfigError(f"the {kind!r} section must be a mapping of options, got {value!r}")


def _spellings(kind: str, name: str) -> set[str]:
    """The other names of option ``name`` of method ``kind`` (earlier and current), if it has any."""
    method = _methods().get(kind)
    renamed = method.Options.renamed if method is not None and method.Options is not None else {}
    return {spelling for pair in renamed.items() if name in pair for spelling in pair} - {name}


def _merge(method, kind: str, current: Any, value: Any) -> Any:
    """``current`` updated by the keys of ``value`` (a dict), or ``value`` itself (an instance)."""
    if isinstance(value, Mapping) and current is not None:
        base = dataclasses.asdict(current)
        for old, new in method.Options.renamed.items():
            if old in value:
                base.pop(new, None)  # the value's earlier name replaces it
        return method.Options.from_dict({**base, **value})
    return _section(method, kind, value)


def warn_deprecated(old: str, new: str) -> None:
    """The message for a flat key of an earlier release."""
    warn_caller(f"training config key {old!r} is deprecated; write {new!r} instead")
