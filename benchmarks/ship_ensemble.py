"""Turn the trained rMD17 ethanol ensemble into the shipped model file.

    python benchmarks/train_rmd17.py --config recipes/rmd17_ethanol_ensemble.yaml   # trains it
    python benchmarks/ship_ensemble.py [--aleatoric] [--out models/ethanol-ensemble.pt]

The same as ``ase-race ship runs/ethanol_ensemble/ethanol-ensemble.pt --config
recipes/rmd17_ethanol_ensemble.yaml --no-aleatoric -o models/ethanol-ensemble.pt``: keeps the
members' spread as the variance (``--aleatoric`` keeps the heads' variances too), fits the
NLL-optimal energy and force variance scales on the 50 validation structures of the recipe's
split, evaluates on the 1000 test structures, prints both, and writes the model file with the
test metrics before and after calibration in its metadata.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ase_race import load_model
from ase_race.training import TrainConfig
from ase_race.training.ship import format_shipping, ship

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/ethanol_ensemble/ethanol-ensemble.pt")
    p.add_argument("--config", default=str(ROOT / "recipes" / "rmd17_ethanol_ensemble.yaml"))
    p.add_argument("--aleatoric", action="store_true")
    p.add_argument("--out", default=str(ROOT / "models" / "ethanol-ensemble.pt"))
    args = p.parse_args()

    path = ship(args.run, TrainConfig.from_yaml(args.config), args.out, aleatoric=args.aleatoric)
    print(format_shipping(load_model(path).metadata["shipping"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
