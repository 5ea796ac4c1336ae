"""The RACE network and its building blocks."""

from .model import RACE, TORCH_DTYPES, build_model

__all__ = ["RACE", "TORCH_DTYPES", "build_model"]
