"""Metrics that say whether predicted uncertainties can be trusted (SPEC §9)."""

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
