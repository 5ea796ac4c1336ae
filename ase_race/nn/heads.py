"""Mean–variance heads: per-structure energy variance and per-atom 3×3 force covariance.

All functions are pure tensor maps. ``scale`` is the model's energy scale (eV); the network's
raw outputs are dimensionless, so variances carry ``scale²``.
"""

from __future__ import annotations

import math

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


def smootherstep(x: torch.Tensor) -> torch.Tensor:
    """0 for x ≤ 0, 1 for x ≥ 1, 6x⁵ − 15x⁴ + 10x³ between (C², monotone)."""
    x = x.clamp(0.0, 1.0)
    return x**3 * (10.0 - 15.0 * x + 6.0 * x**2)


def soft_cap(log_var: torch.Tensor, cap: float) -> torch.Tensor:
    """cap − softplus(cap − ℓ): ℓ where ℓ ≪ cap, never above cap (smooth, monotone)."""
    return cap - torch.nn.functional.softplus(cap - log_var)


def _cap_vectors(vectors: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """u / √(1 + scale²|u|²/e^cap): keeps scale²|u|² below e^cap, the identity for small u."""
    norm2 = (vectors**2).sum(-1, keepdim=True)
    return vectors / torch.sqrt(1.0 + scale**2 * norm2 / math.exp(cap))


def covariance_equivariant(
    log_iso: torch.Tensor, vectors: torch.Tensor, scale: float, eps: float, max_log_var: float | None = None
) -> torch.Tensor:
    """Σ_i = scale² (exp(s_i) I + Σ_k u_ik u_ikᵀ) + ε I.

    Positive definite by construction, and Σ(R·x) = R Σ(x) Rᵀ because s_i is invariant and the
    u_ik are 1o vectors. With ``max_log_var`` ℓ_max, s_i is soft-capped at ℓ_max − 2 log scale
    and each u_ik shrunk by :func:`_cap_vectors`, so every eigenvalue stays below
    (1 + K)·e^ℓ_max + ε.

    Args:
        log_iso: s_i, (n_atoms,).
        vectors: u_ik, (n_atoms, K, 3).
    Returns:
        (n_atoms, 3, 3) in (eV/Å)².
    """
    if max_log_var is not None:
        log_iso = soft_cap(log_iso, max_log_var - 2.0 * math.log(scale))
        vectors = _cap_vectors(vectors, scale, max_log_var)
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    outer = torch.einsum("nki,nkj->nij", vectors, vectors)
    return scale**2 * (log_iso.exp()[:, None, None] * eye + outer) + eps * eye


def covariance_cholesky(params: torch.Tensor, scale: float, eps: float, max_log_var: float | None = None) -> torch.Tensor:
    """The paper's form: Σ_i = scale² L_i L_iᵀ + ε I with L_i lower triangular.

    ``params[:, 0:3]`` are the log-diagonal of L, ``params[:, 3:6]`` its (1,0), (2,0), (2,1)
    entries. These are invariant scalars read in the lab frame, so Σ does *not* rotate with the
    structure (kept to reproduce the paper).

    With ``max_log_var``, the log-diagonal is soft-capped at (ℓ_max − 2 log scale)/2 and the
    off-diagonal entries shrunk alike.

    Args:
        params: (n_atoms, 6).
    Returns:
        (n_atoms, 3, 3) in (eV/Å)².
    """
    if max_log_var is not None:
        log_diag = soft_cap(params[:, 0:3], 0.5 * max_log_var - math.log(scale))
        off = _cap_vectors(params[:, 3:6], scale, max_log_var)
        params = torch.cat([log_diag, off], dim=1)
    diagonal = torch.diag_embed(params[:, 0:3].exp())
    lower = params.new_zeros(params.shape[0], 3, 3)
    lower[:, 1, 0], lower[:, 2, 0], lower[:, 2, 1] = params[:, 3], params[:, 4], params[:, 5]
    chol = diagonal + lower
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    return scale**2 * chol @ chol.transpose(1, 2) + eps * eye
