"""``ase-race train CONFIG.yaml [key=value ...]``: train a model (a thin shell over
:func:`ase_race.training.train`).

Run it under ``torchrun --nproc_per_node=N`` for data-parallel training; rerun the same command
to resume a killed run from its last checkpoint.
"""

from __future__ import annotations

import logging
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model from a YAML config and key=value overrides",
        description="Train a RACE model. The YAML config and key=value overrides (any TrainConfig key, dotted for "
                    "sections: max_epochs=50 model.num_layers=3 ensemble.members=5) may come in any order, "
                    "between the flags too; a killed run resumes from its checkpoint when rerun.")
    p.add_argument("config", nargs="?", help="YAML training config (optional if overrides give train_file)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_epochs=50 model.num_layers=3")
    # No argparse choices: the training config checks the name against the registered methods.
    p.add_argument("--method", help="posterior: mve (default; one network with a variance head), ensemble "
                                    "(M independent networks), swag (Gaussian over SGD iterates), ivon (variational "
                                    "online Newton), laplace (Gaussian at the trained weights), novelty (a single "
                                    "network plus a distance-to-training-data term)")
    p.add_argument("--members", type=int, help="deep-ensemble size M (default 10)")
    p.add_argument("--test-samples", type=int, help="weight samples at prediction time (SWAG 30, IVON/Laplace 16)")
    p.add_argument("--laplace-subset", help="Laplace over all weights (all) or the last layer (last_layer)")
    p.add_argument("--base-model", help="model file to fit a Laplace or novelty posterior around (skips training)")
    p.set_defaults(run=run)


#: flag → TrainConfig key; every method option is also a key=value override (docs/training.md).
#: ``{method}`` is the method the config runs (the samples are that method's option).
FLAGS = {"method": "method", "members": "ensemble.members", "test_samples": "{method}.test_samples",
         "laplace_subset": "laplace.subset", "base_model": "{method}.base_model"}


def config_and_overrides(config: str | None, overrides) -> tuple[str | None, list[str]]:
    """The config file (the one word without "=", wherever it stands) and the key=value overrides."""
    from ..errors import ConfigError

    words = ([config] if config else []) + list(overrides)
    paths = [w for w in words if "=" not in w]
    if len(paths) > 1:
        raise ConfigError(f"one config file at most, got {paths}; overrides are written key=value")
    return (paths[0] if paths else None), [w for w in words if "=" in w]


def run(args) -> int:
    from ..errors import ConfigError
    from ..training import TrainConfig, train

    path, overrides = config_and_overrides(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    method = [f"method={args.method}"] if args.method else []
    config = TrainConfig.from_yaml(path, overrides + method)
    sections: dict = {}
    for name, key in FLAGS.items():
        value = getattr(args, name)
        if name == "method" or value is None:
            continue
        section, _, option = key.format(method=config.method).partition(".")
        if config.options.get(section) is None or not hasattr(config.options[section], option):
            raise ConfigError(f"--{name.replace('_', '-')}: method {config.method!r} has no option {option!r}")
        sections.setdefault(section, {})[option] = value
    if sections:
        config = config.replace(**sections)
    out = train(config)
    print(f"model written to {out}")
    return 0
