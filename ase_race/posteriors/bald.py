"""BALD: the mutual information between a label and the weights, in Gaussian form.

For a predictive that mixes members m = 1 … M with variances σ_m² (or covariances Σ_m):

    BALD_E = ½ log σ_tot² − mean_m ½ log σ_m²                       (nats, per structure)
    BALD_F = Σ_i [½ log det Σ_tot,i − mean_m ½ log det Σ_m,i]      (nats, summed over atoms)
    BALD_EF = BALD_E + BALD_F

where σ_tot² = aleatoric + epistemic. Treating atoms as independent, the sum over atoms is
the mutual information of the whole force field of the structure. For posteriors without
members (MVE, last-layer Laplace) σ_m² is the aleatoric variance of every weight sample, so
BALD_E = ½ log(σ_tot² / σ_ale²): zero for MVE. A common calibration scale cancels out.
"""

from __future__ import annotations

import torch

from .base import Prediction


def gaussian_bald(total_var: torch.Tensor, member_vars: torch.Tensor) -> torch.Tensor:
    """½ log σ_tot² − mean_m ½ log σ_m²; ``member_vars`` is (M, …), ``total_var`` (…)."""
    return 0.5 * torch.log(total_var) - 0.5 * torch.log(member_vars).mean(dim=0)


def bald_energy(p: Prediction) -> torch.Tensor:
    """BALD_E per structure, (B,) nats."""
    members = p.energy_var_ensemble if p.energy_var_ensemble is not None else p.energy_var_aleatoric[None]
    return gaussian_bald(p.energy_var.double(), members.double())


def bald_forces(p: Prediction, batch: torch.Tensor | None = None) -> torch.Tensor:
    """BALD_F per structure, (B,) nats: per-atom log-determinant terms summed over each structure.

    ``batch`` (n,) maps atoms to structures (default: all atoms in one structure).
    """
    members = p.forces_cov_ensemble if p.forces_cov_ensemble is not None else p.forces_cov_aleatoric[None]
    per_atom = 0.5 * torch.logdet(p.forces_cov.double()) - 0.5 * torch.logdet(members.double()).mean(dim=0)
    if batch is None:
        return per_atom.sum()[None]
    n_graphs = p.energy.shape[0]
    return per_atom.new_zeros(n_graphs).index_add(0, batch, per_atom)


def bald(p: Prediction, target: str = "both", batch: torch.Tensor | None = None) -> torch.Tensor:
    """BALD for ``target`` = "energy", "forces" or "both" (BALD-EF), (B,) nats."""
    if target == "energy":
        return bald_energy(p)
    if target == "forces":
        return bald_forces(p, batch)
    if target == "both":
        return bald_energy(p) + bald_forces(p, batch)
    raise ValueError(f"target must be 'energy', 'forces' or 'both', got {target!r}")
