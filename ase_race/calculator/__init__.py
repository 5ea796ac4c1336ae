"""The ASE calculator and helpers that keep its uncertainties with the structures."""

from .ase_calc import RACECalculator
from .fallback import FallbackCalculator
from .observers import UncertaintyExceeded, UncertaintyLog, UncertaintyStop, UncertaintyWriter, store_uncertainties

__all__ = [
    "FallbackCalculator",
    "RACECalculator",
    "UncertaintyExceeded",
    "UncertaintyLog",
    "UncertaintyStop",
    "UncertaintyWriter",
    "store_uncertainties",
]
