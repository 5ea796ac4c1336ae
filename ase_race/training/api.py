"""``train(config) -> Path``: from a TrainConfig to an exported model file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ase.data import atomic_numbers, chemical_symbols

from ..config import ModelConfig, TrainConfig
from ..data import KeyMap, dataset_statistics, fit_e0s, isolated_atom_e0s, read_frames, split_frames
from ..data.readers import fingerprint
from ..errors import ConfigError, DataError
from ..modelfile import atomic_write_text, save_model
from ..nn import TORCH_DTYPES
from .batches import GraphDataset
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


def prepare(config: TrainConfig):
    """Read and split the data and derive the model config. Returns (model_config, train, valid)."""
    if not config.train_file:
        raise ConfigError("train_file is not set")
    keys = label_keys(config)
    frames = read_frames(config.train_file, keys=keys)
    isolated = [f for f in frames if f.is_isolated_atom]
    frames = [f for f in frames if not f.is_isolated_atom]
    if config.valid_file:
        valid = [f for f in read_frames(config.valid_file, keys=keys) if not f.is_isolated_atom]
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


def train(config: TrainConfig, on_step=None) -> Path:
    """Train the posterior ``config.method``, evaluate it on ``test_file``, export the model.

    Returns the path of the written model file (``output_dir/model_name.pt``).
    """
    from .methods import FITTERS

    model_config, train_frames, valid_frames = prepare(config)
    dtype = TORCH_DTYPES[model_config.dtype]
    train_set = GraphDataset(train_frames, model_config.species, model_config.r_max, dtype)
    valid_set = GraphDataset(valid_frames, model_config.species, model_config.r_max, dtype)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    log.info("%s: training on %d structures, validating on %d; %s", config.method, len(train_set), len(valid_set), model_config)
    result = FITTERS[config.method](config, model_config, train_set, valid_set, on_step)
    if result is None:  # a rank other than 0 in data-parallel training
        return Path(config.output_dir) / f"{config.model_name}.pt"
    posterior = result.posterior
    metrics = {"valid": evaluate_dataset(posterior, valid_set)}
    if config.test_file:
        test_frames = read_frames(config.test_file, keys=label_keys(config))
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
    path = save_model(Path(config.output_dir) / f"{config.model_name}.pt", posterior, metadata=metadata)
    atomic_write_text(Path(config.output_dir) / "metrics.json", json.dumps(metrics, indent=2))
    log.info("wrote %s; %s", path, json.dumps(metrics))
    return path
