"""The mixture rule for members or samples of a posterior (SPEC §4), as pure tensor functions.

For predictions μ_m with variances σ_m², m = 1 … M:

    μ          = mean_m μ_m
    aleatoric  = mean_m σ_m²
    epistemic  = var_m μ_m          (population variance, ddof 0)
    total      = aleatoric + epistemic
"""

from __future__ import annotations

import torch


def mix_scalar(means: torch.Tensor, variances: torch.Tensor):
    """Mixture of scalar Gaussians.

    Args:
        means: μ_m, (M, ...).
        variances: σ_m², (M, ...) in squared units.
    Returns:
        (mean, aleatoric, epistemic), each (...).
    """
    mean = means.mean(dim=0)
    return mean, variances.mean(dim=0), ((means - mean) ** 2).mean(dim=0)


def mix_vector(means: torch.Tensor, covariances: torch.Tensor):
    """Mixture of 3-vector Gaussians with full covariances.

    Args:
        means: μ_m, (M, ..., 3).
        covariances: Σ_m, (M, ..., 3, 3).
    Returns:
        (mean (..., 3), aleatoric (..., 3, 3), epistemic (..., 3, 3)) with
        epistemic = mean_m (μ_m − μ)(μ_m − μ)ᵀ.
    """
    mean = means.mean(dim=0)
    dev = means - mean
    epistemic = torch.einsum("m...i,m...j->...ij", dev, dev) / means.shape[0]
    return mean, covariances.mean(dim=0), epistemic
