"""Posteriors over RACE weights behind one interface (docs/posteriors/README.md)."""

from .base import Posterior, Prediction, posterior_class
from .ensemble import EnsemblePosterior
from .last_layer import LastLayerLaplacePosterior
from .mixture import mix_scalar, mix_vector, mixture_prediction
from .mve import MVEPosterior
from .novelty import NoveltyPosterior
from .sampled import DiagLaplacePosterior, IVONPosterior, SampledPosterior, SWAGPosterior

__all__ = [
    "DiagLaplacePosterior",
    "EnsemblePosterior",
    "IVONPosterior",
    "LastLayerLaplacePosterior",
    "SWAGPosterior",
    "SampledPosterior",
    "MVEPosterior",
    "NoveltyPosterior",
    "Posterior",
    "Prediction",
    "mix_scalar",
    "mix_vector",
    "mixture_prediction",
    "posterior_class",
]
