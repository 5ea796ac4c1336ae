"""The mixture rule for members or samples of a posterior, as pure tensor functions.

For predictions μ_m with variances σ_m², m = 1 … M:

    μ          = mean_m μ_m
    aleatoric  = mean_m σ_m²
    epistemic  = var_m μ_m          (population variance, ddof 0)
    total      = aleatoric + epistemic

Ensembles mix their members with it, and SWAG, IVON and the diagonal Laplace their weight
samples (docs/posteriors/README.md).
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


def mixture_prediction(outputs: dict[str, torch.Tensor], compute_stress: bool = False):
    """A :class:`~ase_race.posteriors.base.Prediction` from M members' outputs.

    Args:
        outputs: what :class:`~ase_race.posteriors.stacked.StackedModel` returns: ``energy``
            (M, B), ``energy_var`` (M, B), ``node_energy`` (M, n), ``forces`` (M, n, 3),
            ``forces_cov`` (M, n, 3, 3) and optionally ``stress`` (M, B, 3, 3).
    Returns:
        the mixture's mean, aleatoric and epistemic parts, plus the members' energies, forces
        and (with ``compute_stress``) stresses (``energy_ensemble``, ``forces_ensemble``,
        ``stress_ensemble``). The stress variance is the members' spread per component (there
        is no aleatoric stress head).
    """
    from .base import Prediction

    energy, e_ale, e_epi = mix_scalar(outputs["energy"], outputs["energy_var"])
    forces, f_ale, f_epi = mix_vector(outputs["forces"], outputs["forces_cov"])
    stress = stress_var = members = None
    if compute_stress:
        members = outputs["stress"]
        stress = members.mean(dim=0)
        stress_var = ((members - stress) ** 2).mean(dim=0)
    return Prediction(
        energy=energy,
        node_energy=outputs["node_energy"].mean(dim=0),
        energy_var_aleatoric=e_ale,
        energy_var_epistemic=e_epi,
        forces_cov_aleatoric=f_ale,
        forces_cov_epistemic=f_epi,
        forces=forces,
        stress=stress,
        stress_var_epistemic=stress_var,
        energy_ensemble=outputs["energy"],
        forces_ensemble=outputs["forces"],
        stress_ensemble=members,
        energy_var_ensemble=outputs["energy_var"],
        forces_cov_ensemble=outputs["forces_cov"],
    )
