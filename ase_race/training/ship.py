"""Ship a trained model: calibrate it on held-out data, score it on a test set, write the file.

:func:`shipping_bundle` returns the model as it will be shipped; :func:`ship` writes it
(``ase-race ship`` runs it). The calibration is fitted on validation structures (a recipe's
seeded split, or any labelled set), never on the test set, and the test metrics before and
after calibration go into the file's metadata under ``shipping``, so a model card can quote
both from the file itself. docs/evaluation.md describes the command.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..data import Frame, KeyMap, read_frames
from ..errors import ConfigError
from ..evaluation import Calibration
from ..modelfile import ModelBundle, load_model, save_model
from ..posteriors import EnsemblePosterior, Posterior
from .api import Structures, as_frames, label_keys, prepare
from .assess import assess, calibrate, gather
from .config import TrainConfig

#: labelled structures given in memory or as a file any reader of :func:`~ase_race.data.read_frames` takes
Labelled = Structures | str | os.PathLike


def metrics_summary(metrics: dict) -> dict[str, float]:
    """The headline numbers of :func:`~ase_race.training.assess.assess` (total variance), in
    meV and meV/Å; NLLs in nats per structure (energy) and per force component."""
    e, f = metrics["energy"]["total"], metrics["forces"]["total"]
    return {
        "energy_mae_meV": 1000 * e["mae"], "energy_rmse_meV": 1000 * e["rmse"], "energy_nll": e["nll"],
        "energy_rms_std_meV": 1000 * e["rms_std"], "energy_miscalibration_area": e["miscalibration_area"],
        "forces_mae_meV_A": 1000 * f["mae"], "forces_rmse_meV_A": 1000 * f["rmse"], "forces_nll_per_component": f["nll"],
        "forces_rms_std_meV_A": 1000 * f["rms_std"], "forces_miscalibration_area": f["miscalibration_area"],
        "forces_spearman": f["spearman"],
    }


def shipping_bundle(
    model: str | os.PathLike | ModelBundle | Posterior,
    calibrate_on: TrainConfig | Labelled | None,
    *,
    test: Labelled | None = None,
    aleatoric: bool | None = None,
    isotonic: bool = False,
    keys: KeyMap | None = None,
) -> ModelBundle:
    """The model as it is shipped: predictive set, calibration fitted, metrics in its metadata.

    Args:
        model: a model file (or shipped model name), a loaded bundle or a posterior; the object
            passed in is left as it was.
        calibrate_on: where the calibration is fitted (:func:`~ase_race.training.assess.calibrate`):
            a :class:`TrainConfig` (the validation set of its run: ``valid_file``, or the seeded
            split of ``train_file`` that training held out), labelled structures in memory, or
            a file of them. ``None`` keeps the model's calibration as it is.
        test: labelled structures (or a file) to score before and after calibration; default:
            the config's ``test_file`` when ``calibrate_on`` is a config, else none.
        aleatoric: ensembles only: keep the members' own variances in the predictive (True) or
            use their spread alone (False); None keeps the model's setting. Set before
            calibrating, since the calibration fits the predictive it will scale.
        isotonic: also fit isotonic maps on top of the scales.
        keys: where labels are stored in files and ``ase.Atoms`` (default: the config's keys,
            else ``REF_energy`` / ``REF_forces``).
    Returns:
        the bundle, with ``metadata["shipping"]``: ``calibrated_on`` (a description, or None),
        ``calibration`` (its dict), ``aleatoric`` (ensembles), and with a test set
        ``tested_on``, ``test_raw`` (identity calibration) and ``test_calibrated`` (the shipped
        one) as :func:`metrics_summary` dicts.
    """
    bundle = _as_bundle(model)
    config = calibrate_on if isinstance(calibrate_on, TrainConfig) else None
    keys = keys or (label_keys(config) if config is not None else KeyMap())
    posterior = _with_aleatoric(bundle.posterior, aleatoric)
    bundle = ModelBundle(posterior, bundle.calibration, dict(bundle.metadata))
    shipping: dict[str, Any] = {"calibrated_on": None}
    if calibrate_on is not None:
        if config is not None:
            _, _, valid = prepare(config)
            where = config.valid_file or "the recipe's split"
            shipping["calibrated_on"] = f"the {len(valid)} validation structures of {where}"
        else:
            valid, source = _labelled(calibrate_on, keys, "calibration structure")
            shipping["calibrated_on"] = f"{len(valid)} structures of {source}"
        bundle = dataclasses.replace(bundle, calibration=calibrate(bundle, valid, isotonic=isotonic))
    shipping["calibration"] = bundle.calibration.to_dict()
    if isinstance(posterior, EnsemblePosterior):
        shipping["aleatoric"] = posterior.aleatoric
    if test is None and config is not None and config.test_file:
        test = config.test_file
    if test is not None:
        frames, source = _labelled(test, keys, "test structure")
        shipping["tested_on"] = f"{len(frames)} structures of {source}"
        raw = dataclasses.replace(bundle, calibration=Calibration())
        shipping["test_raw"] = metrics_summary(assess(gather(raw, frames)))
        shipping["test_calibrated"] = metrics_summary(assess(gather(bundle, frames)))
    bundle.metadata["shipping"] = shipping
    return bundle


def ship(
    model: str | os.PathLike | ModelBundle | Posterior,
    calibrate_on: TrainConfig | Labelled | None,
    out: str | os.PathLike,
    *,
    test: Labelled | None = None,
    aleatoric: bool | None = None,
    isotonic: bool = False,
    keys: KeyMap | None = None,
) -> Path:
    """:func:`shipping_bundle`, written to ``out`` (atomically); returns the path."""
    bundle = shipping_bundle(model, calibrate_on, test=test, aleatoric=aleatoric, isotonic=isotonic, keys=keys)
    return save_model(out, bundle.posterior, calibration=bundle.calibration, metadata=bundle.metadata)


def format_shipping(shipping: dict) -> str:
    """The calibration and the test metrics before and after, as a small table."""
    cal = shipping["calibration"]
    where = f"calibrated on {shipping['calibrated_on']}" if shipping["calibrated_on"] else "calibration kept as it was"
    spread = "" if "aleatoric" not in shipping else f" (ensemble, aleatoric {'on' if shipping['aleatoric'] else 'off'})"
    isotonic = ", isotonic maps" if "energy_isotonic" in cal else ""
    lines = [f"{where}{spread}: energy variance ×{cal['energy_var_scale']:.4g}, "
             f"force variance ×{cal['forces_var_scale']:.4g}{isotonic}"]
    if "test_raw" in shipping:
        lines.append(f"test on {shipping['tested_on']}:")
        lines.append(f"{'':>11} {'E MAE meV':>10} {'E RMS σ meV':>12} {'E NLL':>7} {'E miscal':>9} {'F MAE meV/Å':>12} "
                     f"{'F RMS σ meV/Å':>14} {'F NLL/comp':>11} {'F miscal':>9}")
        for name in ("test_raw", "test_calibrated"):
            row = shipping[name]
            lines.append(f"{name[5:]:>11} {row['energy_mae_meV']:10.2f} {row['energy_rms_std_meV']:12.2f} "
                         f"{row['energy_nll']:7.3f} {row['energy_miscalibration_area']:9.3f} {row['forces_mae_meV_A']:12.2f} "
                         f"{row['forces_rms_std_meV_A']:14.2f} {row['forces_nll_per_component']:11.3f} "
                         f"{row['forces_miscalibration_area']:9.3f}")
    return "\n".join(lines)


def _as_bundle(model) -> ModelBundle:
    if isinstance(model, ModelBundle):
        return model
    if isinstance(model, Posterior):
        return ModelBundle(model)
    return load_model(model)


def _with_aleatoric(posterior: Posterior, aleatoric: bool | None) -> Posterior:
    """The posterior with the ensemble's ``aleatoric`` setting (a new object when it changes)."""
    if aleatoric is None:
        return posterior
    if not isinstance(posterior, EnsemblePosterior):
        raise ConfigError(f"aleatoric applies to ensembles only; this model is {posterior.kind!r} (leave it unset)")
    if posterior.aleatoric == aleatoric:
        return posterior
    return EnsemblePosterior(posterior.networks(), aleatoric=aleatoric)


def _labelled(data: Labelled, keys: KeyMap, what: str) -> tuple[list[Frame], str]:
    """Labelled frames (isolated atoms left out) and where they came from, for the metadata."""
    if isinstance(data, (str, os.PathLike)):
        frames, source = read_frames(data, keys=keys), str(data)
    else:
        frames, source = as_frames(list(data), keys, what), "the structures given"
    return [f for f in frames if not f.is_isolated_atom], source

