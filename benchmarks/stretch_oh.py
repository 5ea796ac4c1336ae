"""Uncertainty as ethanol's O–H bond is pulled out of the training distribution.

    python benchmarks/stretch_oh.py [MODEL ...]    (default: the shipped ethanol model)

Moves the hydroxyl H along the O–H direction from 0.8 to 2.4 Å (rMD17 ethanol at 500 K keeps
it near 0.97 Å) and prints, for each model, the energy, energy std and max_forces_std, with
their ratio to the value at the equilibrium bond length, and the epistemic part of the force
std (max over atoms of √trace of the epistemic covariance).
"""

from __future__ import annotations

import sys

import numpy as np
from ase.build import molecule

from ase_race import RACECalculator


def stretched(distance: float):
    atoms = molecule("CH3CH2OH")
    o = int(np.flatnonzero(atoms.numbers == 8)[0])
    d = atoms.get_all_distances()[o]
    h = int(min((i for i in range(len(atoms)) if atoms.numbers[i] == 1), key=lambda i: d[i]))
    direction = atoms.positions[h] - atoms.positions[o]
    atoms.positions[h] = atoms.positions[o] + distance * direction / np.linalg.norm(direction)
    return atoms


def main() -> None:
    models = sys.argv[1:] or ["ethanol-mve"]
    distances = [0.8, 0.9, 0.97, 1.1, 1.3, 1.6, 2.0, 2.4]
    for model in models:
        calc = RACECalculator(model)
        rows = []
        for r in distances:
            atoms = stretched(r)
            atoms.calc = calc
            e = atoms.get_potential_energy()
            epi = float(np.sqrt(calc.results["forces_var_epistemic"].sum(axis=1).max()))
            rows.append((r, e, calc.results["energy_std"], calc.results["max_forces_std"], epi))
        ref = rows[distances.index(0.97)]
        print(f"model {model}")
        print(f"{'O–H/Å':>6} {'E−E(0.97)/eV':>13} {'E std/meV':>10} {'×':>6} {'max F std/(meV/Å)':>18} {'×':>6}"
              f" {'epistemic/(meV/Å)':>18} {'×':>7}")
        for r, e, es, fs, fe in rows:
            ratio = f"{fe / ref[4]:7.1f}" if ref[4] > 0 else f"{'-':>7}"
            print(f"{r:6.2f} {e - ref[1]:13.3f} {1000 * es:10.1f} {es / ref[2]:6.2f} {1000 * fs:18.1f} {fs / ref[3]:6.2f}"
                  f" {1000 * fe:18.1f} {ratio}")


if __name__ == "__main__":
    main()
