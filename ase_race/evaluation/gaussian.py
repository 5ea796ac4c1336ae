"""Gaussian log-likelihood terms, in torch: one implementation for the losses and the evaluators.

For an error δ ∈ R^d under N(0, Σ), with Σ = L Lᵀ its Cholesky factor:

    mahalanobis  m = δᵀ Σ⁻¹ δ                     (Σ⁻¹δ by two triangular solves)
    log det Σ      = 2 Σ_k log L_kk
    NLL            = ½ [m + log det Σ + d log 2π]  = ½ [δᵀΣ⁻¹δ + log det 2πΣ]    nats

and for a scalar residual r with variance σ²: NLL = ½ [r²/σ² + log 2πσ²]. The training loss
(:mod:`ase_race.training.losses`, which drops the ½ and the constant and weights the terms)
and the evaluators use the same functions, so the force likelihood a model is trained on is
the one it is judged by. Every function is differentiable (the loss is backpropagated through
it) and works in the dtype it is given; evaluators pass float64. Σ must be positive definite:
:func:`torch.linalg.cholesky` raises otherwise.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def mahalanobis_logdet(delta: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """δᵀ Σ⁻¹ δ and log det Σ from one Cholesky factorisation.

    Args:
        delta: δ (..., d), e.g. (n, 3) force errors in eV/Å.
        cov: Σ (..., d, d) in δ's unit squared, positive definite.
    Returns:
        (mahalanobis (...,) dimensionless, logdet (...,) in log of δ's unit squared, times d).
    """
    chol = torch.linalg.cholesky(cov)
    column = delta.unsqueeze(-1)
    solved = torch.cholesky_solve(column, chol)
    mahalanobis = (column * solved).sum(dim=(-2, -1))
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=-1)
    return mahalanobis, logdet


def mahalanobis(delta: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """δᵀ Σ⁻¹ δ: delta (..., d), cov (..., d, d) → (...,). A calibrated Σ gives mean d."""
    return mahalanobis_logdet(delta, cov)[0]


def gaussian_nll_vector(delta: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """½ [δᵀΣ⁻¹δ + log det Σ + d log 2π] (nats): delta (..., d), cov (..., d, d) → (...,)."""
    maha, logdet = mahalanobis_logdet(delta, cov)
    return 0.5 * (maha + logdet + delta.shape[-1] * LOG_2PI)


def gaussian_nll_scalar(residual: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """½ [r²/σ² + log 2πσ²] (nats), element-wise: residual and var of one shape (var > 0)."""
    return 0.5 * (residual**2 / var + torch.log(2 * math.pi * var))
