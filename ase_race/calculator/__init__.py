"""The ASE calculator and helpers that keep its uncertainties with the structures."""

from .ase_calc import RACECalculator
from .observers import UncertaintyLog, UncertaintyWriter, store_uncertainties

__all__ = ["RACECalculator", "UncertaintyLog", "UncertaintyWriter", "store_uncertainties"]
