"""One timed calculator in its own process (so that peak memory is its own).

Started by speed.py as ``python _speed_worker.py KIND DTYPE XYZ`` with KIND ``race:PRESET`` or
``mace:small``; reads commands on stdin ("call" → one timed call) and prints each answer as one JSON
line prefixed with ``@@`` (other libraries print to stdout too). Runs under any interpreter that has the needed package (mace-torch lives in its own
virtual environment because it pins an old e3nn).
"""

import json
import sys
import time

import numpy as np
from ase.io import read


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def race_calculator(preset: str, dtype: str, atoms):
    from ase_race import RACECalculator
    from ase_race.config import ModelConfig
    from ase_race.testing import random_model
    from ase_race.posteriors import MVEPosterior

    config = ModelConfig.from_preset(preset, species=(1, 6, 7, 8), dtype=dtype, avg_num_neighbors=30.0)
    return RACECalculator(MVEPosterior(random_model(config, seed=0)), device="cpu")


def mace_calculator(dtype: str, atoms):
    """MACE "small": 64x0e+64x1o, 2 layers, L=3, correlation 3, r_max 5 (random weights)."""
    import torch
    # mace first: it sets the environment that lets its pinned e3nn 0.4.4 load its constants
    # under torch >= 2.6 (a process-wide side effect, confined to this worker process).
    from mace.calculators import MACECalculator
    from mace.modules import MACE, RealAgnosticResidualInteractionBlock
    from e3nn import o3

    torch.manual_seed(0)
    model = MACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticResidualInteractionBlock,
        num_interactions=2, num_elements=4, hidden_irreps=o3.Irreps("64x0e+64x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(4), avg_num_neighbors=30.0,
        atomic_numbers=[1, 6, 7, 8], correlation=3, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
    ).to(getattr(torch, dtype))
    return MACECalculator(models=model, device="cpu", default_dtype=dtype)


def neighbour_list_ms(atoms, cutoff: float, repeats: int = 5) -> float:
    from ase_race.graph import vesin_edges

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vesin_edges(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    kind, dtype, xyz = sys.argv[1:4]
    atoms = read(xyz)
    name, _, option = kind.partition(":")
    calc = race_calculator(option, dtype, atoms) if name == "race" else mace_calculator(dtype, atoms)
    atoms.calc = calc
    atoms.get_forces()  # warm-up: code generation, first allocations
    baseline = rss_mib("VmRSS")
    sign = 1.0
    for line in sys.stdin:
        if line.strip() != "call":
            break
        sign = -sign
        atoms.positions[0, 0] += sign * 1e-4  # a new geometry, as in MD: forces a recalculation
        start = time.perf_counter()
        atoms.get_forces()
        if name == "race":
            atoms.calc.get_property("max_forces_std", atoms)
        elapsed = 1000 * (time.perf_counter() - start)
        print("@@" + json.dumps({"ms": elapsed}), flush=True)
    report = {"peak_mib": rss_mib("VmHWM"), "extra_mib": rss_mib("VmHWM") - baseline}
    if name == "race":
        report["nl_ms"] = neighbour_list_ms(atoms, calc.posterior.config.r_max)
    print("@@" + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
