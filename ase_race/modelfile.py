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

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# Re-exported for the modules that import the writers from here (new code: ase_race._atomic).
from ._atomic import atomic_torch_save, atomic_write_text  # noqa: F401
from .config import ModelConfig
from .errors import ConfigError, ModelFileError
from .evaluation.calibration import Calibration  # noqa: F401  (its home; re-exported here)
from .posteriors import Posterior, posterior_class

FORMAT_NAME = "ase-race-model"
FORMAT_VERSION = 1
#: where shipped models are looked up by name: inside the installed package (a wheel carries
#: them as ``ase_race/models``), else the source checkout's ``models/``
SHIPPED_MODELS_DIRS = (Path(__file__).resolve().parent / "models", Path(__file__).resolve().parent.parent / "models")
SHIPPED_MODELS_DIR = next((d for d in SHIPPED_MODELS_DIRS if any(d.glob("*.pt"))), SHIPPED_MODELS_DIRS[-1])
_ZIP_MAGIC = b"PK\x03\x04"

#: version N → function turning a version-N dict into a version-N+1 dict.
_UPGRADES: dict[int, Callable[[dict], dict]] = {}


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


#: dtypes no stored tensor has (weights are float32/float64, indices int64, masks bool)
_ODD_DTYPES = {torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16}


def _check_finite(obj: Any, where: str) -> None:
    """Raise :class:`ModelFileError` naming the first stored tensor or number that is NaN or
    infinite (a file with such weights would load and predict NaN)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_complex() or obj.dtype in _ODD_DTYPES:
            raise ModelFileError(f"{where} is stored as {obj.dtype}, which no ase-race tensor is")
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise ModelFileError(f"non-finite values (NaN or inf) in {where}")
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise ModelFileError(f"non-finite value {obj} in {where}")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_finite(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for k, value in enumerate(obj):
            _check_finite(value, f"{where}[{k}]")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A path as given, or the name of a shipped model in ``models/`` (with or without ``.pt``)."""
    path = Path(model)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, not a model file")
    if path.exists():
        return path
    for candidate in (SHIPPED_MODELS_DIR / str(model), SHIPPED_MODELS_DIR / f"{model}.pt"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in SHIPPED_MODELS_DIR.glob("*.pt")) if SHIPPED_MODELS_DIR.is_dir() else []
    raise ModelFileError(f"{model}: no such model file, and not a shipped model (shipped: {shipped}, "
                         f"looked for in {SHIPPED_MODELS_DIR})")


def read_torch_file(path: Path, what: str, error: type[Exception]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with every way it can fail (not a torch
    archive, pickled code, truncated) raised as ``error`` naming the file; ``what`` names the
    kind of file expected, for the message."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err})") from None
    if head != _ZIP_MAGIC:
        raise error(f"{path}: not {what} (not a torch zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = [line.strip() for line in str(err).splitlines() if "Unsupported" in line]
        raise error(
            f"{path}: refused to load: the file contains pickled Python objects, which ase-race "
            f"never executes ({detail[0] if detail else str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise error(f"{path}: truncated or corrupt file ({str(err).splitlines()[0]})") from None


def read_model_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check the raw dict of a model file, upgraded to the current version."""
    path = resolve_model_path(path)
    data = read_torch_file(path, "an ase-race model file", ModelFileError)
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
        _check_finite(data["config"], "config")
        _check_finite(data["posterior"]["state"], "posterior state")
        cls = posterior_class(data["posterior"]["kind"])
        # files written before posterior states were versioned hold layout 1
        posterior = cls.load_state(config, data["posterior"]["state"], int(data["posterior"].get("version", 1)))
        calibration = Calibration.from_dict(data["calibration"])
    except ModelFileError as err:
        raise ModelFileError(f"{path}: {err}") from None
    except (ConfigError, KeyError, TypeError, ValueError) as err:  # ValueError: e.g. a mis-shaped covariance
        raise ModelFileError(f"{path}: malformed model file: {err}") from None
    except RuntimeError as err:  # load_state_dict: missing/unexpected/mis-shaped tensors
        raise ModelFileError(f"{path}: weights do not match the stored config: {err}") from None
    posterior.to(device=device, dtype=dtype)
    return ModelBundle(posterior, calibration, dict(data["metadata"]))
