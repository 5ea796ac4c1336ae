"""ase-race: a Bayesian E(3)-equivariant interatomic potential (RACE) as an ASE calculator
that reports energy, forces and stress together with their predictive variances."""

__version__ = "0.1.0"

from .calculator import RACECalculator, store_uncertainties  # noqa: E402
from .modelfile import load_model, save_model  # noqa: E402

__all__ = ["RACECalculator", "__version__", "load_model", "save_model", "store_uncertainties"]
