"""The ethanol off-distribution suite: build and label it (PySCF, the rMD17 level), then score models.

    python benchmarks/ood_suite.py label [--part test|calibration|both]
    python benchmarks/ood_suite.py score MODEL [MODEL ...] [--part test] [--json out.json] [--out DIR]

Two disjoint parts, both driven by ``ethanol-mve`` (so that every model meets the same
structures and one set of labels serves them all):

* ``test``: the default probes of :func:`ase_race.stress.build_probes` around ethanol
  (``ase.build.molecule``) relaxed by the driver; hot MD at 1200 K;
* ``calibration``: the probes of ``split="calibration"`` (other stretch lengths, pair
  distances, normal-mode amplitudes and small molecules) around rMD17 ``train_01`` frame 0
  as it is (a thermal geometry), hot MD at 1500 K with another seed.

The labelled structures are written to ``tests/data/ood_ethanol/{test,calibration}.extxyz``
(each labelled probe is stored as soon as it is computed: a killed run resumes). ``score``
reads them and the in-distribution negatives: the 1000 rMD17 ``test_01`` frames for the test part,
the 50 validation frames of the shipped recipe's split for the calibration part.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ase.build import molecule

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "rmd17_ethanol"
SUITE = ROOT / "tests" / "data" / "ood_ethanol"
DRIVER = "ethanol-mve"


def base_molecule(part: str, driver):
    from ase.optimize import BFGS

    from ase_race.data.rmd17 import read_rmd17_atoms

    if part == "calibration":
        atoms = read_rmd17_atoms(DATA / "rmd17_ethanol_train_01.npz", 0)[0]
        atoms.info.clear()
        atoms.arrays.pop("REF_forces", None)
        return atoms
    atoms = molecule("CH3CH2OH")
    atoms.calc = driver
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=500)
    atoms.calc = None
    return atoms


def label_part(part: str) -> None:
    from ase_race.calculator import RACECalculator
    from ase_race.cli.stress_test import reference_factory
    from ase_race.stress import build_probes, label

    driver = RACECalculator(DRIVER)
    mol = base_molecule(part, driver)
    options = dict(hot_temperature=1200.0, seed=0) if part == "test" else dict(hot_temperature=1500.0, seed=10)
    probes = build_probes(mol, driver, with_md=False, split=part, **options)
    print(f"{part}: {len(probes)} probes", flush=True)
    SUITE.mkdir(parents=True, exist_ok=True)
    label(probes, reference_factory("pyscf"), SUITE / f"{part}.extxyz")


def negatives(part: str):
    from ase_race.data.rmd17 import read_rmd17_atoms

    if part == "test":
        return read_rmd17_atoms(DATA / "rmd17_ethanol_test_01.npz")
    from ase_race.training import TrainConfig, prepare

    config = TrainConfig.from_yaml(ROOT / "recipes" / "rmd17_ethanol.yaml")
    atoms = read_rmd17_atoms(DATA / "rmd17_ethanol_train_01.npz")
    _, _, valid = prepare(config, atoms, None)
    return [labelled_atoms(f) for f in valid]


def labelled_atoms(frame):
    """A training frame as Atoms carrying its reference energy and forces."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = frame.atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces)
    return atoms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("label")
    lab.add_argument("--part", choices=("test", "calibration", "both"), default="both")
    sc = sub.add_parser("score")
    sc.add_argument("models", nargs="+")
    sc.add_argument("--part", choices=("test", "calibration"), default="test")
    sc.add_argument("--json")
    sc.add_argument("--out", help="also write each model's report and figure (ase_race.stress.write_report) "
                                   "to OUT/<model name>/")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.command == "label":
        for part in (("test", "calibration") if args.part == "both" else (args.part,)):
            label_part(part)
        return
    from ase_race.calculator import RACECalculator
    from ase_race.stress import format_report, read_labelled, score_model, write_report

    suite = read_labelled(SUITE / f"{args.part}.extxyz")
    frames = negatives(args.part)
    # the molecule whose atom order the probes have: its bonds decide what is in range
    mol = base_molecule(args.part, None) if args.part == "calibration" else molecule("CH3CH2OH")
    reports = {}
    for name in args.models:
        report, scored = score_model(RACECalculator(name), suite, frames, mol)
        reports[name] = report
        if args.out:
            write_report(report, scored, Path(args.out) / Path(name).stem)
        print(f"## {name} ({args.part} part: {len(suite)} probes, {len(frames)} in-distribution frames)")
        print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
