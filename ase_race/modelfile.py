"""The single-file model format: save, load, version upgrades (docs/model_format.md).

A model file is a ``torch.save`` of a plain dict, readable with ``torch.load(weights_only=True)``
(no pickled code is ever executed)::

    {
      "format": "ase-race-model",       # FORMAT_NAME
      "version": 1,                     # FORMAT_VERSION
      "config": {...},                  # ModelConfig.to_dict()
      "species": [1, 6, 8],             # copies of config values, for people and other tools
      "e0s": [...], "cutoff": 5.0, "dtype": "float64",
      "posterior": {"kind": "mve", "version": 1, "state": {...tensors...}},  # the state's layout version
      "calibration": {"energy_var_scale": 1.0, "forces_var_scale": 1.0, "stress_var_scale": 1.0},
      "metadata": {...},                # JSON-able: versions, training data fingerprint, metrics
    }

Older versions are brought up to date by a chain of ``_upgrade_vN_to_vN+1`` functions; a file
from a newer version is refused with both numbers. Files are written atomically
(:mod:`ase_race._atomic`): a crash while saving leaves any earlier file intact.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# Re-exported for the modules that import the writers from here (new code: ase_race._atomic).
from ._atomic import atomic_torch_save, atomic_write_text  # noqa: F401
from .config import ModelConfig
from .errors import ConfigError, ModelFileError
from .posteriors import Posterior, posterior_class

FORMAT_NAME = "ase-race-model"
FORMAT_VERSION = 1
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
_ZIP_MAGIC = b"PK\x03\x04"

#: version N → function turning a version-N dict into a version-N+1 dict.
_UPGRADES: dict[int, Callable[[dict], dict]] = {}


@dataclass
class Calibration:
    """How reported variances are corrected (identity by default; ``ase-race calibrate`` sets it).

    ``*_var_scale`` multiply variances. ``energy_isotonic`` / ``forces_isotonic``, when set,
    are monotone maps (x, y) from a predicted variance to a calibrated one, fitted by isotonic
    regression of squared errors on predicted variances; they are applied after the scale, by
    linear interpolation between the points and proportionally beyond them (so a variance 10×
    larger than any seen in calibration stays 10× larger). Energies map the total energy
    variance; forces map each atom's mean diagonal variance trace(Σ_i)/3. The resulting factor
    multiplies both the aleatoric and the epistemic part.
    """

    energy_var_scale: float = 1.0
    forces_var_scale: float = 1.0
    stress_var_scale: float = 1.0
    energy_isotonic: tuple | None = None
    forces_isotonic: tuple | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "energy_var_scale": self.energy_var_scale,
            "forces_var_scale": self.forces_var_scale,
            "stress_var_scale": self.stress_var_scale,
        }
        for key in ("energy_isotonic", "forces_isotonic"):
            value = getattr(self, key)
            if value is not None:  # omitted when unset: files without it stay as they were
                out[key] = [list(map(float, value[0])), list(map(float, value[1]))]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown calibration keys {unknown}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key.endswith("_isotonic"):
                if value is None:
                    continue
                x, y = (tuple(float(v) for v in part) for part in value)
                if len(x) != len(y) or not x or any(b < a for a, b in zip(x, x[1:])) or min(x + y) <= 0:
                    raise ConfigError(f"calibration {key} must be two equal-length positive lists, x increasing")
                values[key] = (x, y)
            else:
                values[key] = float(value)
                if not values[key] > 0:
                    raise ConfigError(f"calibration factor {key} must be positive, got {value}")
        return cls(**values)

    @staticmethod
    def _map(table, variance):
        """Calibrated/raw factor for each variance under an isotonic table (1 where none)."""
        variance = np.asarray(variance, dtype=np.float64)
        if table is None:
            return np.ones_like(variance)
        x, y = np.asarray(table[0]), np.asarray(table[1])
        mapped = np.interp(variance, x, y)
        mapped = np.where(variance < x[0], variance * y[0] / x[0], mapped)
        mapped = np.where(variance > x[-1], variance * y[-1] / x[-1], mapped)
        return np.where(variance > 0, mapped / np.where(variance > 0, variance, 1.0), 1.0)

    def energy_factor(self, total_var):
        """Factor (same shape) multiplying both parts of energy variances ``total_var`` (eV²)."""
        scaled = self.energy_var_scale * np.asarray(total_var, dtype=np.float64)
        return self.energy_var_scale * self._map(self.energy_isotonic, scaled)

    def forces_factor(self, cov):
        """Per-atom factor (n,) multiplying both parts of the (n, 3, 3) total force covariance."""
        mean_var = self.forces_var_scale * np.trace(np.asarray(cov, dtype=np.float64), axis1=-2, axis2=-1) / 3
        return self.forces_var_scale * self._map(self.forces_isotonic, mean_var)


@dataclass
class ModelBundle:
    """What a model file holds, rebuilt: the posterior plus calibration and metadata."""

    posterior: Posterior
    calibration: Calibration = field(default_factory=Calibration)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.posterior.config


def library_versions() -> dict[str, str]:
    import ase
    import e3nn

    from . import __version__

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {"ase_race": __version__, "torch": str(torch.__version__), "e3nn": str(e3nn.__version__), "ase": str(ase.__version__)}


def save_model(
    path: str | os.PathLike,
    posterior: Posterior,
    calibration: Calibration | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a model file atomically (temporary file in the same folder, then rename).

    A reader never sees a half-written file, and a crash leaves any earlier file intact.
    """
    path = Path(path)
    cfg = posterior.config
    meta = {"versions": library_versions(), **(metadata or {})}
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "species": list(cfg.species),
        "e0s": list(cfg.e0s),
        "cutoff": cfg.r_max,
        "dtype": cfg.dtype,
        "posterior": {"kind": posterior.kind, "version": posterior.state_version, "state": _to_cpu(posterior.state_dict())},
        "calibration": (calibration or Calibration()).to_dict(),
        "metadata": meta,
    }
    atomic_torch_save(payload, path)
    return path


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A path as given, or the name of a shipped model in ``models/`` (with or without ``.pt``)."""
    path = Path(model)
    if path.exists():
        return path
    for candidate in (SHIPPED_MODELS_DIR / str(model), SHIPPED_MODELS_DIR / f"{model}.pt"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in SHIPPED_MODELS_DIR.glob("*.pt")) if SHIPPED_MODELS_DIR.is_dir() else []
    raise ModelFileError(f"{model}: no such model file, and not a shipped model (shipped: {shipped})")


def read_model_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check the raw dict of a model file, upgraded to the current version."""
    path = resolve_model_path(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != _ZIP_MAGIC:
        raise ModelFileError(f"{path}: not an ase-race model file (not a torch zip archive)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = [line.strip() for line in str(err).splitlines() if "Unsupported" in line]
        raise ModelFileError(
            f"{path}: refused to load: the file contains pickled Python objects, which ase-race "
            f"never executes ({detail[0] if detail else str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelFileError(f"{path}: truncated or corrupt file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(f"{path}: not an ase-race model file (format {found!r}, expected {FORMAT_NAME!r})")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: written by a newer ase-race (file format version {version}, this ase-race "
            f"reads up to {FORMAT_VERSION}); upgrade ase-race to load it"
        )
    while version < FORMAT_VERSION:
        data = _UPGRADES[version](data)
        version = data["version"]
    missing = [k for k in ("config", "posterior", "calibration", "metadata") if k not in data]
    if missing:
        raise ModelFileError(f"{path}: model file lacks the entries {missing}")
    return data


def load_model(
    model: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ModelBundle:
    """Load a model file (or shipped model name) into a :class:`ModelBundle`.

    Args:
        model: path, or the name of a model in ``models/``.
        device: where to put the weights (default CPU).
        dtype: cast the weights (default: the dtype the model was saved in).
    """
    data = read_model_dict(model)
    path = resolve_model_path(model)
    try:
        config = ModelConfig.from_dict(data["config"])
        for key, expected in (("species", list(config.species)), ("cutoff", config.r_max), ("dtype", config.dtype)):
            if key in data and data[key] != expected:
                raise ModelFileError(f"{path}: {key}={data[key]!r} disagrees with its config ({expected!r})")
        cls = posterior_class(data["posterior"]["kind"])
        # files written before posterior states were versioned hold layout 1
        posterior = cls.load_state(config, data["posterior"]["state"], int(data["posterior"].get("version", 1)))
        calibration = Calibration.from_dict(data["calibration"])
    except (ConfigError, KeyError, TypeError) as err:
        raise ModelFileError(f"{path}: malformed model file: {err}") from None
    except RuntimeError as err:  # load_state_dict: missing/unexpected/mis-shaped tensors
        raise ModelFileError(f"{path}: weights do not match the stored config: {err}") from None
    posterior.to(device=device, dtype=dtype)
    return ModelBundle(posterior, calibration, dict(data["metadata"]))
