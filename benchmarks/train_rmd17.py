"""Train and evaluate the rMD17 ethanol model; prints the table recorded in its model card.

    python benchmarks/train_rmd17.py [--data ../shared/data] [--config recipes/rmd17_ethanol.yaml] [--ship] [key=value ...]

Converts the rMD17 npz files to extxyz (data/rmd17_ethanol/, by ase_race.data.rmd17.convert),
trains with the recipe (resuming if its checkpoint exists), then prints validation and test
energy and force MAE/RMSE, NLLs, training wall time and throughput. Runs on a CPU; uses a GPU
when one is present.

``--ship`` then ships it into models/ as ``ase-race ship RUN --config RECIPE`` does
(ase_race.training.ship): variance calibration fitted on the recipe's validation split, test
NLL and miscalibration printed and recorded before and after (``--uncalibrated``: as trained).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ase_race import load_model
from ase_race.data.rmd17 import convert
from ase_race.training import TrainConfig, train
from ase_race.training.ship import format_shipping, ship

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--config", default=str(ROOT / "recipes" / "rmd17_ethanol.yaml"))
    parser.add_argument("--ship", action="store_true", help="calibrate the trained model and write it into models/")
    parser.add_argument("--uncalibrated", action="store_true", help="with --ship: keep the file's variances as trained")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.uncalibrated and not args.ship:
        parser.error("--uncalibrated only applies with --ship")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    paths = convert(args.data / "rmd17_ethanol", Path("data/rmd17_ethanol"))
    config = TrainConfig.from_yaml(args.config, [f"e0s_file={paths['e0s']}", *args.overrides])
    if args.ship and config.method == "ensemble":
        # The shipped ensemble's predictive is the members' spread alone (aleatoric off).
        parser.error("ship an ensemble with benchmarks/ship_ensemble.py, which sets its predictive before calibrating")
    model_path = train(config)
    bundle = load_model(model_path)
    t, m = bundle.metadata["training"], bundle.metadata["metrics"]
    print(f"\nmodel: {model_path}")
    print(f"{'set':>6} {'E MAE meV':>10} {'E RMSE meV':>11} {'E RMS σ':>8} {'F MAE meV/Å':>12} "
          f"{'F RMSE meV/Å':>13} {'F RMS σ':>8} {'E NLL':>7} {'F NLL':>7}")
    for name, row in m.items():
        print(f"{name:>6} {row['energy_mae_meV']:10.2f} {row['energy_rmse_meV']:11.2f} {row.get('energy_rms_std_meV', float('nan')):8.2f} "
              f"{row['forces_mae_meV_A']:12.2f} {row['forces_rmse_meV_A']:13.2f} {row.get('forces_rms_std_meV_A', float('nan')):8.2f} "
              f"{row['energy_nll']:7.3f} {row['forces_nll']:7.3f}")
    if "epochs" in t:  # a posterior fitted around a given base_model has no training of its own
        print(f"training: {t['epochs']} epochs (best {t['best_epoch']}), {t['wall_time_s'] / 60:.1f} min, "
              f"{t['structures_per_s']:.0f} structures/s")
    if args.ship:
        target = ship(bundle, None if args.uncalibrated else config, ROOT / "models" / Path(model_path).name,
                      test=config.test_file or None)
        print(format_shipping(load_model(target).metadata["shipping"]))
        print(f"shipped as {target}")


if __name__ == "__main__":
    main()
