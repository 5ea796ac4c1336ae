"""Train and evaluate the rMD17 ethanol model; prints the table recorded in its model card.

    python benchmarks/train_rmd17.py [--data ../shared/data] [--config recipes/rmd17_ethanol.yaml] [--ship] [key=value ...]

Converts the rMD17 npz files to extxyz (data/rmd17_ethanol/), trains with the recipe (resuming
if its checkpoint exists), then prints test-set energy and force MAE/RMSE, NLLs, training wall
time and throughput. Runs on a CPU; uses a GPU when one is present.

``--ship`` writes the model into models/ with variance scales fitted on the recipe's validation
split (see shipping.py; ``--uncalibrated`` copies it as trained) and prints the test NLL and
miscalibration before and after.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rmd17  # noqa: E402
from shipping import calibrate, print_shipping  # noqa: E402

from ase_race import load_model, save_model  # noqa: E402
from ase_race.training import TrainConfig  # noqa: E402
from ase_race.training import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--config", default=str(HERE.parent / "recipes" / "rmd17_ethanol.yaml"))
    parser.add_argument("--ship", action="store_true", help="calibrate the trained model and write it into models/")
    parser.add_argument("--uncalibrated", action="store_true", help="with --ship: keep the file's variances as trained")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.uncalibrated and not args.ship:
        parser.error("--uncalibrated only applies with --ship")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    paths = rmd17.convert(args.data / "rmd17_ethanol", Path("data/rmd17_ethanol"))
    config = TrainConfig.from_yaml(args.config, [f"e0s_file={paths['e0s']}", *args.overrides])
    if args.ship and config.method == "ensemble":
        # The shipped ensemble's predictive is the members' spread alone (aleatoric off).
        parser.error("ship an ensemble with benchmarks/ship_ensemble.py, which sets its predictive before calibrating")
    model_path = train(config)
    bundle = load_model(model_path)
    meta = bundle.metadata
    t, m = meta["training"], meta["metrics"]
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
        target = HERE.parent / "models" / Path(model_path).name
        if not args.uncalibrated:
            shipping = calibrate(bundle, config)
            print_shipping(shipping)
            meta = {**meta, "shipping": shipping}
        save_model(target, bundle.posterior, calibration=bundle.calibration, metadata=meta)
        print(f"shipped as {target}")


if __name__ == "__main__":
    main()
