"""``ase-race ship RUN (--calibrate-on VALID | --config RECIPE.yaml) [--test TEST] [-o OUT]``:
calibrate a trained model on held-out data, score it on a test set, and write the file to
ship (a thin shell over :func:`ase_race.training.ship.ship`; docs/evaluation.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("ship", help="calibrate a trained model on validation data, test it, write the file to ship")
    p.add_argument("model", metavar="RUN", help="the trained model file (or a shipped model name)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config, as given to ase-race train")
    p.add_argument("--calibrate-on", metavar="VALID", help="labelled validation structures to fit the calibration on")
    p.add_argument("--config", metavar="RECIPE", help="the run's training config: calibrate on its validation set "
                   "(unless --calibrate-on), test on its test_file (unless --test), read labels under its keys")
    p.add_argument("--test", help="labelled test structures, scored before and after calibration")
    p.add_argument("-o", "--output", help="where to write the model (default: models/RUN's file name)")
    p.add_argument("--aleatoric", action=argparse.BooleanOptionalAction, default=None,
                   help="ensembles: keep the members' own variances (--aleatoric) or their spread alone "
                        "(--no-aleatoric); default: as trained")
    p.add_argument("--isotonic", action="store_true", help="also fit isotonic maps on top of the variance scales")
    p.add_argument("--uncalibrated", action="store_true", help="keep the model's calibration as it is (no fit)")
    p.add_argument("--energy-key", help="label key of the energies (default: the config's, else REF_energy)")
    p.add_argument("--forces-key", help="label key of the forces (default: the config's, else REF_forces)")
    p.set_defaults(run=run)


def run(args) -> int:
    import dataclasses

    from ..data import KeyMap
    from ..errors import ConfigError
    from ..training import TrainConfig
    from ..training.api import label_keys
    from ..modelfile import read_model_dict
    from ..training.ship import format_shipping, ship

    if args.overrides and not args.config:
        raise ConfigError(f"key=value overrides {args.overrides} need --config")
    config = TrainConfig.from_yaml(args.config, args.overrides) if args.config else None
    if args.uncalibrated and args.calibrate_on:
        raise ConfigError("--uncalibrated and --calibrate-on contradict each other; give one")
    if not args.uncalibrated and not (args.calibrate_on or config):
        raise ConfigError("say where to calibrate: --calibrate-on VALID or --config RECIPE.yaml (or --uncalibrated)")
    keys = label_keys(config) if config else KeyMap()
    changes = {"energy": args.energy_key, "forces": args.forces_key}
    keys = dataclasses.replace(keys, **{k: v for k, v in changes.items() if v})
    calibrate_on = None if args.uncalibrated else (args.calibrate_on or config)
    test = args.test or (config.test_file if config is not None and config.test_file else None)
    out = Path(args.output) if args.output else Path("models") / Path(args.model).with_suffix(".pt").name
    path = ship(args.model, calibrate_on, out, test=test, aleatoric=args.aleatoric, isotonic=args.isotonic, keys=keys)
    print(format_shipping(read_model_dict(path)["metadata"]["shipping"]))
    print(f"wrote {path}")
    return 0
