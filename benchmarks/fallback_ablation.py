"""Which part of the fallback's retraining keeps the ensemble's spread down: one fine-tune of the
shipped ensemble on the 40 frames a fallback_demo.py run collected, with its ingredients added
one at a time.

    OMP_NUM_THREADS=1 python benchmarks/fallback_ablation.py [--run runs/fallback_demo] [--data ../shared/data]

Reads the demo's ``collected_retrain.extxyz`` (training frames), ``collected_baseline.extxyz``
(the control run's PySCF frames: unseen) and ``control_trajectory.extxyz``. Each row fine-tunes
all ten members for 10 epochs at lr 1e-3 (joint NLL) and reports, with the calibration the row
uses: the share of control-trajectory steps above the demo's threshold and their median
``max_forces_std``, the median ``max_forces_std`` on 100 rMD17 test structures, and force MAEs
on the unseen PySCF frames and on those rMD17 structures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase.io import read

from ase_race.calculator import RACECalculator
from ase_race.data.readers import frame_from_atoms, read_frames, split_frames
from ase_race.data.rmd17 import convert
from ase_race.modelfile import ModelBundle, load_model
from ase_race.training.assess import calibrate
from ase_race.training.finetune import fine_tune

HERE = Path(__file__).resolve().parent

ROWS = [  # name, rehearsed structures, EMA decay, refit calibration
    ("new frames only (no rehearsal, raw iterates)", 0, 0.0, False),
    ("+ rehearse 80 training structures", 80, 0.0, False),
    ("+ EMA weights (0.99)", 80, 0.99, False),
    ("+ calibration refitted on validation", 80, 0.99, True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/fallback_demo"))
    p.add_argument("--model", default="ethanol-ensemble")
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = p.parse_args()

    paths = convert(args.data / "rmd17_ethanol", Path("data/rmd17_ethanol"))
    train, valid = split_frames(read_frames(paths["train"]), 50, 1)
    test = read(paths["test"], ":100")
    new = [frame_from_atoms(a) for a in read(args.run / "collected_retrain.extxyz", ":")]
    unseen = read(args.run / "collected_baseline.extxyz", ":")
    trajectory = read(args.run / "control_trajectory.extxyz", "::4")
    shipped = load_model(args.model)

    def measure(bundle: ModelBundle) -> list[float]:
        calc = RACECalculator(bundle)

        def stds(frames):
            out = []
            for a in frames:
                a = a.copy()
                a.calc = calc
                a.get_potential_energy()
                out.append(calc.results["max_forces_std"])
            return np.array(out)

        def force_mae(frames, key):
            errors = []
            for f in frames:
                a = f.copy()
                a.calc = calc
                errors.append(np.abs(a.get_forces() - f.arrays[key]).mean())
            return float(np.mean(errors))

        hot = stds(trajectory)
        return [100 * np.mean(hot > args.threshold), np.median(hot), np.median(stds(test)),
                1000 * force_mae(unseen, "REF_forces"), 1000 * force_mae(test, "REF_forces")]

    print(f"{args.model} fine-tuned once on {len(new)} frames of {args.run}; control trajectory: {len(trajectory)} frames")
    header = ("model", "hot: % above", "hot: median σF", "rMD17: median σF", "unseen PySCF F MAE", "rMD17 F MAE", "fine-tune s")
    print(" | ".join(header))
    print(" | ".join(["shipped", *(f"{v:.3f}" if k in (1, 2) else f"{v:.1f}" for k, v in enumerate(measure(shipped))), "–"]))
    for name, n_replay, ema, recalibrate in ROWS:
        start = time.perf_counter()
        posterior = fine_tune(shipped.posterior, new, epochs=10, lr=1e-3, seed=1000, replay=train,
                              replay_size=n_replay, ema_decay=ema)
        calibration = shipped.calibration
        if recalibrate:
            calibration = calibrate(ModelBundle(posterior), valid)
        wall = time.perf_counter() - start
        values = measure(ModelBundle(posterior, calibration))
        print(" | ".join([name, *(f"{v:.3f}" if k in (1, 2) else f"{v:.1f}" for k, v in enumerate(values)), f"{wall:.0f}"]),
              flush=True)


if __name__ == "__main__":
    main()
