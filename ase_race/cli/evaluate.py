"""``ase-race evaluate MODEL DATA [--ood DATA2]``: accuracy and uncertainty quality.

``ase-race calibrate MODEL VALID_DATA [--isotonic]``: fit the variance calibration and store it
in the model file. Thin shells over :mod:`ase_race.training.assess` (docs/evaluation.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .predict import add_device_options, resolve_device

PART_NAMES = {"total": "total", "aleatoric": "aleat.", "epistemic": "epist."}
#: labels within this of the predictions (eV per atom, eV/Å per component) on every structure
#: are taken for copies of them: no trained model comes that close to real labels, while its own
#: predictions, written to extxyz (arrays to 8 decimals) and recomputed in float32 or on another
#: device, stay within it
SAME_AS_PREDICTION = 1e-5


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, NLL, calibration, ENCE, Spearman, OOD AUROC, figures")
    p.add_argument("model", help="model file or shipped model name")
    p.add_argument("data", help="labelled structures (any file ase.io reads, or an rMD17 .npz)")
    p.add_argument("--ood", help="a second labelled set, out of distribution: AUROC of σ")
    p.add_argument("-o", "--output", default="race_evaluation", help="folder for metrics.json and PNGs")
    p.add_argument("--energy-key", default="REF_energy", help="info key of the reference energies")
    p.add_argument("--forces-key", default="REF_forces", help="arrays key of the reference forces")
    p.add_argument("--uncalibrated", action="store_true", help="ignore the calibration stored in the file")
    add_device_options(p)
    p.set_defaults(run=run_evaluate)

    c = sub.add_parser("calibrate", help="fit energy and force variance scales on validation data")
    c.add_argument("model", help="model file or shipped model name")
    c.add_argument("data", help="labelled validation structures (any file ase.io reads, or an rMD17 .npz)")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", help="write the calibrated model here")
    where.add_argument("--in-place", action="store_true",
                       help="rewrite MODEL itself (not allowed for a shipped model found by name)")
    c.add_argument("--isotonic", action="store_true",
                   help="also fit a monotone (isotonic) map of the variances on top of the scales")
    c.add_argument("--energy-key", default="REF_energy", help="info key of the reference energies")
    c.add_argument("--forces-key", default="REF_forces", help="arrays key of the reference forces")
    add_device_options(c, dtype=False)
    c.set_defaults(run=run_calibrate)


def _frames(path, args):
    from ..data import KeyMap, read_frames

    keys = KeyMap(energy=args.energy_key, forces=args.forces_key)
    return [f for f in read_frames(path, keys=keys) if not f.is_isolated_atom]


def labels_equal_predictions(data) -> list[str]:
    """Which labels (``energy``, ``forces``) of a gathered set equal the model's predictions on
    every structure to within :data:`SAME_AS_PREDICTION`: a file of predictions, not labels."""
    import numpy as np

    same = []
    if len(data.energy_ref) and np.all(np.abs(data.energy_ref - data.energy_pred) <= SAME_AS_PREDICTION * data.n_atoms):
        same.append("energy")
    if len(data.forces_ref) and np.all(np.abs(data.forces_ref - data.forces_pred) <= SAME_AS_PREDICTION):
        same.append("forces")
    return same


def _copies_message(same: list[str], path) -> str:
    return (
        f"the {' and '.join(same)} labels of {path} equal this model's predictions (to {SAME_AS_PREDICTION:g} "
        f"eV/atom, eV/Å). Is {path} the output of a run that wrote its predictions as the labels (earlier "
        "versions of ase-race predict did)? Use the reference-labelled file; ase-race predict now keeps the "
        "labels and writes its predictions under race_*"
    )


def warn_if_labels_are_predictions(data, path) -> None:
    """``evaluate``: a warning on stderr; the scores are printed all the same."""
    same = labels_equal_predictions(data)
    if same:
        print(f"ase-race evaluate: warning: {_copies_message(same, path)}; the errors below measure nothing.",
              file=sys.stderr)


def _load(args):
    """The model on ``--device`` (default cuda if available) in ``--dtype`` (default the model's)."""
    from ..modelfile import load_model
    from ..nn.model import TORCH_DTYPES

    dtype = getattr(args, "dtype", None)
    return load_model(args.model, device=resolve_device(args.device), dtype=TORCH_DTYPES[dtype] if dtype else None)


def _table(metrics: dict) -> str:
    lines = [f"{'':14} {'part':>7} {'MAE':>10} {'RMSE':>10} {'RMS σ':>10} {'NLL':>8} {'cal.err':>8} "
             f"{'mis.area':>8} {'ENCE':>7} {'ρ':>6}"]
    for name, unit, scale in (("energy", "meV", 1000.0), ("forces", "meV/Å", 1000.0)):
        for part, m in metrics[name].items():
            lines.append(
                f"{name + ' (' + unit + ')':14} {PART_NAMES[part]:>7} {scale * m['mae']:10.2f} {scale * m['rmse']:10.2f} "
                f"{scale * m['rms_std']:10.2f} {m['nll']:8.3f} {m['calibration_error']:8.4f} "
                f"{m['miscalibration_area']:8.4f} {m['ence']:7.3f} {m['spearman']:6.3f}"
            )
    return "\n".join(lines)


def run_evaluate(args) -> int:
    from .._atomic import atomic_write_text
    from ..evaluation import Calibration
    from ..training.assess import assess, figures, gather

    bundle = _load(args)
    if args.uncalibrated:
        bundle.calibration = Calibration()
    frames = _frames(args.data, args)
    data = gather(bundle, frames)
    warn_if_labels_are_predictions(data, args.data)
    ood = gather(bundle, _frames(args.ood, args)) if args.ood else None
    if ood is not None:
        warn_if_labels_are_predictions(ood, args.ood)
    metrics = assess(data, ood)
    metrics["calibration"] = bundle.calibration.to_dict()
    calibrated = not bundle.calibration.is_identity
    print(f"{args.model} on {args.data}: {metrics['n_structures']} structures, {metrics['n_atoms']} atoms; "
          f"NLL per structure (energy) and per component (forces), nats")
    if calibrated:  # before and after: the raw variances, then as the calculator reports them
        raw = bundle.calibration
        bundle.calibration = Calibration()
        metrics["uncalibrated"] = {k: v for k, v in assess(gather(bundle, frames)).items() if k in ("energy", "forces")}
        bundle.calibration = raw
        print("before calibration (the networks' variances):")
        print(_table(metrics["uncalibrated"]))
        print("after calibration (stored in the model file; what the calculator reports):")
    print(_table(metrics))
    if ood is not None:
        print("OOD AUROC (" + args.ood + "): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["ood_auroc"].items()))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    paths = figures(data, out, label=Path(args.data).name)
    print(f"wrote {out / 'metrics.json'} and " + ", ".join(p.name for p in paths))
    return 0


def run_calibrate(args) -> int:
    import dataclasses

    from ..modelfile import resolve_model_path, save_model
    from ..training.assess import assess, calibrate, gather

    from ..errors import ConfigError, DataError
    from ..modelfile import SHIPPED_MODELS_DIRS

    if args.in_place and resolve_model_path(args.model).resolve().parent in {d.resolve() for d in SHIPPED_MODELS_DIRS}:
        raise ConfigError(f"{args.model} is a shipped model: write the calibrated copy elsewhere with -o OUT")
    bundle = _load(args)
    frames = _frames(args.data, args)
    data = gather(bundle, frames)
    same = labels_equal_predictions(data)
    if same:  # the fitted scale would be ~0: a model certain of everything
        raise DataError(f"cannot calibrate: {_copies_message(same, args.data)}")
    before = assess(data)
    # Refitted from the raw variances, so that calibrating twice gives the same file.
    bundle = dataclasses.replace(bundle, calibration=calibrate(bundle, frames, isotonic=args.isotonic))
    after = assess(gather(bundle, frames))
    target = Path(args.output) if args.output else resolve_model_path(args.model)
    metadata = {**bundle.metadata, "calibration_data": str(args.data)}
    save_model(target, bundle.posterior, calibration=bundle.calibration, metadata=metadata)
    for name in ("energy", "forces"):
        b, a = before[name]["total"], after[name]["total"]
        print(f"{name}: NLL {b['nll']:.3f} → {a['nll']:.3f}, miscalibration area {b['miscalibration_area']:.4f} → "
              f"{a['miscalibration_area']:.4f}, ENCE {b['ence']:.3f} → {a['ence']:.3f}")
    cal = bundle.calibration
    isotonic = ", isotonic maps" if cal.energy_isotonic is not None else ""
    print(f"calibration: energy ×{cal.energy_var_scale:.4g}, forces ×{cal.forces_var_scale:.4g}{isotonic}; written to {target}")
    return 0
