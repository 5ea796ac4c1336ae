"""Radial basis: Bessel functions times a smooth polynomial envelope.

    b_n(r) = √(2/r_c) · sin(nπ r / r_c) / r                     n = 1 … n_rbf
    u(x)   = 1 − (p+1)(p+2)/2 · x^p + p(p+2) · x^(p+1) − p(p+1)/2 · x^(p+2),   x = r / r_c

with u(x) = 0 for x ≥ 1. u and its first two derivatives vanish at r_c, so every quantity the
network builds from ``b_n(r) · u(r / r_c)`` (with bias-free MLPs) goes to zero smoothly as a
neighbour leaves the cutoff sphere: energies are continuous and forces continuous there.
"""

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """(n_edges,) distances in Å → (n_edges, n_rbf) basis values (1/Å^½ · 1/Å)."""

    def __init__(self, r_max: float, num_basis: int):
        super().__init__()
        self.r_max = float(r_max)
        self.prefactor = math.sqrt(2.0 / self.r_max)
        # float64 explicitly: sin(nπ r/r_c) must vanish at r_c in every model dtype, whatever
        # torch's default dtype is.
        self.register_buffer(
            "frequencies", math.pi / self.r_max * torch.arange(1, num_basis + 1, dtype=torch.float64)
        )

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies.to(r.dtype) * r) / r


class PolynomialEnvelope(nn.Module):
    """(n_edges,) distances in Å → (n_edges,) envelope u(r / r_c), exactly 0 beyond r_c."""

    def __init__(self, r_max: float, p: int = 6):
        super().__init__()
        if p < 2:
            raise ValueError(f"envelope exponent p must be at least 2, got {p}")
        self.r_max = float(r_max)
        self.p = int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p, x = self.p, r / self.r_max
        u = (
            1.0
            - 0.5 * (p + 1) * (p + 2) * x**p
            + p * (p + 2) * x ** (p + 1)
            - 0.5 * p * (p + 1) * x ** (p + 2)
        )
        return u * (x < 1.0)


class RadialEmbedding(nn.Module):
    """Distances (n_edges,) → b_n(r) · u(r/r_c), shape (n_edges, n_rbf)."""

    def __init__(self, r_max: float, num_basis: int, p: int):
        super().__init__()
        self.bessel = BesselBasis(r_max, num_basis)
        self.envelope = PolynomialEnvelope(r_max, p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.bessel(r) * self.envelope(r).unsqueeze(-1)
