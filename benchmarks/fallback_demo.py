"""The fallback loop on ethanol: hot MD with the shipped model, PySCF where it is unsure,
against the same run without retraining.

    OMP_NUM_THREADS=1 python benchmarks/fallback_demo.py [--model ethanol-ensemble] [--temperature 750]
        [--steps 3000] [--threshold 0.35] [--min-interval 20] [--budget 60] [--retrain-every 5]
        [--retrain-epochs 10] [--replay-size 80] [--no-recalibrate] [--no-baseline]
        [--data ../shared/data] [--out runs/fallback_demo]

Langevin MD at a temperature above rMD17's 500 K with a FallbackCalculator: PBE/def2-SVP
(PySCF, the rMD17 level of theory) is called whenever ``max_forces_std`` exceeds the
threshold (at most every ``min-interval`` steps, at most ``budget`` times), and every
``retrain-every`` reference frames the model is fine-tuned on all frames collected so far,
rehearsing ``replay-size`` structures of its rMD17 training set, and its variance calibration
is refitted on the recipe's 50 validation structures (the ones the shipped calibration was
fitted on).
The control is the same run (same start, velocities and Langevin noise seed, same threshold,
spacing and budget) without retraining. Per block of steps, both runs report the steps above
the threshold, the reference calls, the median ``max_forces_std`` and the model's largest
force error at the calls. Writes ``fallback.png`` and each run's collected extxyz.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import molecule
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from ase_race.calculator import FallbackCalculator, RACECalculator
from ase_race.calculator.pyscf_ref import PySCFCalculator
from ase_race.data.readers import read_frames, split_frames
from ase_race.data.rmd17 import convert
from ase_race.training.finetune import retrainer

HERE = Path(__file__).resolve().parent


def rmd17_split(data: Path) -> tuple[list, list]:
    """The ethanol recipe's training and validation frames (950 / 50, seed 1)."""
    paths = convert(data / "rmd17_ethanol", Path("data/rmd17_ethanol"))
    return split_frames(read_frames(paths["train"]), 50, 1)


def run(args, retrain: bool, out: Path, train=(), valid=()) -> dict:
    """One MD run; returns its per-step trace and the collected frames."""
    dataset = out / ("collected_retrain.extxyz" if retrain else "collected_baseline.extxyz")
    if dataset.exists():
        dataset.unlink()  # a fresh demonstration (the calculator itself would append)
    fine_tune = retrainer(epochs=args.retrain_epochs, replay=train, replay_size=args.replay_size,
                          calibrate_on=() if args.no_recalibrate else valid)
    history = []  # the model after each retraining, replayed on the control trajectory later

    def tracked(bundle, atoms_list):
        history.append(fine_tune(bundle, atoms_list))
        return history[-1]

    calc = FallbackCalculator(
        RACECalculator(args.model), PySCFCalculator(), threshold=args.threshold, dataset=dataset,
        min_interval=args.min_interval, budget=args.budget, retrain_every=args.retrain_every if retrain else 0,
        retrain=tracked if retrain else None,
    )
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    rng = np.random.default_rng(args.seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs, rng=rng)
    trace, positions = [], []

    def record():
        trace.append((dyn.nsteps, calc.results["max_forces_std"], calc.results["fallback_used"]))
        positions.append(atoms.positions.copy())

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(args.steps)
    frames = read(dataset, ":") if dataset.exists() else []
    return {
        "label": f"retrain every {args.retrain_every}" if retrain else "no retraining",
        "steps": np.array([t[0] for t in trace]), "std": np.array([t[1] for t in trace]),
        "used": np.array([t[2] for t in trace]), "calls": [int(f.info["call"]) for f in frames],
        "errors": [float(np.abs(f.arrays["race_forces"] - f.arrays["REF_forces"]).max()) for f in frames],
        "n_reference": calc.n_reference, "n_retrains": calc.n_retrains, "wall_s": time.perf_counter() - start,
        "positions": positions, "frames": frames, "bundle": calc.model.bundle, "history": history,
    }


def replay(bundle, control: dict, threshold: float, every: int = 5) -> dict:
    """A model on the control run's trajectory (every ``every``-th step) and on its reference
    frames: the fraction of steps above the threshold and the force error against PySCF.

    Both models see the same structures here, so this isolates what retraining changed from
    where the two trajectories went.
    """
    calc = RACECalculator(bundle)
    atoms = molecule("CH3CH2OH")
    above = []
    for pos in control["positions"][::every]:
        atoms.positions = pos
        atoms.calc = calc
        atoms.get_potential_energy()
        above.append(calc.results["max_forces_std"] > threshold)
    errors = []
    for frame in control["frames"]:
        probe = frame.copy()
        probe.calc = calc
        errors.append(np.abs(probe.get_forces() - frame.arrays["REF_forces"]).mean())
    return {"above": float(np.mean(above)), "force_mae": float(np.mean(errors))}


def report(r: dict, args) -> None:
    last = f", the last at step {r['calls'][-1] - 1}" if r["calls"] else ""
    print(f"\n{r['label']}: {r['n_reference']} reference calls{last}, {r['n_retrains']} retrains, {r['wall_s']:.0f} s")
    print(f"{'steps':>11} {'above thr.':>10} {'ref calls':>9} {'median max F std':>17} {'mean max |ΔF| at calls':>23}")
    for lo in range(0, args.steps, args.block):
        hi = lo + args.block
        mask = (r["steps"] >= lo) & (r["steps"] < hi)
        inside = [e for c, e in zip(r["calls"], r["errors"]) if lo < c <= hi + 1]
        print(f"{lo:5d}–{hi:5d} {int((r['std'][mask] > args.threshold).sum()):10d} {int(r['used'][mask].sum()):9d} "
              f"{np.median(r['std'][mask]):17.3f} {(np.mean(inside) if inside else float('nan')):23.3f}")


def _with_positions(positions):
    atoms = molecule("CH3CH2OH")
    atoms.positions = positions
    return atoms


def plot(runs: list[dict], args, path: Path, replays: list[dict] | None = None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 10 if replays else 7.5), constrained_layout=True)
    axes = fig.subplots(4 if replays else 3, 1, gridspec_kw={"height_ratios": [1, 1, 1, 0.9][: 4 if replays else 3]})
    a1, a2, a3 = axes[:3]
    a2.sharex(a1)
    a3.sharex(a1)
    for k, r in enumerate(runs):
        t = r["steps"] * 0.5
        a1.plot(t, r["std"], lw=0.6, color=f"C{k}", label=r["label"], alpha=0.8)
        a2.plot(t, np.cumsum(r["used"]), color=f"C{k}", label=r["label"])
        a3.plot(np.array(r["calls"]) * 0.5 - 0.5, r["errors"], "o-", ms=3, color=f"C{k}", label=r["label"])
    a1.axhline(args.threshold, color="k", ls="--", lw=0.8, label="threshold")
    a1.set_ylabel("max_forces_std (eV/Å)")
    a1.legend(fontsize=8)
    a2.set_ylabel("reference calls so far")
    a3.set_ylabel("model's max |ΔF|\nat the call (eV/Å)")
    a3.set_xlabel("time (fs)")
    a1.set_title(f"{args.model}: ethanol at {args.temperature:g} K, PySCF fallback above {args.threshold:g} eV/Å")
    if replays:
        a4 = axes[3]
        n = np.arange(len(replays))
        a4.plot(n, [100 * r["above"] for r in replays], "o-", color="C0")
        a4.set_ylabel("control trajectory:\n% steps above threshold", color="C0")
        a4.set_xlabel(f"retrains so far (every {args.retrain_every} reference frames)")
        b4 = a4.twinx()
        b4.plot(n, [1000 * r["force_mae"] for r in replays], "s--", color="C3")
        b4.set_ylabel("force MAE on its PySCF\nframes (meV/Å)", color="C3")
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ethanol-ensemble")
    p.add_argument("--temperature", type=float, default=750.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--threshold", type=float, default=0.35, help="max_forces_std, eV/Å")
    p.add_argument("--min-interval", type=int, default=20)
    p.add_argument("--budget", type=int, default=60)
    p.add_argument("--retrain-every", type=int, default=5)
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--replay-size", type=int, default=80, help="rMD17 training structures rehearsed per fine-tune")
    p.add_argument("--no-recalibrate", action="store_true", help="keep the shipped calibration after retraining")
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=int, default=500, help="steps per row of the summary")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without retraining")
    p.add_argument("--out", default="runs/fallback_demo")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = rmd17_split(args.data)
    runs = [run(args, retrain=True, out=out, train=train if args.replay_size else (), valid=valid)]
    if not args.no_baseline:
        runs.append(run(args, retrain=False, out=out))
    print(f"{args.model}, ethanol, {args.temperature:g} K, {args.steps} steps of 0.5 fs, threshold {args.threshold} eV/Å, "
          f"min interval {args.min_interval}, budget {args.budget}; retraining: {args.retrain_epochs} epochs, "
          f"{args.replay_size} rehearsed structures, {'shipped calibration' if args.no_recalibrate else 'recalibrated'}")
    for r in runs:
        report(r, args)
    if len(runs) == 2:
        retrained, control = runs
        from ase_race.modelfile import load_model, save_model

        replays = [replay(b, control, args.threshold) for b in [load_model(args.model), *retrained["history"]]]
        save_model(out / "retrained.pt", retrained["bundle"].posterior, calibration=retrained["bundle"].calibration,
                   metadata={"fallback_demo": {k: str(v) for k, v in vars(args).items()}})
        write(out / "control_trajectory.extxyz", [_with_positions(p) for p in control["positions"][::5]])
        print(f"\non the control run's trajectory (every 5th step) and its {len(control['frames'])} PySCF frames, "
              f"which the retrained model never saw:")
        print(f"{'model':>22} {'steps above threshold':>22} {'force MAE vs PySCF (eV/Å)':>26}")
        for k, r in enumerate(replays):
            name = "shipped" if k == 0 else f"after {k} retrains"
            print(f"{name:>22} {100 * r['above']:21.1f}% {r['force_mae']:26.3f}")
    else:
        replays = None
    plot(runs, args, out / "fallback.png", replays)
    print(f"wrote {out / 'fallback.png'}")


if __name__ == "__main__":
    main()
