"""From a :class:`TrainConfig` and labelled data to a fitted posterior.

:func:`fit` takes the data in memory (lists of :class:`~ase_race.data.Frame` or of labelled
``ase.Atoms``) or reads the config's files, and returns a :class:`~ase_race.modelfile.ModelBundle`;
:func:`train` is :func:`fit` plus writing the model file and ``metrics.json`` (what
``ase-race train CONFIG`` runs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ase.data import atomic_numbers, chemical_symbols

from typing import Sequence

from ase import Atoms

from ..config import ModelConfig
from ..data import Frame, KeyMap, dataset_statistics, fit_e0s, isolated_atom_e0s, read_frames, split_frames
from ..data.readers import fingerprint, frame_from_atoms
from ..errors import ConfigError, DataError
from .._atomic import atomic_write_text
from ..modelfile import ModelBundle, save_model
from ..nn import TORCH_DTYPES
from .batches import GraphDataset
from .config import TrainConfig
from .metrics import evaluate_dataset

log = logging.getLogger("ase_race.training")


def resolve_e0s(config: TrainConfig, frames, species) -> dict[int, float]:
    """E0 per atomic number from the config's ``e0s`` setting (see TrainConfig)."""
    setting = config.e0s
    if isinstance(setting, dict):
        e0s = {int(k) if str(k).isdigit() else atomic_numbers[str(k)]: float(v) for k, v in setting.items()}
        missing = sorted(set(species) - set(e0s))
        if missing:
            raise ConfigError(f"e0s lacks elements {[chemical_symbols[z] for z in missing]}")
        return {z: e0s[z] for z in species}
    if setting == "isolated":
        if config.e0s_file:
            source = read_frames(config.e0s_file, keys=label_keys(config), require=("energy",))
            return isolated_atom_e0s(source, species, every_single_atom=True)
        return isolated_atom_e0s(frames, species)
    if setting == "fit":
        return fit_e0s([f for f in frames if not f.is_isolated_atom], species)
    raise ConfigError(f"e0s must be 'isolated', 'fit' or a mapping element → eV, got {setting!r}")


def label_keys(config: TrainConfig) -> KeyMap:
    """Where ``config`` says the labels are stored (``energy_key``, ``forces_key``, ``stress_key``)."""
    return KeyMap(energy=config.energy_key, forces=config.forces_key, stress=config.stress_key)


#: labelled structures in memory: the package's frames, or ``ase.Atoms`` with their labels under
#: the config's keys (or attached by a calculator)
Structures = Sequence[Frame | Atoms]


def as_frames(items: Structures, keys: KeyMap, what: str = "structure") -> list[Frame]:
    """``items`` as frames; ``Atoms`` are read with ``keys``, and named in errors by position."""
    frames = []
    for i, item in enumerate(items):
        if isinstance(item, Frame):
            frames.append(item)
        elif isinstance(item, Atoms):
            frames.append(frame_from_atoms(item, keys, source=f"{what} {i}"))
        else:
            raise DataError(f"{what} {i} is a {type(item).__name__}, not an ase.Atoms or a Frame")
    return frames


def prepare(config: TrainConfig, train: Structures | None = None, valid: Structures | None = None):
    """The data sets and the model config of a run. Returns (model_config, train, valid).

    ``train`` and ``valid`` (in memory) replace ``train_file`` and ``valid_file``; without a
    validation set, ``valid_fraction`` of the training set is split off with ``seed``.
    Isolated-atom frames among the training data are E0 references, not training structures.
    """
    keys = label_keys(config)
    if train is not None:
        frames = as_frames(train, keys, "training structure")
    elif config.train_file:
        frames = read_frames(config.train_file, keys=keys)
    else:
        raise ConfigError("no training data: set train_file or pass the structures")
    isolated = [f for f in frames if f.is_isolated_atom]
    frames = [f for f in frames if not f.is_isolated_atom]
    if valid is not None or config.valid_file:
        given = as_frames(valid, keys, "validation structure") if valid is not None else read_frames(config.valid_file, keys=keys)
        valid = [f for f in given if not f.is_isolated_atom]
        train = frames
    else:
        train, valid = split_frames(frames, config.valid_fraction, config.seed)
    if config.n_train:
        train = train[: config.n_train]
    if not valid:
        raise DataError("the validation set is empty; set valid_file or valid_fraction")
    species = tuple(sorted({int(z) for f in train + valid for z in f.atoms.numbers}))
    species = tuple(config.model.get("species", species))
    if "e0s" in config.model:  # given explicitly under model: they win, like every model key
        e0s = dict(zip(species, config.model["e0s"]))
    else:
        e0s = resolve_e0s(config, isolated + train, species)
    base = ModelConfig.from_preset(config.preset, **{**config.model, "species": species})
    stats = dataset_statistics(train, e0s, base.r_max)
    filled = {key: config.model.get(key, value) for key, value in stats.items()}
    model_config = base.replace(e0s=tuple(float(e0s[z]) for z in species), **filled)
    return model_config, train, valid


def fit(
    config: TrainConfig,
    train: Structures | None = None,
    valid: Structures | None = None,
    test: Structures | None = None,
    *,
    on_step=None,
    in_memory: bool = False,
) -> ModelBundle | None:
    """Fit the posterior ``config.method`` and evaluate it; no model file is written.

    Unless ``in_memory``, ``output_dir`` gets what resumes a killed run (checkpoints and
    ``metrics.csv``, per member for an ensemble).

    Args:
        config: the run's settings; its data files are read only where no data are passed.
        train, valid, test: labelled structures in memory (see :func:`prepare`); ``test``
            replaces ``test_file`` for the final evaluation.
        on_step: callback ``f(trainer)`` after every optimiser step.
        in_memory: write no checkpoints either (the run cannot be resumed).
    Returns:
        the posterior with its metadata (training summary, validation and test metrics), or
        None on data-parallel ranks other than 0.
    """
    from ..extras import require
    from .methods import method_class

    method = method_class(config.method)
    for name in method.requires(config.options.get(config.method)):  # before any data is read
        require(name, f"method {config.method!r}")
    model_config, train_frames, valid_frames = prepare(config, train, valid)
    dtype = TORCH_DTYPES[model_config.dtype]
    train_set = GraphDataset(train_frames, model_config.species, model_config.r_max, dtype)
    valid_set = GraphDataset(valid_frames, model_config.species, model_config.r_max, dtype)
    if not in_memory:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    log.info("%s: training on %d structures, validating on %d; %s", config.method, len(train_set), len(valid_set), model_config)
    result = method().fit(config, model_config, train_set, valid_set, in_memory=in_memory, on_step=on_step)
    if result is None:  # a rank other than 0 in data-parallel training
        return None
    posterior = result.posterior
    metrics = {"valid": evaluate_dataset(posterior, valid_set)}
    if test is not None or config.test_file:
        keys = label_keys(config)
        test_frames = as_frames(test, keys, "test structure") if test is not None else read_frames(config.test_file, keys=keys)
        metrics["test"] = evaluate_dataset(posterior, GraphDataset(test_frames, model_config.species, model_config.r_max, dtype))
    metadata = {
        "training": {
            "config": config.to_dict(),
            "n_train": len(train_set),
            "n_valid": len(valid_set),
            "train_fingerprint": fingerprint(train_frames),
            **result.summary,
        },
        "metrics": metrics,
    }
    return ModelBundle(posterior, metadata=metadata)


def train(
    config: TrainConfig,
    train: Structures | None = None,
    valid: Structures | None = None,
    test: Structures | None = None,
    *,
    on_step=None,
) -> Path:
    """:func:`fit`, then write ``output_dir/model_name.pt`` and ``metrics.json``; returns the path.

    Rerunning a killed run with the same settings resumes it from its checkpoints.
    """
    path = Path(config.output_dir) / f"{config.model_name}.pt"
    bundle = fit(config, train, valid, test, on_step=on_step)
    if bundle is None:
        return path
    save_model(path, bundle.posterior, metadata=bundle.metadata)
    metrics = bundle.metadata["metrics"]
    atomic_write_text(Path(config.output_dir) / "metrics.json", json.dumps(metrics, indent=2))
    log.info("wrote %s; %s", path, json.dumps(metrics))
    return path
