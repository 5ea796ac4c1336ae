"""Record every calculator result of the shipped models on a few fixed structures.

tests/test_shipped_models.py checks that later code gives the same numbers for the same files
(``--check``). Reductions split over threads round differently for other thread counts, so both
run with OMP_NUM_THREADS=2; on the recording machine the numbers are bit-identical, but other
CPUs pick other BLAS kernels (AVX2 vs AVX-512), which move float32 results by ~1e-7 and the
ensemble's variances (differences of nearly equal members) by up to ~5e-5 relative, so the
check allows 2e-4 relative (and 1e-5 of the largest entry, for entries near zero). Rewrite the record only when a shipped model file itself is
replaced:
    OMP_NUM_THREADS=2 python tests/make_shipped_reference.py
"""

import sys
from pathlib import Path

import numpy as np
from ase.build import molecule

from ase_race import RACECalculator

OUT = Path(__file__).parent / "data" / "shipped_predictions.npz"
MODELS = ("ethanol-novelty", "ethanol-mve", "ethanol-llla", "ethanol-ensemble")
RTOL = 2e-4  # see the module docstring


def structures():
    """Equilibrium ethanol, a rattled copy, and a rattled copy in a periodic box (stress)."""
    base = molecule("CH3CH2OH")
    rattled = base.copy()
    rattled.rattle(0.05, seed=3)
    boxed = rattled.copy()
    boxed.set_cell([9.0, 9.5, 10.0])
    boxed.center()
    boxed.pbc = True
    return {"equilibrium": base, "rattled": rattled, "periodic": boxed}


def record():
    out = {}
    for name in MODELS:
        calc = RACECalculator(name, device="cpu")
        for label, atoms in structures().items():
            atoms = atoms.copy()
            atoms.calc = calc
            calc.calculate(atoms)
            for key, value in calc.results.items():
                out[f"{name}/{label}/{key}"] = np.asarray(value, dtype=np.float64)
    return out


def check() -> list[str]:
    """The keys whose results differ from the record (or are missing on either side)."""
    recorded = np.load(OUT)
    now = record()
    keys = set(now) | set(recorded.files)
    def same(a, b):
        return a.shape == b.shape and np.allclose(a, b, rtol=RTOL, atol=1e-5 * float(np.abs(b).max(initial=0.0)))

    return sorted(k for k in keys if k not in now or k not in recorded.files or not same(now[k], recorded[k]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        differing = check()
        print("differing:", differing if differing else "none")
        sys.exit(1 if differing else 0)
    np.savez(OUT, **record())
    print("wrote", OUT)
