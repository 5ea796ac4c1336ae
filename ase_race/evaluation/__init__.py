"""Metrics that say whether predicted uncertainties can be trusted.

:mod:`.metrics` works on arrays of errors and standard deviations (numpy); :mod:`.gaussian`
holds the Gaussian likelihood terms in torch, shared with the training loss. docs/evaluation.md
describes ``ase-race evaluate``, which reports them.
"""

from .metrics import (
    LEVELS,
    auroc,
    calibration_error,
    ence,
    gaussian_nll,
    mae,
    miscalibration_area,
    observed_coverage,
    rmse,
    spearman,
    uncertainty_report,
    variance_scale,
)

__all__ = [
    "LEVELS",
    "auroc",
    "calibration_error",
    "ence",
    "gaussian_nll",
    "mae",
    "miscalibration_area",
    "observed_coverage",
    "rmse",
    "spearman",
    "uncertainty_report",
    "variance_scale",
]
