"""Calibrate a trained rMD17 model on its recipe's validation split before it is shipped.

Shared by ``train_rmd17.py --ship`` and ``ship_ensemble.py``: the NLL-optimal energy and force
variance scales are fitted on the validation structures of the recipe's seeded split (never
the test set), and the test metrics before and after go into the file's metadata, so that a
model card can quote both from the file itself.
"""

from __future__ import annotations

from ase_race.training import TrainConfig
from ase_race.data import read_frames
from ase_race.errors import ConfigError
from ase_race.modelfile import Calibration
from ase_race.training.api import label_keys, prepare
from ase_race.training.assess import assess, fit_calibration, gather


def summary(metrics: dict) -> dict:
    """The headline numbers of :func:`~ase_race.training.assess.assess`, in meV and meV/Å."""
    e, f = metrics["energy"]["total"], metrics["forces"]["total"]
    return {
        "energy_mae_meV": 1000 * e["mae"], "energy_rmse_meV": 1000 * e["rmse"], "energy_nll": e["nll"],
        "energy_rms_std_meV": 1000 * e["rms_std"], "energy_miscalibration_area": e["miscalibration_area"],
        "forces_mae_meV_A": 1000 * f["mae"], "forces_rmse_meV_A": 1000 * f["rmse"], "forces_nll_per_component": f["nll"],
        "forces_rms_std_meV_A": 1000 * f["rms_std"], "forces_miscalibration_area": f["miscalibration_area"],
        "forces_spearman": f["spearman"],
    }


def calibrate(bundle, config: TrainConfig) -> dict:
    """Replace ``bundle.calibration`` by scales fitted on the validation split of ``config``.

    Returns the ``shipping`` metadata: where the scales were fitted and the test metrics of
    the uncalibrated and calibrated predictive (``test_raw``, ``test_calibrated``).
    """
    if not config.test_file:
        raise ConfigError("test_file is not set: the calibrated model is scored on the recipe's test set")
    bundle.calibration = Calibration()
    _, _, valid = prepare(config)
    test = [f for f in read_frames(config.test_file, keys=label_keys(config)) if not f.is_isolated_atom]
    raw = summary(assess(gather(bundle, test)))
    bundle.calibration = fit_calibration(gather(bundle, valid))
    calibrated = summary(assess(gather(bundle, test)))
    return {
        "calibrated_on": f"the {len(valid)} validation structures of the recipe's split",
        "calibration": bundle.calibration.to_dict(),
        "test_raw": raw,
        "test_calibrated": calibrated,
    }


def print_shipping(shipping: dict) -> None:
    """The calibration scales and the test metrics before and after, as a small table."""
    scales = shipping["calibration"]
    print(f"calibrated on {shipping['calibrated_on']}: energy variance ×{scales['energy_var_scale']:.4g}, "
          f"force variance ×{scales['forces_var_scale']:.4g}")
    print(f"{'test':>11} {'E RMS σ meV':>12} {'E NLL':>7} {'E miscal':>9} {'F RMS σ meV/Å':>14} "
          f"{'F NLL/comp':>11} {'F miscal':>9}")
    for name in ("test_raw", "test_calibrated"):
        row = shipping[name]
        print(f"{name[5:]:>11} {row['energy_rms_std_meV']:12.2f} {row['energy_nll']:7.3f} "
              f"{row['energy_miscalibration_area']:9.3f} {row['forces_rms_std_meV_A']:14.2f} "
              f"{row['forces_nll_per_component']:11.3f} {row['forces_miscalibration_area']:9.3f}")
