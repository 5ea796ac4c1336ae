"""Uncertainty quality of every posterior and loss on 3BPA (docs/evaluation.md has the metrics).

    OMP_NUM_THREADS=1 python benchmarks/uq_3bpa.py [--preset tiny] [--layers L] [--epochs 35]
        [--members 3] [--ivon-warm W] [--ivon-beta2 B] [--only ensemble:nll_jef,...] [--fit-only]
        [--out runs/uq_3bpa]

Train on 3BPA at 300 K (450 training / 50 validation frames of ``train_300K.xyz``, seeded
split) with MVE, a deep ensemble, SWAG, IVON, the all-weight Laplace and feature-space novelty
(the default posterior), each with the losses ``mse``, ``nll_e`` and ``nll_jef`` where the
pair makes sense (MVE and novelty need a variance head, so no ``mse``). Test on the
mixed-temperature file (300/600/1200 K MD) with the frames that also occur in the 300 K file
removed. The file does not say which trajectory a frame is from; each frame is given the
temperature whose equipartition distribution of the potential energy makes it most likely
(``_bpa.md_temperatures``).

Per row: force and energy MAE at each temperature; Gaussian NLL (per structure, per force
component); the Kuleshov calibration error over 21 levels before and after recalibration (a
variance scale per property fitted on the 50 validation frames by minimising their NLL,
then applied to the test set); Spearman ρ of |error| against σ; the AUROC of the energy std
and of ``max_forces_std`` for telling the hot (600 and 1200 K) test frames from the 300 K
ones; the fraction of hot-frame errors within 2σ, raw and recalibrated; the median time of one
calculator call on a 3BPA structure; and the training wall time.

Networks trained with ``mse`` have no trained variance head, so their rows use the
epistemic variance alone (all such a model can offer). Cost is shared where the methods
allow: the MVE row of a loss is member 0 of that loss's ensemble (the same seed and data,
so the same network a separate MVE run would give), and Laplace and novelty are fitted
around it. Every run resumes from its checkpoint if the script is interrupted, and rows
whose model file exists are not retrained (``--fit-only`` trains and stops, so several
processes can train disjoint rows). Writes ``results.json``, ``table.md`` and per-row
figures (reliability, |error| against σ, parity) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from ase_race.training import TrainConfig
from ase_race.data import KeyMap, read_frames
from ase_race.evaluation import Calibration, auroc, calibration_error, gaussian_nll, max_forces_std, spearman, variance_scale
from ase_race.calculator import RACECalculator
from ase_race.modelfile import atomic_write_text, load_model, save_model
from ase_race.posteriors import MVEPosterior
from ase_race.training.api import prepare, train
from ase_race.training.assess import figures, gather

from _bpa import DATA, md_temperatures, mixed_temperature_test_set

METHODS = ("mve", "ensemble", "swag", "ivon", "laplace", "novelty")
LOSSES = ("mse", "nll_e", "nll_jef")
KEYS = KeyMap(energy="energy", forces="forces")


def rows(only: str | None) -> list[tuple[str, str]]:
    pairs = [(m, l) for m in METHODS for l in LOSSES if not (m in ("mve", "novelty") and l == "mse")]
    if only:
        wanted = {tuple(x.split(":")) for x in only.split(",")}
        pairs = [p for p in pairs if p in wanted]
    return pairs


def base_config(args, loss: str, out: Path) -> TrainConfig:
    return TrainConfig(
        train_file=str(DATA / "train_300K.xyz"), e0s_file=str(DATA / "iso_atoms.xyz"), e0s="isolated",
        energy_key="energy", forces_key="forces", valid_fraction=50, preset=args.preset,
        model={"dtype": "float32", **({"num_layers": args.layers} if args.layers else {})},
        loss=loss, energy_weight=1.0, forces_weight=1.0,
        warmup_epochs=0 if loss == "mse" else args.warmup, batch_size=8, max_epochs=args.epochs, lr=0.01,
        clip_grad=10.0, plateau_patience=8, ensemble={"members": args.members}, seed=args.seed,
        output_dir=str(out), model_name="model", checkpoint_every=500,
    )


def fit(method: str, loss: str, args, root: Path) -> tuple[Path, float]:
    """Train (or reuse) the model file of one row. Returns (path, training wall seconds)."""
    out = root / f"{method}_{loss}"
    path = out / "model.pt"
    if path.exists():
        meta = load_model(path).metadata.get("training", {})
        return path, float(meta.get("wall_time_s", 0.0))
    start = time.perf_counter()
    if method == "mve":  # member 0 of this loss's ensemble (same seed, same split)
        ens_path, _ = fit("ensemble", loss, args, root)
        ens = load_model(ens_path)
        member = ens.posterior.members[0]
        wall = _member_wall(root / f"ensemble_{loss}" / "member_00")
        out.mkdir(parents=True, exist_ok=True)
        save_model(path, MVEPosterior(member), metadata={"training": {"from": str(ens_path), "wall_time_s": wall}})
        return path, wall
    config = base_config(args, loss, out).replace(method=method)
    if method == "ivon":  # AMSGrad first, then IVON from its best weights (docs/posteriors/ivon.md)
        config = config.replace(ivon={"warm_start": args.ivon_warm, "beta2": args.ivon_beta2})
    if method == "swag":
        config = config.replace(
            max_epochs=args.epochs + args.swag_epochs, swag={"start_epoch": args.epochs, "rank": 20, "lr": 0.002},
        )
    if method in ("laplace", "novelty"):  # around the single network of this loss
        base_path, wall = fit("mve", loss, args, root)
        config = config.replace(**{method: {"base_model": str(base_path)}})
        start = time.perf_counter() - wall
    path = train(config)
    return path, time.perf_counter() - start


def _member_wall(member_dir: Path) -> float:
    import csv

    with open(member_dir / "metrics.csv") as fh:
        rows_ = list(csv.DictReader(fh))
    return float(rows_[-1].get("elapsed_s", 0.0) or 0.0) if rows_ else 0.0


def evaluate(path: Path, loss: str, valid_frames, test, temps: np.ndarray, figure_dir: Path) -> dict:
    """One row. ``temps``: (F,) the MD temperature of each test frame (K)."""
    bundle = load_model(path)
    bundle.calibration = Calibration()
    v, t = gather(bundle, valid_frames), gather(bundle, test)
    part = "epistemic" if loss == "mse" else "total"
    temps_of = {"energy": temps, "forces": np.repeat(temps, 3 * t.n_atoms)}  # (F,) and (3n,) per component
    hot = temps > 300.0
    row: dict = {"variance": part, "mae_by_T": {}}
    for name, gv, gt in (("energy", v.energy_var, t.energy_var), ("forces", v.forces_var, t.forces_var)):
        ref_v, pred_v = (v.energy_ref, v.energy_pred) if name == "energy" else (v.forces_ref, v.forces_pred)
        ref_t, pred_t = (t.energy_ref, t.energy_pred) if name == "energy" else (t.forces_ref, t.forces_pred)
        floor = 1e-12
        std_v, std_t = np.sqrt(gv[part] + floor), np.sqrt(gt[part] + floor)
        err_v, err_t = ref_v - pred_v, ref_t - pred_t
        scale = variance_scale(err_v, std_v)
        by_t = temps_of[name]
        mask = by_t > 300.0
        row["mae_by_T"][name] = {str(int(k)): float(np.mean(np.abs(err_t[by_t == k]))) for k in np.unique(temps)}
        row[name] = {
            "mae": float(np.mean(np.abs(err_t))), "rmse": float(np.sqrt(np.mean(err_t**2))),
            "nll": gaussian_nll(err_t, std_t), "nll_recal": gaussian_nll(err_t, std_t * np.sqrt(scale)),
            "cal_err": calibration_error(err_t, std_t), "cal_err_recal": calibration_error(err_t, std_t * np.sqrt(scale)),
            "scale": scale, "spearman": spearman(np.abs(err_t), std_t),
            "cover2_hot": float(np.mean(np.abs(err_t[mask]) <= 2 * std_t[mask])),
            "cover2_hot_recal": float(np.mean(np.abs(err_t[mask]) <= 2 * std_t[mask] * np.sqrt(scale))),
        }
    e_t = np.sqrt(t.energy_var[part])
    f_t = t.max_forces_std if part == "total" else _max_atom_std(t, part)
    # Hot (600/1200 K) test frames against the 300 K test frames: both unseen, one shifted.
    row["auroc"] = {"energy_std": auroc(e_t[~hot], e_t[hot]), "max_forces_std": auroc(f_t[~hot], f_t[hot])}
    row["call_ms"] = _call_ms(bundle, test)
    figures(t, figure_dir, label=f"{path.parent.name} on mixed-T")
    return row


def _call_ms(bundle, frames, n: int = 12) -> float:
    """Median wall time (ms) of one calculator call (energy, forces and their variances) on
    a 3BPA structure, after two warm-up calls."""
    calc = RACECalculator(bundle, device="cpu")
    times = []
    for k in range(n + 2):
        atoms = frames[k % len(frames)].atoms.copy()
        atoms.calc = calc
        start = time.perf_counter()
        atoms.get_potential_energy(), atoms.get_forces()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[2:]))


def _max_atom_std(g, part: str) -> np.ndarray:
    cov = torch.diag_embed(torch.from_numpy(g.forces_var[part].reshape(-1, 3)))  # the diagonal holds the trace
    n_atoms = torch.from_numpy(g.n_atoms)
    return max_forces_std(cov, torch.repeat_interleave(torch.arange(len(n_atoms)), n_atoms), len(n_atoms)).numpy()


def table(results: dict) -> str:
    head = ("| method | loss | σ² | F MAE 300/600/1200 K (meV/Å) | E MAE 300/600/1200 K (meV) | NLL E / F "
            "| cal.err E raw → recal. | cal.err F raw → recal. | ρ E / F | AUROC hot σ_E / max σ_F "
            "| 2σ cover hot E raw / recal. | 2σ cover hot F raw / recal. | call (ms) | train (CPU-min) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in results.items():
        method, loss = key.split(":")
        e, f = r["energy"], r["forces"]
        by = lambda name: " / ".join(f"{1e3 * r['mae_by_T'][name][k]:.0f}" for k in ("300", "600", "1200"))  # noqa: E731
        lines.append(
            f"| {method} | {loss} | {r['variance'][:5]}. | {by('forces')} | {by('energy')} | "
            f"{e['nll']:.2f} / {f['nll']:.2f} | {e['cal_err']:.3f} → {e['cal_err_recal']:.3f} | "
            f"{f['cal_err']:.3f} → {f['cal_err_recal']:.3f} | {e['spearman']:.2f} / {f['spearman']:.2f} | "
            f"{r['auroc']['energy_std']:.2f} / {r['auroc']['max_forces_std']:.2f} | "
            f"{e['cover2_hot']:.2f} / {e['cover2_hot_recal']:.2f} | {f['cover2_hot']:.2f} / {f['cover2_hot_recal']:.2f} | "
            f"{r['call_ms']:.0f} | {r['train_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=0, help="interaction layers (0: the preset's)")
    p.add_argument("--epochs", type=int, default=35)
    p.add_argument("--warmup", type=int, default=10, help="mean-only epochs before an NLL switches on")
    p.add_argument("--swag-epochs", type=int, default=15, help="SWAG: extra epochs collecting snapshots")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--ivon-warm", type=float, default=0.75,
                   help="IVON: AMSGrad epochs before IVON (a count, or a fraction of --epochs below 1)")
    p.add_argument("--ivon-beta2", type=float, default=0.999, help="IVON: Hessian averaging β₂")
    p.add_argument("--fit-only", action="store_true", help="train the rows' model files, evaluate nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated method:loss pairs")
    p.add_argument("--out", default="runs/uq_3bpa")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    test = read_frames(mixed_temperature_test_set(root), keys=KEYS)
    e300 = [f.energy for f in read_frames(DATA / "train_300K.xyz", keys=KEYS)]
    temps = md_temperatures([f.energy for f in test], e300)
    print("test frames by MD temperature (from their energies): "
          + ", ".join(f"{int(k)} K {int(np.sum(temps == k))}" for k in np.unique(temps)))
    # The validation frames are the ones the training split held out (same seed, same rule).
    _, _, valid_frames = prepare(base_config(args, "nll_jef", root))
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for method, loss in rows(args.only):
        key = f"{method}:{loss}"
        path, wall = fit(method, loss, args, root)
        if args.fit_only:
            continue
        row = evaluate(path, loss, valid_frames, test, temps, root / f"{method}_{loss}" / "figures")
        row["train_s"] = wall
        # Merge with what is on disk: several processes may work on disjoint rows (--only).
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        results[key] = row
        atomic_write_text(results_path, json.dumps(results, indent=2))
        print(f"{key}: E/F MAE {1e3 * row['energy']['mae']:.1f} meV / {1e3 * row['forces']['mae']:.1f} meV/Å, "
              f"cal.err F {row['forces']['cal_err']:.3f} → {row['forces']['cal_err_recal']:.3f}, "
              f"AUROC {row['auroc']['energy_std']:.2f} / {row['auroc']['max_forces_std']:.2f}", flush=True)
    ordered = {f"{m}:{l}": results[f"{m}:{l}"] for m, l in rows(None) if f"{m}:{l}" in results}
    text = table(ordered)
    (root / "table.md").write_text(text + "\n")
    print(f"\n3BPA, preset {args.preset}, {args.epochs} epochs, {args.members} ensemble members; test = mixed-T "
          f"minus shared frames ({len(test)}), ID = the 50 validation frames\n")
    print(text)


if __name__ == "__main__":
    main()
