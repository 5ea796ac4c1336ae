"""The fallback loop on ethanol: hot MD with the shipped model, PySCF where it is unsure.

    python benchmarks/fallback_demo.py [--model ethanol-mve] [--temperature 1000] [--steps 600]
        [--threshold 0.15] [--min-interval 10] [--budget 30] [--retrain-every 5] [--out runs/fallback_demo]

Langevin MD at a temperature well above rMD17's 500 K, with a FallbackCalculator: PBE/def2-SVP
(PySCF, the rMD17 level of theory) is called whenever max_forces_std exceeds the threshold
(at most every ``min-interval`` steps, at most ``budget`` times), the labelled frames are
collected, and every ``retrain-every`` frames the model is fine-tuned on them. Prints the
reference calls and the model's error at each of them, per block of steps, and writes a PNG
(max_forces_std against time with the reference calls marked, and the force error of the model
at the reference calls) plus the collected extxyz.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import molecule
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from ase_race.calculator import FallbackCalculator, RACECalculator
from ase_race.calculator.pyscf_ref import PySCFCalculator
from ase_race.training.finetune import retrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ethanol-mve")
    p.add_argument("--temperature", type=float, default=1000.0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threshold", type=float, default=0.15, help="max_forces_std, eV/Å")
    p.add_argument("--min-interval", type=int, default=10)
    p.add_argument("--budget", type=int, default=30)
    p.add_argument("--retrain-every", type=int, default=5)
    p.add_argument("--block", type=int, default=100, help="steps per row of the summary")
    p.add_argument("--out", default="runs/fallback_demo")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = out / "collected.extxyz"
    if dataset.exists():
        dataset.unlink()  # a fresh demonstration (the calculator itself would append)
    calc = FallbackCalculator(
        RACECalculator(args.model), PySCFCalculator(), threshold=args.threshold, dataset=dataset,
        min_interval=args.min_interval, budget=args.budget, retrain_every=args.retrain_every,
        retrain=retrainer(epochs=20),
    )
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    rng = np.random.default_rng(0)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs, rng=rng)
    trace = []
    dyn.attach(lambda: trace.append((dyn.nsteps, calc.results["max_forces_std"], calc.results["fallback_used"])), interval=1)
    start = time.perf_counter()
    dyn.run(args.steps)
    wall = time.perf_counter() - start

    frames = read(dataset, ":") if dataset.exists() else []
    steps = np.array([t[0] for t in trace])
    std = np.array([t[1] for t in trace])
    used = np.array([t[2] for t in trace])
    errors = [float(np.abs(f.arrays["race_forces"] - f.arrays["REF_forces"]).max()) for f in frames]
    e_errors = [abs(f.info["race_energy"] - f.info["REF_energy"]) for f in frames]
    print(f"{args.model}, {args.temperature:g} K, {args.steps} steps, threshold {args.threshold} eV/Å: "
          f"{calc.n_reference} reference calls, {calc.n_retrains} retrains, {wall:.0f} s")
    print(f"{'steps':>11} {'ref calls':>9} {'median max F std':>17} {'max |ΔF| at calls (eV/Å)':>26}")
    calls = [int(f.info["call"]) for f in frames]
    for lo in range(0, args.steps, args.block):
        hi = lo + args.block
        inside = [e for c, e in zip(calls, errors) if lo < c <= hi + 1]
        mask = (steps >= lo) & (steps < hi)
        print(f"{lo:5d}–{hi:5d} {int(used[mask].sum()):9d} {np.median(std[mask]):17.3f} "
              f"{(np.mean(inside) if inside else float('nan')):26.3f}")
    if e_errors:
        print(f"energy error at the calls: first {1000 * e_errors[0]:.1f} meV, last {1000 * e_errors[-1]:.1f} meV")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), constrained_layout=True)
    a1, a2 = fig.subplots(2, 1, sharex=True)
    t = steps * 0.5
    a1.plot(t, std, lw=0.8)
    a1.axhline(args.threshold, color="k", ls="--", lw=0.8, label="threshold")
    a1.plot(t[used], std[used], "rv", ms=5, label="reference call")
    a1.set_ylabel("max_forces_std / (eV/Å)")
    a1.legend()
    a2.plot(np.array(calls) * 0.5 - 0.5, errors, "o-", color="C3")
    a2.set_ylabel("model's max |ΔF| at the call / (eV/Å)")
    a2.set_xlabel("time / fs")
    a1.set_title(f"{args.model}: ethanol at {args.temperature:g} K with PySCF fallback")
    fig.savefig(out / "fallback.png", dpi=120)
    print(f"wrote {out / 'fallback.png'} and {dataset}")


if __name__ == "__main__":
    main()
