"""Mean–variance heads: per-structure energy variance and per-atom 3×3 force covariance.

All functions are pure tensor maps. ``scale`` is the model's energy scale (eV); the network's
raw outputs are dimensionless, so variances carry ``scale²``.
"""

from __future__ import annotations

import torch


def energy_variance(
    node_log_var: torch.Tensor, batch: torch.Tensor, n_graphs: int, form: str
) -> torch.Tensor:
    """Energy variance per structure from per-atom log-variances.

    Args:
        node_log_var: log σ_i² in log(eV²), (n_atoms,).
        batch: graph index per atom, (n_atoms,).
        n_graphs: number of structures.
        form: ``"sum"``: σ_E² = Σ_i σ_i² (independent atomic noise, grows with system size);
            ``"paper"``: σ_E² = exp(mean_i log σ_i²) (arXiv 2510.03046; size-independent).
    Returns:
        σ_E² in eV², (n_graphs,).
    """
    zeros = node_log_var.new_zeros(n_graphs)
    if form == "sum":
        return zeros.index_add(0, batch, node_log_var.exp())
    if form == "paper":
        counts = zeros.index_add(0, batch, torch.ones_like(node_log_var))
        return (zeros.index_add(0, batch, node_log_var) / counts).exp()
    raise ValueError(f"unknown energy variance form {form!r}")


def covariance_equivariant(
    log_iso: torch.Tensor, vectors: torch.Tensor, scale: float, eps: float
) -> torch.Tensor:
    """Σ_i = scale² (exp(s_i) I + Σ_k u_ik u_ikᵀ) + ε I.

    Positive definite by construction, and Σ(R·x) = R Σ(x) Rᵀ because s_i is invariant and the
    u_ik are 1o vectors.

    Args:
        log_iso: s_i, (n_atoms,).
        vectors: u_ik, (n_atoms, K, 3).
    Returns:
        (n_atoms, 3, 3) in (eV/Å)².
    """
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    outer = torch.einsum("nki,nkj->nij", vectors, vectors)
    return scale**2 * (log_iso.exp()[:, None, None] * eye + outer) + eps * eye


def covariance_cholesky(params: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """The paper's form: Σ_i = scale² L_i L_iᵀ + ε I with L_i lower triangular.

    ``params[:, 0:3]`` are the log-diagonal of L, ``params[:, 3:6]`` its (1,0), (2,0), (2,1)
    entries. These are invariant scalars read in the lab frame, so Σ does *not* rotate with the
    structure (kept to reproduce the paper).

    Args:
        params: (n_atoms, 6).
    Returns:
        (n_atoms, 3, 3) in (eV/Å)².
    """
    diagonal = torch.diag_embed(params[:, 0:3].exp())
    lower = params.new_zeros(params.shape[0], 3, 3)
    lower[:, 1, 0], lower[:, 2, 0], lower[:, 2, 1] = params[:, 3], params[:, 4], params[:, 5]
    chol = diagonal + lower
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    return scale**2 * chol @ chol.transpose(1, 2) + eps * eye
