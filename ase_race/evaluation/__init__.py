"""Metrics that say whether predicted uncertainties can be trusted.

:mod:`.metrics` works on arrays of errors and standard deviations (numpy); :mod:`.gaussian`
holds the Gaussian likelihood terms in torch, shared with the training loss; :mod:`.calibration`
maps a predictive to its calibrated one and fits the map; :mod:`.uncertainty` derives the scalar
scores thresholds compare against. docs/evaluation.md describes ``ase-race evaluate``, which
reports them.
"""

from .calibration import Calibration, apply_calibration, fit_calibration, isotonic_variance_map
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
from .uncertainty import max_forces_std

__all__ = [
    "LEVELS",
    "Calibration",
    "apply_calibration",
    "auroc",
    "calibration_error",
    "ence",
    "fit_calibration",
    "gaussian_nll",
    "isotonic_variance_map",
    "mae",
    "max_forces_std",
    "miscalibration_area",
    "observed_coverage",
    "rmse",
    "spearman",
    "uncertainty_report",
    "variance_scale",
]
