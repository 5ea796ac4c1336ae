"""Accuracy and likelihood of predictions on a labelled set (used after every epoch)."""

from __future__ import annotations

import math

import torch

from .. import _keys as K
from ..evaluation.gaussian import gaussian_nll_scalar, gaussian_nll_vector
from ..posteriors import Posterior
from .batches import GraphDataset


def evaluate_dataset(
    model, dataset: GraphDataset, batch_size: int = 16, device="cpu", loss_fn=None
) -> dict[str, float]:
    """Energy and force errors and Gaussian NLLs of ``model`` on ``dataset``.

    ``model`` is a RACE network (its own heads' variances) or a Posterior (its total
    predictive variance, aleatoric + epistemic).

    Returns (units in the names): ``energy_mae_meV``, ``energy_rmse_meV``,
    ``forces_mae_meV_A``, ``forces_rmse_meV_A`` (per component), ``energy_nll`` (per structure,
    ½[r²/σ² + log 2πσ²] with σ in eV), ``forces_nll`` (per atom, ½[ΔFᵀΣ⁻¹ΔF + log det 2πΣ]),
    and ``energy_rms_std_meV`` / ``forces_rms_std_meV_A``: the root-mean-square predicted σ
    (per structure / per component), which a calibrated model makes close to the RMSE.
    With ``loss_fn(out, batch) -> tensor`` (a batch-mean loss), also ``valid_loss``: its mean
    over structures, from the same forward passes.
    """
    loss_total = 0.0
    e_abs, e_sq, f_abs, f_sq, e_nll, f_nll, e_var, f_var = [], [], [], [], [], [], [], []
    is_posterior = isinstance(model, Posterior)
    was_training = False if is_posterior else model.training
    if not is_posterior:
        model.eval()
    for batch in dataset.batches(batch_size, device):
        if is_posterior:
            p = model.predict(batch.graph)
            energy, var, forces, cov = p.energy, p.energy_var, p.forces, p.forces_cov
        else:
            out = model(batch.graph, compute_forces=True)
            if loss_fn is not None:
                loss_total += float(loss_fn(out, batch).detach()) * batch.n_structures
            energy, var, forces, cov = out[K.ENERGY], out[K.ENERGY_VAR], out[K.FORCES], out[K.FORCES_COV]
        r = (batch.ref["energy"] - energy.detach()).double()
        var = var.detach().double()
        df = (batch.ref["forces"] - forces.detach()).double()
        cov = cov.detach().double()
        e_abs.append(r.abs()), e_sq.append(r**2), f_abs.append(df.abs().ravel()), f_sq.append((df**2).ravel())
        e_nll.append(gaussian_nll_scalar(r, var))
        e_var.append(var), f_var.append(torch.diagonal(cov, dim1=1, dim2=2).ravel())
        f_nll.append(gaussian_nll_vector(df, cov))
    if not is_posterior:
        model.train(was_training)
    cat = lambda xs: torch.cat([x.reshape(-1) for x in xs])  # noqa: E731
    extra = {"valid_loss": loss_total / len(dataset)} if loss_fn is not None else {}
    return {
        **extra,
        "energy_mae_meV": 1000 * float(cat(e_abs).mean()),
        "energy_rmse_meV": 1000 * math.sqrt(float(cat(e_sq).mean())),
        "forces_mae_meV_A": 1000 * float(cat(f_abs).mean()),
        "forces_rmse_meV_A": 1000 * math.sqrt(float(cat(f_sq).mean())),
        "energy_nll": float(cat(e_nll).mean()),
        "forces_nll": float(cat(f_nll).mean()),
        "energy_rms_std_meV": 1000 * math.sqrt(float(cat(e_var).mean())),
        "forces_rms_std_meV_A": 1000 * math.sqrt(float(cat(f_var).mean())),
    }
