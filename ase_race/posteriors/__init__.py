"""Posteriors over RACE weights behind one interface (SPEC §4)."""

from .base import Posterior, Prediction, posterior_class
from .mixture import mix_scalar, mix_vector
from .mve import MVEPosterior

__all__ = ["MVEPosterior", "Posterior", "Prediction", "mix_scalar", "mix_vector", "posterior_class"]
