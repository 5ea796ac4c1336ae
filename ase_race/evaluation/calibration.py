"""Variance calibration: its parameters, how it maps a predictive, and how it is fitted.

A :class:`Calibration` is stored in the model file; :func:`apply_calibration` turns a
posterior's ``Prediction`` into the calibrated one (what the calculator reports and what
``ase-race evaluate`` scores); :func:`fit_calibration` finds its parameters from errors and
variances on held-out data. docs/evaluation.md shows the commands that fit and store it.

The map, for energies (one structure b) and forces (one atom i), with σ²_b = σ²_ale,b + σ²_epi,b
the total energy variance and Σ_i = Σ_ale,i + Σ_epi,i the total 3×3 force covariance::

    v_b = s_E σ²_b                   f_b = s_E · g_E(v_b) / v_b
    w_i = s_F trace(Σ_i) / 3         f_i = s_F · g_F(w_i) / w_i

    σ²_ale,b ← f_b σ²_ale,b,   σ²_epi,b ← f_b σ²_epi,b,   Σ_ale,i ← f_i Σ_ale,i,   Σ_epi,i ← f_i Σ_epi,i
    stress variance (epistemic) ← s_S × stress variance

s_E, s_F, s_S are the ``*_var_scale`` factors; g_E, g_F the optional isotonic maps (identity,
g(v) = v, when unset): monotone, piecewise linear through their points (x, y) and proportional
beyond them, g(v) = v y₀/x₀ below x₀ and v y_K/x_K above x_K, so a variance ten times larger
than any seen in calibration stays ten times larger. Both parts of a variance get the same
factor, so the aleatoric/epistemic split is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .gaussian import mahalanobis

#: maximum number of points kept in an isotonic map
MAX_ISOTONIC_POINTS = 200


@dataclass
class Calibration:
    """How reported variances are corrected (identity by default); see the module docstring.

    ``*_var_scale`` multiply variances (s_E, s_F, s_S). ``energy_isotonic`` / ``forces_isotonic``,
    when set, are the points (x, y) of the monotone maps g_E, g_F from a scaled variance to a
    calibrated one (eV² for energies; (eV/Å)² for forces, on each atom's mean diagonal variance
    trace(Σ_i)/3), x increasing.
    """

    energy_var_scale: float = 1.0
    forces_var_scale: float = 1.0
    stress_var_scale: float = 1.0
    energy_isotonic: tuple | None = None
    forces_isotonic: tuple | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "energy_var_scale": self.energy_var_scale,
            "forces_var_scale": self.forces_var_scale,
            "stress_var_scale": self.stress_var_scale,
        }
        for key in ("energy_isotonic", "forces_isotonic"):
            value = getattr(self, key)
            if value is not None:  # omitted when unset: files without it stay as they were
                out[key] = [list(map(float, value[0])), list(map(float, value[1]))]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown calibration keys {unknown}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key.endswith("_isotonic"):
                if value is None:
                    continue
                x, y = (tuple(float(v) for v in part) for part in value)
                if len(x) != len(y) or not x or any(b < a for a, b in zip(x, x[1:])) or min(x + y) <= 0:
                    raise ConfigError(f"calibration {key} must be two equal-length positive lists, x increasing")
                values[key] = (x, y)
            else:
                values[key] = float(value)
                if not values[key] > 0:
                    raise ConfigError(f"calibration factor {key} must be positive, got {value}")
        return cls(**values)

    @property
    def is_identity(self) -> bool:
        """True when it changes nothing (all scales 1, no isotonic map)."""
        return self == Calibration()


def apply_calibration(prediction, calibration: Calibration):
    """The calibrated copy of a posterior's ``Prediction`` (the module docstring's map).

    ``prediction`` is a :class:`~ase_race.posteriors.Prediction` for B structures with n atoms;
    any dataclass with its fields works (it is copied with :func:`dataclasses.replace`).

    Replaced, in float64 on the prediction's device whatever its dtype:
    ``energy_var_aleatoric``/``_epistemic`` (B,) eV², both × f_b;
    ``forces_cov_aleatoric``/``_epistemic`` (n, 3, 3) (eV/Å)², both × f_i;
    ``stress_var_epistemic`` (B, 3, 3) (eV/Å³)², × s_S (when present).
    Everything else (means, members' outputs and their own variances) is passed through
    unchanged. With the identity calibration the variances are only cast to float64.
    """
    e_ale = prediction.energy_var_aleatoric.double()
    e_epi = prediction.energy_var_epistemic.double()
    f_ale = prediction.forces_cov_aleatoric.double()
    f_epi = prediction.forces_cov_epistemic.double()
    e_factor = _energy_factor(calibration, e_ale + e_epi)
    f_factor = _forces_factor(calibration, f_ale + f_epi)[:, None, None]
    changes = {
        "energy_var_aleatoric": e_ale * e_factor,
        "energy_var_epistemic": e_epi * e_factor,
        "forces_cov_aleatoric": f_ale * f_factor,
        "forces_cov_epistemic": f_epi * f_factor,
    }
    if prediction.stress_var_epistemic is not None:
        changes["stress_var_epistemic"] = prediction.stress_var_epistemic.double() * calibration.stress_var_scale
    return dataclasses.replace(prediction, **changes)


def _energy_factor(calibration: Calibration, total_var: torch.Tensor) -> torch.Tensor:
    """f_b (B,) for the total energy variances σ²_b (B,) eV², float64."""
    scale = calibration.energy_var_scale
    return scale * _isotonic_ratio(calibration.energy_isotonic, scale * total_var)


def _forces_factor(calibration: Calibration, total_cov: torch.Tensor) -> torch.Tensor:
    """f_i (n,) for the total force covariances Σ_i (n, 3, 3) (eV/Å)², float64."""
    scale = calibration.forces_var_scale
    if calibration.forces_isotonic is None:
        return torch.full(total_cov.shape[:1], scale, dtype=total_cov.dtype, device=total_cov.device)
    trace = total_cov[:, 0, 0] + total_cov[:, 1, 1] + total_cov[:, 2, 2]
    return scale * _isotonic_ratio(calibration.forces_isotonic, scale * trace / 3)


def _isotonic_ratio(table, variance: torch.Tensor) -> torch.Tensor:
    """g(v)/v for each variance v (1 where there is no map or v ≤ 0); same shape as ``variance``.

    Inside [x₀, x_K], g interpolates linearly between the points (as :func:`numpy.interp`);
    outside, it is proportional to v.
    """
    if table is None:
        return torch.ones_like(variance)
    x = torch.tensor(table[0], dtype=variance.dtype, device=variance.device)
    y = torch.tensor(table[1], dtype=variance.dtype, device=variance.device)
    if x.numel() == 1:
        mapped = y.expand_as(variance)
    else:
        j = (torch.searchsorted(x, variance.contiguous(), right=True) - 1).clamp(0, x.numel() - 2)
        slope = (y[j + 1] - y[j]) / (x[j + 1] - x[j])
        mapped = torch.where(variance == x[j], y[j], slope * (variance - x[j]) + y[j])
        mapped = torch.where(variance == x[-1], y[-1], mapped)
    mapped = torch.where(variance < x[0], variance * y[0] / x[0], mapped)
    mapped = torch.where(variance > x[-1], variance * y[-1] / x[-1], mapped)
    positive = variance > 0
    return torch.where(positive, mapped / torch.where(positive, variance, torch.ones_like(variance)), 1.0)


def fit_calibration(
    energy_error,
    energy_var,
    forces_error,
    forces_cov,
    *,
    isotonic: bool = False,
    stress_var_scale: float = 1.0,
) -> Calibration:
    """The Calibration that minimises the Gaussian NLL of these errors under these variances.

    Args:
        energy_error: e_b = E_ref − E_pred (N,) eV, one per structure.
        energy_var: σ²_b (N,) eV², total and uncalibrated.
        forces_error: ΔF_i = F_ref − F_pred (n, 3) eV/Å, one row per atom.
        forces_cov: Σ_i (n, 3, 3) (eV/Å)², total and uncalibrated, positive definite.
        isotonic: also fit the maps g_E, g_F on top of the scales.
        stress_var_scale: s_S, stored as given (not fitted: the errors carry no stress).

    Arrays may be numpy or torch. The scales are the NLL optima of a variance multiplied by s:
    s_E = mean_b e_b²/σ²_b and s_F = mean_i ΔF_iᵀ Σ_i⁻¹ ΔF_i / 3. With ``isotonic``,
    g_E is the isotonic regression of e_b² on v_b = s_E σ²_b and g_F that of the mean squared
    component error |ΔF_i|²/3 on w_i = s_F trace(Σ_i)/3 (:func:`isotonic_variance_map`).
    """
    e_err, e_var = _float64(energy_error).reshape(-1), _float64(energy_var).reshape(-1)
    f_err, f_cov = _float64(forces_error).reshape(-1, 3), _float64(forces_cov).reshape(-1, 3, 3)
    if e_err.shape != e_var.shape or f_err.shape[0] != f_cov.shape[0]:
        raise ValueError(
            f"errors and variances must match: energies {tuple(e_err.shape)} vs {tuple(e_var.shape)}, "
            f"forces {tuple(f_err.shape)} vs {tuple(f_cov.shape)}"
        )
    s_e = float((e_err**2 / e_var).mean())
    s_f = float(mahalanobis(f_err, f_cov).mean() / 3.0)
    calibration = Calibration(energy_var_scale=s_e, forces_var_scale=s_f, stress_var_scale=float(stress_var_scale))
    if not isotonic:
        return calibration
    trace = f_cov[:, 0, 0] + f_cov[:, 1, 1] + f_cov[:, 2, 2]
    return dataclasses.replace(
        calibration,
        energy_isotonic=isotonic_variance_map((s_e * e_var).numpy(), (e_err**2).numpy()),
        forces_isotonic=isotonic_variance_map((s_f * trace / 3).numpy(), (f_err**2).mean(dim=1).numpy()),
    )


def _float64(values) -> torch.Tensor:
    """A CPU float64 tensor of numpy or torch ``values``."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def isotonic_variance_map(variance, squared_error, max_points: int = MAX_ISOTONIC_POINTS) -> tuple:
    """A monotone map predicted variance → calibrated variance, (x, y) with x increasing.

    Isotonic (pool-adjacent-violators) regression of the squared errors on the predicted
    variances: y is the non-decreasing function closest to E[e² | σ²] in least squares. Its
    constant blocks are summarised by their mean σ² (x) and fitted value (y), thinned to at
    most ``max_points``.

    Args:
        variance: predicted variances (N,).
        squared_error: squared errors (N,), in the same unit.
    """
    order = np.argsort(variance, kind="stable")
    x, target = np.asarray(variance, dtype=np.float64)[order], np.asarray(squared_error, dtype=np.float64)[order]
    values, weights, sums_x = [], [], []
    for xi, yi in zip(x, target):  # pool adjacent violators
        values.append(yi), weights.append(1.0), sums_x.append(xi)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            sums_x[-2] += sums_x[-1]
            weights[-2] = w
            del values[-1], weights[-1], sums_x[-1]
    bx = np.array(sums_x) / np.array(weights)
    by = np.maximum(np.array(values), 1e-30)
    if bx.size > max_points:
        keep = np.unique(np.linspace(0, bx.size - 1, max_points).round().astype(int))
        bx, by = bx[keep], by[keep]
    return tuple(bx.tolist()), tuple(by.tolist())
