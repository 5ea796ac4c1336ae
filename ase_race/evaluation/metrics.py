"""Accuracy and uncertainty-quality metrics for Gaussian predictions, on arrays.

Every function takes errors e = y − μ and predicted standard deviations σ (same shape, any
unit, flattened; numpy arrays or anything ``np.asarray`` reads) and returns plain floats. The
Gaussian NLL is :mod:`ase_race.evaluation.gaussian`'s, the one the training loss and the
training-time evaluation use. docs/evaluation.md shows how the metrics are reported.
Conventions:

* confidence levels p_j = j/20, j = 0 … 20 (21 levels, Kuleshov et al. 2018); the observed
  coverage p̂_j is the fraction of |e| ≤ σ z_j with z_j = Φ⁻¹((1 + p_j)/2), the central
  interval of probability p_j;
* calibration error = Σ_j (p_j − p̂_j)² (Kuleshov's cal with equal weights);
* miscalibration area = ∫₀¹ |p̂(p) − p| dp (trapezoid over the 21 levels);
* ENCE = mean over B equal-count bins of σ of |RMV_b − RMSE_b| / RMV_b with
  RMV_b = √mean σ², RMSE_b = √mean e² (Levi et al. 2022);
* Spearman ρ between |e| and σ; AUROC of a score telling set B (positives) from set A.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import rankdata

from .gaussian import gaussian_nll_scalar

LEVELS = np.linspace(0.0, 1.0, 21)


def _flat(*arrays):
    out = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    if len({a.size for a in out}) != 1:
        raise ValueError("errors and standard deviations must have the same size")
    return out


def mae(errors) -> float:
    return float(np.mean(np.abs(errors)))


def rmse(errors) -> float:
    return float(np.sqrt(np.mean(np.square(errors))))


def gaussian_nll(errors, std) -> float:
    """Mean of ½[e²/σ² + log(2πσ²)] per element (nats), by :func:`.gaussian.gaussian_nll_scalar`."""
    e, s = _flat(errors, std)
    return float(gaussian_nll_scalar(torch.from_numpy(e), torch.from_numpy(s) ** 2).mean())


def observed_coverage(errors, std, levels=LEVELS) -> np.ndarray:
    """p̂_j: the fraction of |e| inside the central interval of probability p_j."""
    e, s = _flat(errors, std)
    z = ndtri((1.0 + np.asarray(levels)) / 2.0)  # Φ⁻¹; +inf at p = 1
    ratio = np.abs(e) / s
    return np.array([np.mean(ratio <= zj) for zj in z])


def calibration_error(errors, std, levels=LEVELS) -> float:
    """Σ_j (p_j − p̂_j)² over the confidence levels."""
    return float(np.sum((np.asarray(levels) - observed_coverage(errors, std, levels)) ** 2))


def miscalibration_area(errors, std, levels=LEVELS) -> float:
    """∫ |p̂(p) − p| dp by the trapezoid rule over the levels."""
    gap = np.abs(observed_coverage(errors, std, levels) - np.asarray(levels))
    return float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(levels)))


def ence(errors, std, bins: int = 10) -> float:
    """Expected normalised calibration error over ``bins`` equal-count bins of σ."""
    e, s = _flat(errors, std)
    order = np.argsort(s, kind="stable")
    terms = []
    for part in np.array_split(order, min(bins, e.size)):
        rmv = math.sqrt(float(np.mean(s[part] ** 2)))
        terms.append(abs(rmv - math.sqrt(float(np.mean(e[part] ** 2)))) / rmv)
    return float(np.mean(terms))


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either is constant."""
    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    if np.all(ra == ra[0]) or np.all(rb == rb[0]):
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc(scores_a, scores_b) -> float:
    """P(score of a B element > score of an A element), ties counting ½ (Mann–Whitney U)."""
    a, b = np.ravel(scores_a), np.ravel(scores_b)
    ranks = rankdata(np.concatenate([a, b]))
    u = ranks[a.size :].sum() - b.size * (b.size + 1) / 2
    return float(u / (a.size * b.size))


def variance_scale(errors, std) -> float:
    """s minimising the Gaussian NLL of e under variances s σ²: s = mean(e²/σ²)."""
    e, s = _flat(errors, std)
    return float(np.mean((e / s) ** 2))


def uncertainty_report(errors, std) -> dict[str, float]:
    """Every metric above for one property (one set)."""
    e, s = _flat(errors, std)
    return {
        "mae": mae(e),
        "rmse": rmse(e),
        "nll": gaussian_nll(e, s),
        "calibration_error": calibration_error(e, s),
        "miscalibration_area": miscalibration_area(e, s),
        "ence": ence(e, s),
        "spearman": spearman(np.abs(e), s),
        "rms_std": math.sqrt(float(np.mean(s**2))),
        "variance_scale": variance_scale(e, s),
    }
