"""Write one model file per posterior kind, and the predictions it gives, as test fixtures.

    python tests/make_posterior_fixtures.py KIND [KIND ...]

``tests/data/posteriors/<kind>-v<state_version>.pt`` and ``.json``. A fixture is written once
per state layout version and never overwritten: tests/test_posterior_fixtures.py loads every
one with the current code and checks it still predicts what it did, and fails when a
registered kind has no fixture of its current version. The networks are small and random
(what is tested is the stored state, not accuracy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from ase.build import molecule

from ase_race import RACECalculator, save_model
from ase_race.config import ModelConfig
from ase_race.nn import build_model
from ase_race.posteriors import (
    DiagLaplacePosterior, EnsemblePosterior, IVONPosterior, LastLayerLaplacePosterior, MVEPosterior, NoveltyPosterior,
    SWAGPosterior, posterior_class,
)
from ase_race.posteriors.stacked import flat_parameters

OUT = Path(__file__).parent / "data" / "posteriors"
CONFIG = ModelConfig.from_preset(
    "tiny", species=(1, 6, 8), scale=2.0, num_features=4, hidden_irreps="4x0e+4x1o", sh_lmax=1, radial_mlp=(8,),
    readout_hidden=4,
)
RESULTS = ("energy", "forces", "energy_var_aleatoric", "energy_var_epistemic", "forces_var_aleatoric",
           "forces_var_epistemic", "max_forces_std")


def build(kind: str):
    """A posterior of ``kind`` around seeded random networks, with a non-trivial epistemic part."""
    model = build_model(CONFIG, seed=0)
    generator = torch.Generator().manual_seed(1)
    n = flat_parameters(model).numel()
    if kind == "mve":
        return MVEPosterior(model)
    if kind == "ensemble":
        return EnsemblePosterior([build_model(CONFIG, seed=s) for s in (0, 1, 2)])
    if kind == "swag":
        mean = flat_parameters(model).double()
        deviations = 1e-2 * torch.randn(3, n, generator=generator, dtype=torch.float64)
        return SWAGPosterior(model, mean**2 + 1e-4, deviations, n_samples=4, sample_seed=2)
    if kind == "ivon":
        hess = torch.rand(n, generator=generator, dtype=torch.float64)
        return IVONPosterior.from_optimizer_state(model, hess, 1e4, 1e-4, n_samples=4, sample_seed=3)
    if kind == "laplace":
        variance = 1e-4 * torch.rand(n, generator=generator, dtype=torch.float64)
        return DiagLaplacePosterior(model, variance, n_samples=4, sample_seed=4, hyper={"prior_precision": 1.0})
    if kind == "last_layer_laplace":
        p = model.last_layer_weights().numel()
        root = torch.randn(p, p, generator=generator, dtype=torch.float64)
        return LastLayerLaplacePosterior(model, 1e-2 * root @ root.T / p, {"prior_precision": 1.0})
    if kind == "novelty":
        limited = build_model(CONFIG.replace(isolated_limit=1.0, max_log_var=0.0), seed=0)
        width = CONFIG.num_layers * CONFIG.readout_hidden
        mean = torch.randn(3, width, generator=generator, dtype=torch.float64)
        spread = 0.5 + torch.rand(3, width, generator=generator, dtype=torch.float64)
        references = [torch.randn(k, width, generator=generator, dtype=torch.float64) for k in (5, 4, 3)]
        parameters = dict(energy_aleatoric=0.5, energy_scale=0.3, energy_width=2.0, energy_power=3.0, energy_bond=0.2,
                          forces_aleatoric=0.9, forces_scale=1.0, forces_width=3.0, forces_power=2.0, forces_bond=0.4)
        return NoveltyPosterior(limited, mean, spread, references, torch.tensor([1.5, 2.0, 1.0], dtype=torch.float64),
                                torch.tensor([3.0, 4.0, 2.0], dtype=torch.float64), parameters)
    raise SystemExit(f"no fixture recipe for posterior kind {kind!r}: add one to {__file__}")


def predictions(path: str | Path) -> dict:
    atoms = molecule("CH3CH2OH")
    atoms.calc = RACECalculator(str(path), device="cpu")
    atoms.get_potential_energy()
    return {key: atoms.calc.results[key].tolist() if hasattr(atoms.calc.results[key], "tolist")
            else atoms.calc.results[key] for key in RESULTS}


def fixture_path(kind: str) -> Path:
    return OUT / f"{kind}-v{posterior_class(kind).state_version}.pt"


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for kind in sys.argv[1:]:
        path = fixture_path(kind)
        if path.exists():
            raise SystemExit(f"{path} exists: a fixture of a released state version is never rewritten")
        save_model(path, build(kind), metadata={"purpose": f"fixture of the {kind!r} posterior state"})
        path.with_suffix(".json").write_text(json.dumps(predictions(path), indent=1))
        print("wrote", path, f"({path.stat().st_size // 1024} kB)")
