"""``ase-race active-learn POOL CONFIG.yaml --sizes 10,20,50 --strategy bald-f``: the active-learning
loop (a thin shell over :func:`ase_race.active.loop.active_learn`).

Retrospective (the pool carries labels under the config's ``energy_key`` / ``forces_key``) or
prospective (``--reference pyscf|emt|tblite``: each chosen structure is labelled then).
Rerun the same command to resume.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def add_parser(sub) -> None:
    from ..active import STRATEGIES
    from .md import REFERENCES
    from .predict import add_device_options

    p = sub.add_parser("active-learn", help="grow a training set by acquisition (random, energy-std, BALD), "
                                            "with learning curves")
    p.add_argument("pool", help="candidate structures (any file ase.io reads)")
    p.add_argument("config", nargs="?", help="YAML training config for every round (default: a 4-member ensemble)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    p.add_argument("--sizes", default="10,20,50,100", help="labelled-set size per round, comma-separated")
    p.add_argument("--strategy", choices=STRATEGIES, default="bald-f", help="acquisition function")
    p.add_argument("--diversity", type=float, default=0.0, help="> 0: penalise near-duplicates in a batch")
    p.add_argument("--seed", type=int, default=0, help="draws the initial set")
    p.add_argument("--test", help="labelled test structures for the learning curve")
    p.add_argument("--reference", choices=sorted(REFERENCES),
                   help="prospective: label chosen structures with this calculator instead of the pool's labels")
    p.add_argument("--structures-per-round", type=int, default=0,
                   help="> 0: epochs per round = this / labelled size (at least --min-epochs)")
    p.add_argument("--min-epochs", type=int, default=10, help="fewest training epochs of a round")
    p.add_argument("--warm-start", action="store_true",
                   help="fine-tune the previous round's model instead of training each round from scratch")
    p.add_argument("--warm-start-lr", type=float, default=5e-3, help="learning rate of the --warm-start fine-tunes")
    p.add_argument("-o", "--output", default="race_active", help="output folder (rounds, state, curve)")
    add_device_options(p, dtype=False)
    p.set_defaults(run=run)


def run(args) -> int:
    from ase.io import read

    from ..active.loop import active_learn, label_from_pool, label_with, plot_curves
    from ..training import TrainConfig
    from ..data import KeyMap, read_frames
    from .md import REFERENCES
    from .train import config_and_overrides

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("ase_race.active").setLevel(logging.INFO)
    path, overrides = config_and_overrides(args.config, args.overrides)
    defaults = ["method=ensemble", "ensemble.members=4"] if path is None else []
    device = [f"device={args.device}"] if args.device else []  # training and scoring in one place
    config = TrainConfig.from_yaml(path, defaults + overrides + device)
    keys = KeyMap(energy=config.energy_key, forces=config.forces_key)
    if args.reference:
        pool = read(args.pool, ":")
        labeller = label_with(REFERENCES[args.reference]())
        label = lambda i: labeller(pool[i])  # noqa: E731
    else:
        frames = read_frames(args.pool, keys=keys)
        pool = [f.atoms for f in frames]
        label = label_from_pool(frames)
    test = read_frames(args.test, keys=keys) if args.test else None
    sizes = [int(s) for s in args.sizes.split(",")]
    curve = active_learn(pool, label, config, sizes, args.strategy, args.output, test=test, seed=args.seed,
                         diversity=args.diversity, structures_per_round=args.structures_per_round,
                         min_epochs=args.min_epochs, warm_start=args.warm_start, warm_start_lr=args.warm_start_lr,
                         device=args.device)
    print(f"{'round':>5} {'labelled':>8} {'E MAE (meV)':>12} {'F MAE (meV/Å)':>14} {'wall (s)':>9}")
    for r in curve:
        print(f"{r.round:5d} {r.n_train:8d} {1e3 * r.energy_mae:12.2f} {1e3 * r.forces_mae:14.2f} {r.wall_s:9.1f}")
    out = Path(args.output)
    if test is not None:
        plot_curves({args.strategy: curve}, out / "learning_curve.png", title=f"{Path(args.pool).name}, {args.strategy}")
    print(f"wrote {out / 'learning_curve.csv'}" + (f" and {out / 'learning_curve.png'}" if test is not None else ""))
    return 0
