"""How much epistemic force variance a rank-k last-layer Laplace keeps, with Σ's leading
directions and with a basis fitted for the forces (``fit_force_basis``).

    OMP_NUM_THREADS=1 python benchmarks/llla_force_basis.py [--model ethanol-llla] [--data ../shared/data]

The basis is fitted on every 19th rMD17 ethanol training structure (53); the shares are
medians over every 10th ``test_01`` structure (100) and over 50 frames of 750 K Langevin MD
run with the model itself (every 8th of 400 steps of 0.5 fs). Prints the table in
docs/posteriors/laplace.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import molecule
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from ase_race import _keys as K
from ase_race.calculator import RACECalculator
from ase_race.data.rmd17 import convert
from ase_race.evaluation import max_forces_std
from ase_race.graph import from_atoms
from ase_race.modelfile import load_model

HERE = Path(__file__).resolve().parent


def hot_frames(model: str, n: int = 50, every: int = 8, temperature: float = 750.0) -> list:
    atoms = molecule("CH3CH2OH")
    atoms.calc = RACECalculator(model)
    rng = np.random.default_rng(0)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.01 / units.fs, rng=rng)
    frames = []
    for _ in range(n):
        dyn.run(every)
        frames.append(atoms.copy())
    return frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ethanol-llla")
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()

    from ase.io import read

    paths = convert(args.data / "rmd17_ethanol", Path("data/rmd17_ethanol"))
    post = load_model(args.model).posterior
    cfg = post.config

    def graphs(frames):
        return [from_atoms(a, cfg.species, cfg.r_max, dtype=post.dtype) for a in frames]

    fit = graphs(read(paths["train"], "::19"))
    sets = {"test": graphs(read(paths["test"], "::10")), "750 K": graphs(hot_frames(args.model))}

    def variance(gs):  # total epistemic force variance per structure
        return np.array([float(torch.diagonal(post.predict(g).forces_cov_epistemic, dim1=1, dim2=2).sum()) for g in gs])

    def max_std(gs):
        return np.array([float(max_forces_std(post.predict(g).forces_cov_epistemic, g[K.BATCH])[0]) for g in gs])

    post.set_force_rank(0)
    exact = {name: variance(gs) for name, gs in sets.items()}
    exact_max = max_std(sets["test"])
    print(f"{args.model}: P = {post.covariance.shape[0]}; basis fitted on {len(fit)} training structures; "
          f"medians over {len(sets['test'])} test and {len(sets['750 K'])} MD frames")
    print(f"{'k':>3} | {'Σ leading: test':>15} {'750 K':>7} {'max σF':>7} | {'fitted: on fit':>14} {'test':>7} "
          f"{'750 K':>7} {'max σF':>7}")
    for k in args.ranks:
        post.set_force_rank(k)
        plain = [np.median(variance(gs) / exact[name]) for name, gs in sets.items()]
        plain_max = np.median(max_std(sets["test"]) / exact_max)
        share = post.fit_force_basis(fit, k)
        fitted = [np.median(variance(gs) / exact[name]) for name, gs in sets.items()]
        fitted_max = np.median(max_std(sets["test"]) / exact_max)
        print(f"{k:3d} | {100 * plain[0]:14.1f}% {100 * plain[1]:6.1f}% {100 * plain_max:6.1f}% | {100 * share:13.1f}% "
              f"{100 * fitted[0]:6.1f}% {100 * fitted[1]:6.1f}% {100 * fitted_max:6.1f}%")


if __name__ == "__main__":
    main()
