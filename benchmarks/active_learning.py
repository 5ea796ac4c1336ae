"""Active learning on 3BPA: does BALD reach random sampling's accuracy with half the data?

    OMP_NUM_THREADS=1 python benchmarks/active_learning.py [--sizes 10,20,50,100,200] [--seeds 0] [--report]
        [--strategies random,energy-std,bald-e,bald-f,bald-ef] [--members 2] [--preset tiny]
        [--layers L] [--out runs/active_learning]

Pool: ``train_300K.xyz`` less a fixed, seeded set of validation frames (every round selects
its best epoch on them). Test: the mixed-temperature file less the 31 frames it shares with
the pool. Each strategy grows the labelled set through ``--sizes`` with
:func:`ase_race.active.loop.active_learn` (retrospective: the pool's labels); all
strategies of a seed start from the same random initial set and the same round-0 models. Round 0 trains the ensemble from scratch; later
rounds fine-tune the previous round's ensemble on the grown set (``--cold``: from scratch
every round). Prints the force and energy MAE per size and strategy
(mean ± spread over seeds), the data each strategy needs to reach random sampling's error at
the largest size, and writes ``curves.csv`` and ``learning_curves.png``. Interrupted runs resume.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
from pathlib import Path

import numpy as np

from ase_race.active.loop import active_learn, label_from_pool, plot_curves, read_curve
from ase_race.training import TrainConfig
from ase_race.data import KeyMap, read_frames, split_frames, write_structures

from _bpa import DATA, mixed_temperature_test_set

KEYS = KeyMap(energy="energy", forces="forces")


def config(args, valid_file: Path) -> TrainConfig:
    return TrainConfig(
        valid_file=str(valid_file), e0s_file=str(DATA / "iso_atoms.xyz"), e0s="isolated", preset=args.preset,
        model={"dtype": "float32", **({"num_layers": args.layers} if args.layers else {})},
        method="ensemble", ensemble={"members": args.members}, loss="nll_jef", energy_weight=1.0, forces_weight=1.0,
        warmup_epochs=20, batch_size=4, lr=0.01, plateau_patience=8, checkpoint_every=1000,
    )


def interpolate_size(curve_n, curve_mae, target: float) -> float:
    """The (log-linearly interpolated) labelled-set size at which the MAE first reaches ``target``."""
    for (n0, m0), (n1, m1) in zip(zip(curve_n, curve_mae), zip(curve_n[1:], curve_mae[1:])):
        if m0 <= target:
            return float(n0)
        if m1 <= target:
            t = (np.log(m0) - np.log(target)) / (np.log(m0) - np.log(m1))
            return float(np.exp(np.log(n0) + t * (np.log(n1) - np.log(n0))))
    return float(curve_n[0]) if curve_mae[0] <= target else float("nan")


def recorded_curve(path: Path, sizes: list[int]) -> list:
    """The learning curve a finished run wrote, checked against ``sizes``."""
    if not path.exists():
        raise SystemExit(f"{path}: no learning curve (run without --report first)")
    curve = read_curve(path)
    if [r.n_train for r in curve] != sizes:
        raise SystemExit(f"{path}: sizes {[r.n_train for r in curve]}, expected {sizes} (run unfinished?)")
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,20,50,100,200")
    p.add_argument("--seeds", default="0")
    p.add_argument("--strategies", default="random,energy-std,bald-e,bald-f,bald-ef")
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=0, help="interaction layers (0: the preset's)")
    p.add_argument("--n-valid", type=int, default=10)
    p.add_argument("--structures-per-round", type=int, default=2000,
                   help="epochs per round = this / labelled size (at least --min-epochs)")
    p.add_argument("--min-epochs", type=int, default=10)
    p.add_argument("--cold", action="store_true", help="train every round from scratch instead of fine-tuning")
    p.add_argument("--out", default="runs/active_learning")
    p.add_argument("--report", action="store_true",
                   help="tabulate the finished runs under --out from their learning curves; train nothing")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ase_race.active").setLevel(logging.INFO)

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    frames = read_frames(DATA / "train_300K.xyz", keys=KEYS)
    pool_frames, valid_frames = split_frames(frames, args.n_valid, seed=12345)
    valid_file = root / "valid.extxyz"
    if not valid_file.exists():
        write_structures(valid_file, [label_from_pool(valid_frames)(i) for i in range(len(valid_frames))])
    test = read_frames(mixed_temperature_test_set(root), keys=KEYS)
    pool = [f.atoms for f in pool_frames]
    base = config(args, valid_file)

    curves: dict[tuple[str, int], list] = {}
    for seed in seeds:
        for strategy in strategies:
            out = root / f"seed{seed}" / strategy
            if args.report:
                curves[strategy, seed] = recorded_curve(out / "learning_curve.csv", sizes)
                continue
            first = root / f"seed{seed}" / strategies[0] / "round_00"
            if strategy != strategies[0] and not (out / "round_00").exists() and (first / "model.pt").exists():
                shutil.copytree(first, out / "round_00")  # same seed → same initial set and models
            curves[strategy, seed] = active_learn(
                pool, label_from_pool(pool_frames), base.replace(seed=seed), sizes, strategy, out, test=test,
                seed=seed, structures_per_round=args.structures_per_round, min_epochs=args.min_epochs,
                warm_start=not args.cold,
            )
            last = curves[strategy, seed][-1]
            print(f"seed {seed} {strategy}: F MAE at {last.n_train} = {1e3 * last.forces_mae:.1f} meV/Å", flush=True)

    with open(root / "curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "seed", "n_train", "energy_mae_meV", "forces_mae_meV_A"])
        for (strategy, seed), curve in curves.items():
            for r in curve:
                w.writerow([strategy, seed, r.n_train, 1e3 * r.energy_mae, 1e3 * r.forces_mae])

    def mean_curve(strategy, what):
        return np.mean([[getattr(r, what) for r in curves[strategy, s]] for s in seeds], axis=0)

    def spread(strategy, what):
        return np.std([[getattr(r, what) for r in curves[strategy, s]] for s in seeds], axis=0)

    def needed(n: float) -> str:
        return "never" if np.isnan(n) else f"≤{n:.0f}" if n <= sizes[0] else f"{n:.0f}"

    layers = f" with {args.layers} layers" if args.layers else ""
    for seed in seeds:
        wall = sum(r.wall_s for strategy in strategies for r in curves[strategy, seed])
        print(f"seed {seed}: {wall / 60:.0f} wall minutes of one thread, all strategies")
    print(f"\n3BPA active learning: preset {args.preset}{layers}, {args.members}-member ensembles (as given), seeds {seeds}; "
          f"test = {len(test)} mixed-temperature frames; mean ± std over seeds")
    for what, label in (("forces_mae", "force MAE (meV/Å)"), ("energy_mae", "energy MAE (meV)")):
        print(f"\n{label}")
        print(f"{'strategy':>11} " + " ".join(f"{n:>13d}" for n in sizes))
        for strategy in strategies:
            m, s = 1e3 * mean_curve(strategy, what), 1e3 * spread(strategy, what)
            print(f"{strategy:>11} " + " ".join(f"{a:7.1f} ±{b:5.1f}" for a, b in zip(m, s)))
    if "random" in strategies:
        for what, label in (("forces_mae", "force"), ("energy_mae", "energy")):
            target = mean_curve("random", what)[-1]
            print(f"\nlabelled structures needed to reach random sampling's {label} MAE at {sizes[-1]} "
                  f"(log-interpolated; 'mean': on the mean curves, then each seed against its own random run; never: not within these sizes):")
            print(f"{'strategy':>11} {'mean':>8} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds))
            for strategy in strategies:
                need = [interpolate_size(sizes, mean_curve(strategy, what), target)] + [
                    interpolate_size(sizes, [getattr(r, what) for r in curves[strategy, s]],
                                     getattr(curves["random", s][-1], what)) for s in seeds]
                print(f"{strategy:>11} " + " ".join(f"{needed(n):>8}" for n in need))
    mean_curves = {s: [type(c[0])(0, n, e, 0.0, f, 0.0, 0.0) for n, e, f in zip(
        sizes, mean_curve(s, "energy_mae"), mean_curve(s, "forces_mae"))] for s in strategies for c in [curves[s, seeds[0]]]}
    plot_curves(mean_curves, root / "learning_curves.png",
                title=f"3BPA, train 300 K pool, test mixed-T; mean of {len(seeds)} seeds")
    print(f"wrote {root / 'curves.csv'} and {root / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
