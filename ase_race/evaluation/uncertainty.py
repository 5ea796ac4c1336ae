"""Scalar uncertainty scores of a structure derived from its predictive, in torch.

``max_forces_std`` is the one number the calculator, the MD stoppers, the fallback and the
evaluators compare against thresholds (docs/calculator.md lists it among the results).
"""

from __future__ import annotations

import torch


def max_forces_std(forces_cov: torch.Tensor, batch: torch.Tensor, n_graphs: int | None = None) -> torch.Tensor:
    """max over the atoms i of each structure b of √trace Σ_i.

    Args:
        forces_cov: Σ_i (n, 3, 3) (eV/Å)², the total force covariance of each atom (calibrated
            when the result should be what the calculator reports).
        batch: (n,) int64, the structure index b of each atom.
        n_graphs: B, the number of structures (default: ``batch.max() + 1``).
    Returns:
        (B,) eV/Å in ``forces_cov``'s dtype; 0 for a structure without atoms. The trace is
        summed in the order Σ_xx + Σ_yy + Σ_zz.
    """
    if n_graphs is None:
        n_graphs = int(batch.max()) + 1 if batch.numel() else 0
    trace = forces_cov[:, 0, 0] + forces_cov[:, 1, 1] + forces_cov[:, 2, 2]
    largest = torch.zeros(n_graphs, dtype=forces_cov.dtype, device=forces_cov.device)
    largest = largest.scatter_reduce(0, batch, trace, "amax", include_self=False)
    return largest.sqrt()
