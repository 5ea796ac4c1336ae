"""Cost per call of every posterior against a single model (``speed.py --posteriors``).

All posteriors share one random ``small`` network (speed does not depend on weight values);
the ensemble has 10 members with their own random weights. Calls alternate round-robin over the
posteriors, so every one sees the same machine load; the figure is the median per call of
``RACECalculator`` (energy, forces, every variance; stress for periodic cells). "loop" is the
same predictive from a plain Python loop over members or samples (one forward and backward
pass each), for the ensemble and SWAG.
"""

from __future__ import annotations

import statistics
import time

import torch

from ase_race import RACECalculator
from ase_race.posteriors import (
    DiagLaplacePosterior,
    EnsemblePosterior,
    IVONPosterior,
    LastLayerLaplacePosterior,
    MVEPosterior,
    SWAGPosterior,
)
from ase_race.posteriors.stacked import flat_parameters, unflatten
from ase_race.testing import random_posterior

SPECIES = (1, 6, 7, 8)


def _model(seed: int, preset: str, dtype: str):
    return random_posterior(preset, seed=seed, species=SPECIES, dtype=dtype).model


def posteriors(preset: str, dtype: str) -> dict:
    base = _model(0, preset, dtype)
    theta = flat_parameters(base).double()
    n = theta.numel()
    gen = torch.Generator().manual_seed(0)
    small = torch.full((n,), 1e-6, dtype=torch.float64)
    p = base.last_layer_weights().numel()
    cov = 1e-2 * torch.eye(p, dtype=torch.float64)
    return {
        "mve": MVEPosterior(base),
        "ensemble M=10": EnsemblePosterior([_model(s, preset, dtype) for s in range(10)]),
        "swag S=30": SWAGPosterior(base, theta**2 + small, 1e-3 * torch.randn(40, n, generator=gen, dtype=torch.float64), n_samples=30),
        "ivon S=16": IVONPosterior(base, small, n_samples=16),
        "laplace S=16": DiagLaplacePosterior(base, small, n_samples=16),
        "last-layer laplace k=P": LastLayerLaplacePosterior(base, cov),
        "last-layer laplace k=4": LastLayerLaplacePosterior(base, cov, force_rank=4),
    }


class _Loop:
    """The plain loop over an ensemble's members or a sampled posterior's samples."""

    def __init__(self, posterior):
        if isinstance(posterior, EnsemblePosterior):
            self.ens = posterior
        else:
            models = []
            for theta in posterior.samples():
                model = _copy(posterior.model)
                model.load_state_dict({**model.state_dict(), **unflatten(model, theta.to(model.dtype))})
                models.append(model)
            self.ens = EnsemblePosterior(models)

    def __call__(self, graph, compute_stress):
        return self.ens.predict_loop(graph, compute_stress=compute_stress)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib() -> float | None:
    """This process's peak resident memory (VmHWM, Linux), MiB."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def run(systems: dict, sizes, preset: str, dtype: str, repeats: int, device: str | None = None,
        only: list[str] | None = None) -> None:
    """``only``: time just the posteriors whose names start with one of these (and ``mve``, the
    reference); one per process gives each its own peak memory, printed at the end."""
    from ase_race.graph import from_atoms

    table = posteriors(preset, dtype)
    if only:
        table = {k: v for k, v in table.items() if k == "mve" or k.startswith(tuple(only))}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nposteriors: preset {preset}, {dtype}, {name}; median ms per RACECalculator call; ×: ratio to mve")
    names = list(table)
    print(f"{'atoms':>5} " + " ".join(f"{name:>24}" for name in names))
    for n in sizes:
        atoms = systems[n]
        periodic = bool(atoms.pbc.all())
        calcs = {name: RACECalculator(post, device=device) for name, post in table.items()}
        loops = {}
        if n <= 200:
            for name in ("ensemble M=10", "swag S=30"):
                loops[name] = _Loop(calcs[name].posterior)
        graph = from_atoms(atoms, SPECIES, table["mve"].config.r_max, dtype=calcs["mve"].dtype)
        graph = {key: value.to(device) for key, value in graph.items()}
        reps = max(2, repeats // 8) if n > 1000 else repeats
        times = {name: [] for name in names}
        loop_times = {name: [] for name in loops}
        for _ in range(reps):
            for name, calc in calcs.items():
                a = atoms.copy()
                a.calc = calc
                calc.reset()  # else ASE serves the cached results of the previous round
                start = time.perf_counter()
                a.get_potential_energy()
                times[name].append(1000 * (time.perf_counter() - start))
            for name, loop in loops.items():
                _synchronize(device)
                start = time.perf_counter()
                loop(graph, periodic)
                _synchronize(device)
                loop_times[name].append(1000 * (time.perf_counter() - start))
        med = {name: statistics.median(v) for name, v in times.items()}
        ref = med["mve"]
        print(f"{n:5d} " + " ".join(f"{med[name]:12.1f} ({med[name] / ref:5.2f}×)    " for name in names), flush=True)
        for name, v in loop_times.items():
            t = statistics.median(v)
            print(f"      plain loop, {name}: {t:.1f} ms ({t / ref:.2f}× mve; batched/loop {med[name] / t:.2f})", flush=True)
    peak = _peak_mib()
    if peak is not None:
        print(f"peak resident memory of this process: {peak:.0f} MiB")
