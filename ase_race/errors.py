"""Exceptions raised by ``ase_race``, rooted in ASE's calculator error family, and how it warns.

Catching :class:`ase.calculators.calculator.CalculatorError` catches all of them, and each
also derives from the builtin a caller would naturally expect (``ValueError`` for bad input,
``ReadError`` for an unreadable model file).
"""

import os
import sys
import warnings

from ase.calculators.calculator import CalculatorError, InputError, ReadError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_caller(message: str, category: type[Warning] = FutureWarning) -> None:
    """Warn at the first frame outside ``ase_race``: the user's script or the CLI call that read
    the config, not the package function that noticed (``skip_file_prefixes`` needs Python 3.12)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level + 1)


class RaceError(CalculatorError):
    """Base class of every error raised by ``ase_race``."""


class ConfigError(RaceError, ValueError):
    """A configuration value is unknown, missing or out of range."""


class StructureError(RaceError, InputError, ValueError):
    """An ``ase.Atoms`` object the model cannot evaluate (NaN positions, overlapping atoms, ...)."""


class UnknownElementError(StructureError):
    """The structure contains an element the model was not trained on."""


class ModelFileError(RaceError, ReadError):
    """A model file is foreign, truncated, unsafe (pickled objects) or from a newer version."""


class DataError(RaceError, ValueError):
    """A dataset cannot be used as asked (a frame lacks a requested label, no frames, ...)."""


class TrainingError(RaceError, RuntimeError):
    """Training cannot go on (the weights diverged to NaN or infinity, ...)."""


class PredictionError(RaceError, ArithmeticError):
    """The model produced a non-finite energy, force, stress or variance for a structure."""


class ProtocolError(RaceError):
    """An i-PI server cannot be reached, or it broke the socket protocol."""
