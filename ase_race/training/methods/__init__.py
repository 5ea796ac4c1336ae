"""Posterior methods on the training side: one module per method, registered by ``kind``.

Each module holds the method's options dataclass, its hooks into the one-network training
loop and its ``fit``; the predictive it produces lives in :mod:`ase_race.posteriors`.
docs/architecture.md says how to add one.
"""

from .base import Fitted, Method, MethodOptions, method_class, registered_methods

__all__ = ["Fitted", "Method", "MethodOptions", "method_class", "registered_methods"]
