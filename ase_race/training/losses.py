"""The three losses of the paper, with per-frame weights, β-NLL and warm-up.

docs/training.md (section Losses) says which to choose and how λ affects the learned variances.

Notation for a batch of B structures with n atoms in total: E_b the reference energy, μ_b and
σ_b² the predicted mean and variance, w_b the frame weight (config_weight); F_i, F̂_i reference
and predicted forces (F̂ = −∇μ_E), Σ_i the predicted 3×3 force covariance. ⟨·⟩ averages over
structures (weights w_b) or over atoms (the weight of each atom's structure).

    mse     : λ_E ⟨(E − μ)²⟩ + λ_F ⟨|F − F̂|²⟩
    nll_e   : λ_E ⟨(E − μ)²/σ²⟩ + ⟨log σ²⟩ + λ_F ⟨|F − F̂|²⟩
    nll_jef : λ_E ⟨(E − μ)²/σ²⟩ + ⟨log σ²⟩ + λ_F ⟨ΔF_iᵀ Σ_i⁻¹ ΔF_i⟩ + ⟨log det Σ_i⟩

|F − F̂|² sums the three components. The force terms ΔFᵀΣ⁻¹ΔF and log det Σ come from
:func:`ase_race.evaluation.gaussian.mahalanobis_logdet` (one Cholesky factorisation), the same
function the evaluators' NLLs use. With β > 0, each NLL term is multiplied by the detached
variance to the power β (β-NLL, Seitzer et al. 2022): σ²ᵝ for energies, (trace Σ_i / 3)ᵝ for
forces; β = 0 is the plain NLL.

Warm-up (``warmup=True``): the ``mse`` terms alone, whatever ``kind`` is, so that the mean is
fitted before the variance terms switch on. (Fitting the variance heads on detached residuals
during the warm-up was tried: through the shared layers their NLL gradients, much larger than
the MSE's, slowed the mean's fit by about half on rMD17 ethanol.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LOSSES
from ..errors import ConfigError
from ..evaluation.gaussian import mahalanobis_logdet


@dataclass(frozen=True)
class LossWeights:
    energy: float = 1.0  # λ_E
    forces: float = 10.0  # λ_F
    beta: float = 0.0  # β-NLL exponent


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | None) -> torch.Tensor:
    """Σ w·v / Σ w; ``total`` replaces the local Σ w when the batch is split over processes."""
    return (values * weights).sum() / (weights.sum() if total is None else total)


def energy_mse(residual, w, total=None):
    """⟨r²⟩ with r = E − μ (eV)."""
    return _weighted_mean(residual**2, w, total)


def forces_mse(pred_f, ref_f, w_atoms, total=None):
    """⟨|F − F̂|²⟩ over atoms (sum over the three components)."""
    return _weighted_mean(((pred_f - ref_f) ** 2).sum(dim=1), w_atoms, total)


def energy_nll(residual, var_e, w, lam: float, beta: float, total=None):
    """λ_E ⟨r²/σ²⟩ + ⟨log σ²⟩ (β-weighted), r = E − μ."""
    terms = lam * residual**2 / var_e + torch.log(var_e)
    if beta:
        terms = terms * var_e.detach() ** beta
    return _weighted_mean(terms, w, total)


def forces_nll(pred_f, cov_f, ref_f, w_atoms, lam: float, beta: float, total=None):
    """λ_F ⟨ΔFᵀ Σ⁻¹ ΔF⟩ + ⟨log det Σ⟩ over atoms (β-weighted)."""
    mahalanobis, logdet = mahalanobis_logdet(ref_f - pred_f, cov_f)
    terms = lam * mahalanobis + logdet
    if beta:
        terms = terms * (torch.diagonal(cov_f, dim1=1, dim2=2).sum(1).detach() / 3) ** beta
    return _weighted_mean(terms, w_atoms, total)


def compute_loss(
    kind: str,
    pred: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    weights: LossWeights,
    warmup: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``kind`` for one batch, and its parts (as floats) for logging.

    Args:
        pred: ``energy`` (B,) float64, ``energy_var`` (B,), ``forces`` (n, 3),
            ``forces_cov`` (n, 3, 3).
        ref: ``energy`` (B,) float64, ``forces`` (n, 3), ``weight`` (B,), ``atom_weight`` (n,)
            (the weight of each atom's structure), and optionally ``weight_total`` /
            ``atom_weight_total``: the sums over the whole batch when it is split across
            processes.
        warmup: mean-only warm-up (see the module docstring).
    """
    if kind not in LOSSES:
        raise ConfigError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    # Total energies are ~10⁴–10⁵ eV: subtract in float64 before casting to the model dtype.
    residual = (ref["energy"] - pred["energy"]).to(pred["forces"].dtype)
    forces = pred["forces"]
    w, w_atoms = ref["weight"], ref["atom_weight"]
    tw, ta = ref.get("weight_total"), ref.get("atom_weight_total")
    if kind == "mse" or warmup:
        e_part = weights.energy * energy_mse(residual, w, tw)
    else:
        e_part = energy_nll(residual, pred["energy_var"], w, weights.energy, weights.beta, tw)
    if kind == "nll_jef" and not warmup:
        f_part = forces_nll(forces, pred["forces_cov"], ref["forces"], w_atoms, weights.forces, weights.beta, ta)
    else:
        f_part = weights.forces * forces_mse(forces, ref["forces"], w_atoms, ta)
    parts = {"energy": e_part, "forces": f_part}
    total = e_part + f_part
    return total, {name: float(value.detach()) for name, value in parts.items()}
