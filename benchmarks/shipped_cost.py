"""Cost per calculator call of model files on rMD17 ethanol, measured in one run.

    python benchmarks/shipped_cost.py [--molecules K] [MODEL ...]   (default: the shipped ethanol models)

Calls alternate round-robin between the models (same machine load for all); each call is a
full RACECalculator evaluation (energy, forces, every variance) of K rattled ethanol molecules
(K = 1: 9 atoms; K = 3: 27 atoms, stacked 4 Å apart along z, within each other's cutoff).
Prints the median milliseconds per call and the ratio to the first model.
"""

from __future__ import annotations

import statistics
import sys
import time

from ase.build import molecule

from ase_race import RACECalculator


def main() -> None:
    args = sys.argv[1:]
    copies = 1
    if args[:1] == ["--molecules"]:
        copies, args = int(args[1]), args[2:]
    models = args or ["ethanol-mve", "ethanol-novelty", "ethanol-llla", "ethanol-ensemble"]
    calcs = {m: RACECalculator(m) for m in models}
    atoms = molecule("CH3CH2OH")
    for k in range(1, copies):
        other = molecule("CH3CH2OH")
        other.translate([0.0, 0.0, 4.0 * k])
        atoms += other
    atoms.rattle(0.02, seed=0)
    times = {m: [] for m in models}
    for _ in range(30):
        for m, calc in calcs.items():
            a = atoms.copy()
            a.calc = calc
            calc.reset()  # no cached results: every call evaluates
            start = time.perf_counter()
            a.get_potential_energy()
            times[m].append(1000 * (time.perf_counter() - start))
    ref = statistics.median(times[models[0]])
    print(f"{'model':>20} {'ms/call':>8} {'×':>6}")
    for m in models:
        t = statistics.median(times[m])
        print(f"{m:>20} {t:8.1f} {t / ref:6.2f}")


if __name__ == "__main__":
    main()
