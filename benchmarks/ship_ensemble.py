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
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shipping import calibrate, print_shipping  # noqa: E402

from ase_race import load_model, save_model  # noqa: E402
from ase_race.training import TrainConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/ethanol_ensemble/ethanol-ensemble.pt")
    p.add_argument("--config", default=str(HERE.parent / "recipes" / "rmd17_ethanol_ensemble.yaml"))
    p.add_argument("--aleatoric", action="store_true")
    p.add_argument("--out", default=str(HERE.parent / "models" / "ethanol-ensemble.pt"))
    args = p.parse_args()

    bundle = load_model(args.run)
    bundle.posterior.aleatoric = args.aleatoric
    shipping = calibrate(bundle, TrainConfig.from_yaml(args.config))
    print_shipping(shipping)
    metadata = {**bundle.metadata, "shipping": {"aleatoric": args.aleatoric, **shipping}}
    path = save_model(args.out, bundle.posterior, calibration=bundle.calibration, metadata=metadata)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
