"""Evaluate a model on labelled data, and fit its variance calibration there.

:func:`gather` runs the posterior over a data set once and keeps errors and variances (total,
aleatoric, epistemic) per structure (energy) and per force component, calibrated as the
calculator reports them; :func:`assess` turns them into the metrics of
:mod:`ase_race.evaluation`; :func:`calibrate` fits a :class:`~ase_race.evaluation.Calibration`
on a data set (what ``ase-race calibrate``, ``ase-race ship`` and the fallback's retraining
store); :func:`figures` draws the pictures. docs/evaluation.md shows the commands.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _keys as K
from ..data import Frame
from ..evaluation import LEVELS, apply_calibration, auroc, fit_calibration, max_forces_std, observed_coverage, uncertainty_report
from ..evaluation.calibration import Calibration
from ..evaluation.gaussian import mahalanobis
from ..modelfile import ModelBundle
from .batches import GraphDataset

PARTS = ("total", "aleatoric", "epistemic")


@dataclass
class Gathered:
    """Predictions on one set of N structures with n atoms. Energies per structure; forces per
    component (3n,) in atom-major order (atom i's x, y, z at 3i, 3i+1, 3i+2)."""

    energy_ref: np.ndarray  # (N,) eV
    energy_pred: np.ndarray  # (N,) eV
    energy_var: dict[str, np.ndarray]  # part → (N,) eV²
    forces_ref: np.ndarray  # (3n,) eV/Å
    forces_pred: np.ndarray  # (3n,) eV/Å
    forces_var: dict[str, np.ndarray]  # part → (3n,) (eV/Å)², the diagonals of the covariances
    forces_cov: np.ndarray  # (n, 3, 3) (eV/Å)², the total covariance of each atom
    forces_mahalanobis: np.ndarray  # (n,) ΔFᵀ Σ⁻¹ ΔF with the total covariance
    max_forces_std: np.ndarray  # (N,) eV/Å, as the calculator reports it
    n_atoms: np.ndarray  # (N,)


def _device(posterior) -> torch.device:
    return next(posterior.networks()[0].parameters()).device


def gather(bundle: ModelBundle, frames: list[Frame], batch_size: int = 8, device=None) -> Gathered:
    """Predict every frame (labels ``energy`` and ``forces`` required), with the bundle's
    calibration applied by :func:`~ase_race.evaluation.apply_calibration` (so in float64).

    ``device``: where the batches go (default: where the posterior's weights are).
    """
    post = bundle.posterior
    device = _device(post) if device is None else device
    data = GraphDataset(frames, post.config.species, post.config.r_max, post.dtype)
    acc: dict[str, list] = {k: [] for k in ("er", "ep", "fr", "fp", "cov", "maha", "maxstd", "n")}
    e_var = {p: [] for p in PARTS}
    f_var = {p: [] for p in PARTS}
    for batch in data.batches(batch_size, device):
        pred = apply_calibration(post.predict(batch.graph), bundle.calibration)
        ale_e, epi_e = pred.energy_var_aleatoric, pred.energy_var_epistemic
        ale_f, epi_f = pred.forces_cov_aleatoric, pred.forces_cov_epistemic
        cov = ale_f + epi_f
        delta = batch.ref["forces"].double() - pred.forces.double()
        diag = lambda c: torch.diagonal(c, dim1=1, dim2=2).reshape(-1)  # noqa: E731
        graph_of_atom = batch.graph[K.BATCH]
        n_graphs = pred.energy.shape[0]
        acc["er"].append(batch.ref["energy"].double()), acc["ep"].append(pred.energy.double())
        acc["fr"].append(batch.ref["forces"].double().reshape(-1)), acc["fp"].append(pred.forces.double().reshape(-1))
        acc["cov"].append(cov), acc["maha"].append(mahalanobis(delta, cov))
        acc["maxstd"].append(max_forces_std(cov, graph_of_atom, n_graphs))
        acc["n"].append(torch.bincount(graph_of_atom, minlength=n_graphs))
        for part, (ve, vf) in {"total": (ale_e + epi_e, cov), "aleatoric": (ale_e, ale_f), "epistemic": (epi_e, epi_f)}.items():
            e_var[part].append(ve)
            f_var[part].append(diag(vf))
    cat = lambda xs: torch.cat(xs).cpu().numpy()  # noqa: E731
    return Gathered(
        energy_ref=cat(acc["er"]), energy_pred=cat(acc["ep"]),
        energy_var={p: cat(v) for p, v in e_var.items()},
        forces_ref=cat(acc["fr"]), forces_pred=cat(acc["fp"]),
        forces_var={p: cat(v) for p, v in f_var.items()}, forces_cov=cat(acc["cov"]),
        forces_mahalanobis=cat(acc["maha"]), max_forces_std=cat(acc["maxstd"]), n_atoms=cat(acc["n"]),
    )


def calibrate(bundle: ModelBundle, frames: list[Frame], isotonic: bool = False, keep_stress: bool = True) -> Calibration:
    """The calibration of ``bundle``'s posterior fitted on ``frames`` (its own calibration ignored).

    The NLL-optimal scales (and, with ``isotonic``, the isotonic maps) of
    :func:`~ase_race.evaluation.fit_calibration`, from the posterior's uncalibrated predictive
    on ``frames`` (labelled, held out from training). Isolated-atom frames (E0 references,
    without forces) are left out. The stress scale, which molecules cannot fit, is the bundle's
    with ``keep_stress``, else 1. Fitting twice on the same frames gives the same calibration.
    """
    frames = [f for f in frames if not f.is_isolated_atom]
    if not frames:
        raise ValueError("calibrate needs labelled structures with forces; got none (isolated atoms are left out)")
    g = gather(dataclasses.replace(bundle, calibration=Calibration()), frames)
    return fit_calibration(
        g.energy_ref - g.energy_pred, g.energy_var["total"],
        (g.forces_ref - g.forces_pred).reshape(-1, 3), g.forces_cov,
        isotonic=isotonic, stress_var_scale=bundle.calibration.stress_var_scale if keep_stress else 1.0,
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


def figures(g: Gathered, out_dir: Path, label: str = "") -> list[Path]:
    """Reliability diagram, |error| against σ (log–log, with |error| = σ) and parity plots."""
    from matplotlib.figure import Figure

    from ..evaluation.plotting import plain_ticks

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
        plain_ticks(a1, a2)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{name}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path
