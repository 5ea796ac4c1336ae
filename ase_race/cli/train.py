"""``ase-race train CONFIG.yaml [key=value ...]``: train a model (a thin shell over
:func:`ase_race.training.train`).

Run it under ``torchrun --nproc_per_node=N`` for data-parallel training; rerun the same command
to resume a killed run from its last checkpoint.
"""

from __future__ import annotations

import logging
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (see docs/training.md)")
    p.add_argument("config", nargs="?", help="YAML training config (optional if overrides give train_file)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_epochs=50 model.num_layers=3")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..config import TrainConfig
    from ..training import train

    # Allow "ase-race train key=value ..." without a config file.
    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path:
        overrides.insert(0, path)
        path = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    config = TrainConfig.from_yaml(path, overrides)
    out = train(config)
    print(f"model written to {out}")
    return 0
