"""Active learning: which unlabelled structures to label next."""

from .acquisition import STRATEGIES, acquisition_scores, select

__all__ = ["STRATEGIES", "acquisition_scores", "select"]
