"""The fallback through a bond-breaking event: does it call the reference before the error is large?

    python benchmarks/fallback_bond_breaking.py [--model ethanol-novelty] [--bond H–O]
        [--threshold 0.5] [--quantity max_forces_std] [--step 0.05] [--to 3.0] [--labels FILE]

Ethanol, relaxed with the model, has one bond pulled apart in steps of ``--step`` Å, the
smaller fragment moved rigidly (:func:`ase_race.stress.bond_scans`), from its
equilibrium length to ``--to`` Å. Every geometry goes through a
:class:`~ase_race.calculator.FallbackCalculator` with the given threshold (the ``ase-race md
--fallback`` default: ``max_forces_std`` > 0.5 eV/Å). Every geometry is also labelled with
PySCF PBE/def2-SVP (the rMD17 level; cached in ``--labels``, so a rerun costs nothing), and the
fallback's reference answers from those labels, so the table shows at each step the model's
own energy error, its σ_E and ``max_forces_std``, and whether the reference was called.
Prints the first bond length at which the reference is called and the model's error there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.optimize import BFGS

from ase_race.calculator import FallbackCalculator, RACECalculator
from ase_race.cli.stress_test import reference_factory
from ase_race.stress import bond_scans, label

ROOT = Path(__file__).resolve().parent.parent


class Labels(Calculator):
    """The reference, answering from labels computed beforehand (matched by positions)."""

    implemented_properties = ("energy", "free_energy", "forces")

    def __init__(self, scored, **kwargs):
        super().__init__(**kwargs)
        self.scored = scored

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        for s in self.scored:
            if np.allclose(s.probe.atoms.positions, atoms.positions, atol=1e-8):
                self.results = {"energy": s.energy_ref, "free_energy": s.energy_ref, "forces": s.forces_ref.copy()}
                return
        raise RuntimeError("no reference label for this geometry")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ethanol-novelty")
    parser.add_argument("--bond", default="H–O", help="the element pair of the bond, as ase_race.stress.bond_scans names it "
                                                  "(H–O, C–H, C–C, C–O)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--quantity", default="max_forces_std", choices=("max_forces_std", "energy_std"))
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--to", type=float, default=3.0)
    parser.add_argument("--labels", type=Path, default=ROOT / "runs" / "fallback_bond_breaking" / "labels.extxyz")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)

    model = RACECalculator(args.model)
    atoms = molecule("CH3CH2OH")
    atoms.calc = model
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=500)
    atoms.calc = None
    r0 = min(p.coordinate for p in bond_scans(atoms, n_stretch=2, compress=(1.0,)) if p.scan.startswith(args.bond))
    n = int(round((args.to - r0) / args.step)) + 1
    probes = [p for p in bond_scans(atoms, max_distance=args.to, n_stretch=n, compress=(), first_stretch=1.0)
              if p.scan.startswith(args.bond + " ")]
    if not probes:
        parser.error(f"ethanol has no {args.bond} bond")
    args.labels.parent.mkdir(parents=True, exist_ok=True)
    scored = label(probes, reference_factory("pyscf"), args.labels)
    fallback = FallbackCalculator(model, Labels(scored), threshold=args.threshold, quantity=args.quantity)
    print(f"{args.model}: {probes[0].scan} pulled from {r0:.2f} to {args.to:.2f} Å; reference when "
          f"{args.quantity} > {args.threshold}")
    print(f"{'r/Å':>6} {'|E err|/eV':>10} {'σ_E/eV':>8} {'maxFσ':>8} {'reference':>9}")
    first, worst_before = None, 0.0
    for s in scored:
        work = s.probe.atoms.copy()
        work.calc = fallback
        work.get_potential_energy()
        used = bool(fallback.results["fallback_used"])
        error = abs(s.energy_ref - fallback.model.results["energy"])
        print(f"{s.probe.coordinate:6.2f} {error:10.3f} {fallback.results['energy_std']:8.3f} "
              f"{fallback.results['max_forces_std']:8.3f} {'yes' if used else '':>9}")
        if used and first is None:
            first = (s.probe.coordinate, error)
        if first is None and not used:
            worst_before = max(worst_before, error)
    if first is None:
        print("the reference was never called")
    else:
        print(f"first reference call at {first[0]:.2f} Å, model energy error there {first[1]:.3f} eV; "
              f"largest model error before it {worst_before:.3f} eV")


if __name__ == "__main__":
    main()
