"""The ASE calculator and helpers that keep its uncertainties with the structures."""

from .ase_calc import RACECalculator
from .observers import UncertaintyWriter, store_uncertainties

__all__ = ["RACECalculator", "UncertaintyWriter", "store_uncertainties"]
