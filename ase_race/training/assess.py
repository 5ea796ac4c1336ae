"""Evaluate a model file on labelled data and fit its variance calibration (SPEC §9).

:func:`gather` runs the posterior over a data set once and keeps errors and standard
deviations (total, aleatoric, epistemic) per structure (energy) and per force component;
:func:`assess` turns them into the metrics of :mod:`ase_race.evaluation`; :func:`fit_calibration`
finds the variance scales that minimise the Gaussian NLL; :func:`figures` draws the pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _keys as K
from ..data import Frame
from ..evaluation import LEVELS, auroc, observed_coverage, uncertainty_report
from ..evaluation.gaussian import mahalanobis
from ..modelfile import Calibration, ModelBundle
from .batches import GraphDataset

PARTS = ("total", "aleatoric", "epistemic")


@dataclass
class Gathered:
    """Predictions on one set. Energies per structure (N,); forces per component (3n,)."""

    energy_ref: np.ndarray
    energy_pred: np.ndarray
    energy_var: dict[str, np.ndarray]  # part → (N,) eV²
    forces_ref: np.ndarray
    forces_pred: np.ndarray
    forces_var: dict[str, np.ndarray]  # part → (3n,) (eV/Å)²
    forces_mahalanobis: np.ndarray  # (n,) ΔFᵀ Σ⁻¹ ΔF with the total covariance
    max_forces_std: np.ndarray  # (N,) eV/Å, as the calculator reports it
    n_atoms: np.ndarray  # (N,)


def gather(bundle: ModelBundle, frames: list[Frame], batch_size: int = 8, device="cpu") -> Gathered:
    """Predict every frame (labels ``energy`` and ``forces`` required), calibration applied."""
    post = bundle.posterior
    cal = bundle.calibration
    data = GraphDataset(frames, post.config.species, post.config.r_max, post.dtype)
    acc: dict[str, list] = {k: [] for k in ("er", "ep", "fr", "fp", "maha", "maxstd", "n")}
    e_var = {p: [] for p in PARTS}
    f_var = {p: [] for p in PARTS}
    for batch in data.batches(batch_size, device):
        pred = post.predict(batch.graph)
        ale_e, epi_e = pred.energy_var_aleatoric.double(), pred.energy_var_epistemic.double()
        ale_f, epi_f = pred.forces_cov_aleatoric.double(), pred.forces_cov_epistemic.double()
        # The calibration as the calculator applies it (scale, then isotonic map).
        e_factor = torch.as_tensor(cal.energy_factor((ale_e + epi_e).cpu().numpy()), device=ale_e.device)
        f_factor = torch.as_tensor(cal.forces_factor((ale_f + epi_f).cpu().numpy()), device=ale_f.device)[:, None, None]
        ale_e, epi_e, ale_f, epi_f = ale_e * e_factor, epi_e * e_factor, ale_f * f_factor, epi_f * f_factor
        cov = ale_f + epi_f
        delta = (batch.ref["forces"].double() - pred.forces.double())
        maha = mahalanobis(delta, cov)
        diag = lambda c: torch.diagonal(c, dim1=1, dim2=2).reshape(-1)  # noqa: E731
        trace = torch.diagonal(cov, dim1=1, dim2=2).sum(-1)
        graph_of_atom = batch.graph[K.BATCH]
        max_std = torch.zeros(pred.energy.shape[0], dtype=torch.float64, device=trace.device).scatter_reduce(
            0, graph_of_atom, trace.sqrt(), "amax", include_self=False
        )
        acc["er"].append(batch.ref["energy"].double()), acc["ep"].append(pred.energy.double())
        acc["fr"].append(batch.ref["forces"].double().reshape(-1)), acc["fp"].append(pred.forces.double().reshape(-1))
        acc["maha"].append(maha), acc["maxstd"].append(max_std)
        acc["n"].append(torch.bincount(graph_of_atom, minlength=pred.energy.shape[0]))
        for part, (ve, vf) in {"total": (ale_e + epi_e, cov), "aleatoric": (ale_e, ale_f), "epistemic": (epi_e, epi_f)}.items():
            e_var[part].append(ve)
            f_var[part].append(diag(vf))
    cat = lambda xs: torch.cat(xs).cpu().numpy()  # noqa: E731
    return Gathered(
        energy_ref=cat(acc["er"]), energy_pred=cat(acc["ep"]),
        energy_var={p: cat(v) for p, v in e_var.items()},
        forces_ref=cat(acc["fr"]), forces_pred=cat(acc["fp"]),
        forces_var={p: cat(v) for p, v in f_var.items()},
        forces_mahalanobis=cat(acc["maha"]), max_forces_std=cat(acc["maxstd"]), n_atoms=cat(acc["n"]),
    )


def assess(g: Gathered, ood: Gathered | None = None) -> dict:
    """Every metric for energies and forces and each variance part (units: eV, eV/Å).

    Parts whose variance is zero everywhere (the epistemic part of MVE) are left out. With
    ``ood``, the AUROC of the energy std and of ``max_forces_std`` for telling ``ood`` from ``g``.
    """
    out: dict = {"n_structures": int(g.energy_ref.size), "n_atoms": int(g.n_atoms.sum())}
    for name, err, var in (
        ("energy", g.energy_ref - g.energy_pred, g.energy_var),
        ("forces", g.forces_ref - g.forces_pred, g.forces_var),
    ):
        out[name] = {part: uncertainty_report(err, np.sqrt(v)) for part, v in var.items() if np.any(v > 0)}
    if ood is not None:
        out["ood_auroc"] = {
            "energy_std": auroc(np.sqrt(g.energy_var["total"]), np.sqrt(ood.energy_var["total"])),
            "max_forces_std": auroc(g.max_forces_std, ood.max_forces_std),
        }
        if np.any(g.energy_var["epistemic"] > 0):
            out["ood_auroc"]["energy_std_epistemic"] = auroc(
                np.sqrt(g.energy_var["epistemic"]), np.sqrt(ood.energy_var["epistemic"])
            )
    return out


def fit_calibration(g: Gathered, current: Calibration | None = None) -> Calibration:
    """Variance scales minimising the NLL on ``g`` (which was gathered with ``current`` applied).

    Energy: s_E = mean(e²/σ²). Forces, with the full 3×3 covariance: s_F = mean(ΔFᵀΣ⁻¹ΔF)/3.
    The result multiplies the current factors (pass ``g`` gathered without any calibration to
    get absolute factors; ``ase-race calibrate`` does).
    """
    current = current or Calibration()
    s_e = float(np.mean((g.energy_ref - g.energy_pred) ** 2 / g.energy_var["total"]))
    s_f = float(np.mean(g.forces_mahalanobis) / 3.0)
    return Calibration(
        energy_var_scale=current.energy_var_scale * s_e,
        forces_var_scale=current.forces_var_scale * s_f,
        stress_var_scale=current.stress_var_scale,
    )


def isotonic_variance_map(variance, squared_error, max_points: int = 200) -> tuple:
    """A monotone map predicted variance → calibrated variance, (x, y) with x increasing.

    Isotonic (pool-adjacent-violators) regression of the squared errors on the predicted
    variances: y is the non-decreasing function closest to E[e² | σ²] in least squares. Its
    constant blocks are summarised by their mean σ² (x) and fitted value (y), thinned to at
    most ``max_points``.
    """
    order = np.argsort(variance, kind="stable")
    x, target = np.asarray(variance, dtype=np.float64)[order], np.asarray(squared_error, dtype=np.float64)[order]
    values, weights, sums_x = [], [], []
    for xi, yi in zip(x, target):  # pool adjacent violators
        values.append(yi), weights.append(1.0), sums_x.append(xi)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            sums_x[-2] += sums_x[-1]
            weights[-2] = w
            del values[-1], weights[-1], sums_x[-1]
    bx = np.array(sums_x) / np.array(weights)
    by = np.maximum(np.array(values), 1e-30)
    if bx.size > max_points:
        keep = np.unique(np.linspace(0, bx.size - 1, max_points).round().astype(int))
        bx, by = bx[keep], by[keep]
    return tuple(bx.tolist()), tuple(by.tolist())


def fit_isotonic(g: Gathered, current: Calibration) -> Calibration:
    """``current`` plus isotonic maps for energies and forces fitted on ``g``.

    ``g`` must have been gathered with ``current``'s scales and no isotonic maps applied.
    Forces: per atom, the mean diagonal variance against the mean squared component error.
    """
    energy_err2 = (g.energy_ref - g.energy_pred) ** 2
    f_err2 = ((g.forces_ref - g.forces_pred) ** 2).reshape(-1, 3).mean(axis=1)
    f_var = g.forces_var["total"].reshape(-1, 3).mean(axis=1)
    return Calibration(
        energy_var_scale=current.energy_var_scale, forces_var_scale=current.forces_var_scale,
        stress_var_scale=current.stress_var_scale,
        energy_isotonic=isotonic_variance_map(g.energy_var["total"], energy_err2),
        forces_isotonic=isotonic_variance_map(f_var, f_err2),
    )


def figures(g: Gathered, out_dir: Path, label: str = "") -> list[Path]:
    """Reliability diagram, |error| against σ (log–log, with |error| = σ) and parity plots."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = {
        "energy": (g.energy_ref, g.energy_pred, np.sqrt(g.energy_var["total"]), "eV"),
        "forces": (g.forces_ref, g.forces_pred, np.sqrt(g.forces_var["total"]), "eV/Å"),
    }
    paths = []
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.add_subplot()
    for name, (ref, pred, std, _) in sets.items():
        ax.plot(LEVELS, observed_coverage(ref - pred, std), "o-", ms=3, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    ax.set(xlabel="expected coverage", ylabel="observed coverage", title=f"reliability {label}".strip())
    ax.legend()
    paths.append(_save(fig, out_dir / "reliability.png"))
    for name, (ref, pred, std, unit) in sets.items():
        fig = Figure(figsize=(9, 4))
        a1, a2 = fig.subplots(1, 2)
        err = np.abs(ref - pred)
        a1.loglog(std, np.maximum(err, 1e-12), ".", ms=2, alpha=0.4)
        lo, hi = max(min(std.min(), err[err > 0].min(initial=std.min())), 1e-12), max(std.max(), err.max())
        a1.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="|error| = σ")
        a1.set(xlabel=f"predicted σ / {unit}", ylabel=f"|error| / {unit}", title=f"{name}: error vs σ")
        a1.legend()
        a2.plot(ref, pred, ".", ms=2, alpha=0.4)
        a2.plot([ref.min(), ref.max()], [ref.min(), ref.max()], "k--", lw=0.8)
        a2.set(xlabel=f"reference / {unit}", ylabel=f"predicted / {unit}", title=f"{name}: parity")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{name}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path
