"""Turn the trained rMD17 ethanol ensemble into the shipped model file.

    python benchmarks/train_rmd17.py --config recipes/rmd17_ethanol_ensemble.yaml   # trains it
    python benchmarks/ship_ensemble.py [--aleatoric] [--out models/ethanol-ensemble.pt]

Reads runs/ethanol_ensemble/ethanol-ensemble.pt, keeps the members' spread as the variance
(``aleatoric: false``; ``--aleatoric`` keeps the heads' variances too), fits NLL-optimal
energy and force variance scales on the 50 validation structures of the recipe's split,
evaluates on the 1000 test structures, prints both, and writes the model file with the test
metrics of the calibrated predictive in its metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ase_race import load_model, save_model
from ase_race.config import TrainConfig
from ase_race.data import read_frames
from ase_race.modelfile import Calibration
from ase_race.training.api import prepare
from ase_race.training.assess import assess, fit_calibration, gather

HERE = Path(__file__).resolve().parent


def summary(metrics: dict) -> dict:
    e, f = metrics["energy"]["total"], metrics["forces"]["total"]
    return {
        "energy_mae_meV": 1000 * e["mae"], "energy_rmse_meV": 1000 * e["rmse"], "energy_nll": e["nll"],
        "energy_rms_std_meV": 1000 * e["rms_std"], "energy_miscalibration_area": e["miscalibration_area"],
        "forces_mae_meV_A": 1000 * f["mae"], "forces_rmse_meV_A": 1000 * f["rmse"], "forces_nll_per_component": f["nll"],
        "forces_rms_std_meV_A": 1000 * f["rms_std"], "forces_miscalibration_area": f["miscalibration_area"],
        "forces_spearman": f["spearman"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/ethanol_ensemble/ethanol-ensemble.pt")
    p.add_argument("--config", default=str(HERE.parent / "recipes" / "rmd17_ethanol_ensemble.yaml"))
    p.add_argument("--aleatoric", action="store_true")
    p.add_argument("--out", default=str(HERE.parent / "models" / "ethanol-ensemble.pt"))
    args = p.parse_args()

    bundle = load_model(args.run)
    bundle.posterior.aleatoric = args.aleatoric
    bundle.calibration = Calibration()
    config = TrainConfig.from_yaml(args.config)
    _, _, valid = prepare(config)
    test = read_frames(config.test_file)
    raw = summary(assess(gather(bundle, test)))
    bundle.calibration = fit_calibration(gather(bundle, valid))
    calibrated = summary(assess(gather(bundle, test)))
    print(json.dumps({"test_raw": raw, "calibration": bundle.calibration.to_dict(), "test_calibrated": calibrated}, indent=1))
    metadata = {
        **bundle.metadata,
        "shipping": {
            "aleatoric": args.aleatoric,
            "calibrated_on": f"the {len(valid)} validation structures of the recipe's split",
            "test_raw": raw,
            "test_calibrated": calibrated,
        },
    }
    path = save_model(args.out, bundle.posterior, calibration=bundle.calibration, metadata=metadata)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
