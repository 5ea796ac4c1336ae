"""Cost per calculator call of model files on rMD17 ethanol, measured in one run.

    python benchmarks/shipped_cost.py [MODEL ...]   (default: the shipped ethanol models)

Calls alternate round-robin between the models (same machine load for all); each call is a
full RACECalculator evaluation (energy, forces, every variance) of a rattled ethanol molecule.
Prints the median milliseconds per call and the ratio to the first model.
"""

from __future__ import annotations

import statistics
import sys
import time

from ase.build import molecule

from ase_race import RACECalculator


def main() -> None:
    models = sys.argv[1:] or ["ethanol-mve", "ethanol-llla", "ethanol-ensemble"]
    calcs = {m: RACECalculator(m) for m in models}
    atoms = molecule("CH3CH2OH")
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
