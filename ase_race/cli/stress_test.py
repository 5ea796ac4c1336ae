"""``ase-race stress-test MODEL [--structure FILE] --reference pyscf|tblite|emt``: how the model's
uncertainty behaves on structures it was not trained on (a thin shell over :mod:`ase_race.stress`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .predict import add_device_options


def add_parser(sub) -> None:
    p = sub.add_parser("stress-test", help="score σ on pulled bonds, atom pairs, normal-mode scans and hot MD")
    p.add_argument("model", help="model file or shipped model name")
    p.add_argument("--structure", default="CH3CH2OH",
                   help="molecule: a file ase.io reads or an rMD17 .npz (its last frame), or a name ase.build.molecule knows")
    p.add_argument("--reference", choices=("pyscf", "tblite", "emt"), required=True,
                   help="labels: pyscf (PBE/def2-SVP, the rMD17 level; spin set per structure), tblite (GFN2-xTB), emt")
    p.add_argument("--in-distribution",
                   help="labelled frames like the training data (negatives for AUROC; any file ase.io reads, or an rMD17 .npz)")
    p.add_argument("--md-frames", type=int, default=20, help="frames of each MD run (default 20)")
    p.add_argument("--hot-temperature", type=float, default=1200.0, help="K of the hot MD (default 1200)")
    p.add_argument("--max-distance", type=float, default=6.0, help="Å a bond is pulled to (default 6)")
    p.add_argument("--driver", help="model that relaxes the molecule, runs the MD and gives the normal modes "
                   "(default MODEL; the same driver gives several models the same probes and labels; "
                   "it runs on --device in its own precision, whatever --dtype says)")
    p.add_argument("--no-relax", action="store_true", help="probe the structure as given (default: relax it with the driver first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="race_stress_test", help="folder for the table, JSON, PNG and label cache")
    add_device_options(p)
    p.set_defaults(run=run)


def reference_factory(name: str):
    """atoms → the reference calculators to try, in turn.

    PySCF: the lowest spin of the structure's electron count (restricted for a singlet), then,
    if that SCF does not converge (a bond pulled into two radicals), two more unpaired
    electrons (unrestricted): at dissociation the high-spin state is close to the
    broken-symmetry ground state, and it converges. The labels file records which one gave
    each label (``reference_attempt``).
    """
    from ..extras import EXTRAS, require

    if name in EXTRAS:
        require(name, f"--reference {name}")
    if name == "pyscf":
        from ..calculator.pyscf_ref import PySCFCalculator

        return lambda atoms: [PySCFCalculator(spin=int(atoms.numbers.sum()) % 2 + extra) for extra in (0, 2)]
    if name == "tblite":
        from tblite.ase import TBLite

        return lambda atoms: TBLite(method="GFN2-xTB", verbosity=0)
    from ase.calculators.emt import EMT

    return lambda atoms: EMT()


def run(args) -> int:
    from ase.build import molecule

    from ..calculator import RACECalculator
    from ..data import read_structures
    from ..stress import format_report, stress_test, write_report

    references = reference_factory(args.reference)  # a missing package stops here, before any work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if Path(args.structure).exists():
        structure = read_structures(args.structure, index=-1, labels=False)[0]
    else:
        structure = molecule(args.structure)
    in_distribution = read_structures(args.in_distribution) if args.in_distribution else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    calc = RACECalculator(args.model, device=args.device, dtype=args.dtype)
    # the driver keeps its own precision: several models tested with one driver see the same probes
    driver = RACECalculator(args.driver, device=args.device) if args.driver else None
    report, scored = stress_test(
        calc, structure, references, in_distribution=in_distribution,
        cache=out / f"labels_{args.reference}.extxyz", n_md=args.md_frames, hot_temperature=args.hot_temperature,
        max_distance=args.max_distance, seed=args.seed, driver=driver, relax_fmax=None if args.no_relax else 0.01,
    )
    print(format_report(report))
    paths = write_report(report, scored, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
