"""``ase-race predict MODEL STRUCTURES``: energies, forces and their uncertainties per frame."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="evaluate structures (any file ase.io reads) and report uncertainties"
    )
    p.add_argument("model", help="model file or shipped model name")
    p.add_argument("structures", help="structure file; every frame is evaluated")
    p.add_argument("-o", "--output", help="write an extxyz with predictions and uncertainties")
    p.add_argument("--index", default=":", help="ase.io frame selection (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="default: the model's")
    p.set_defaults(run=run)


def run(args) -> int:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    from ..calculator import RACECalculator, store_uncertainties

    calc = RACECalculator(args.model, device=args.device, dtype=args.dtype)
    frames = read(args.structures, index=args.index)
    frames = frames if isinstance(frames, list) else [frames]
    print(f"{'frame':>5} {'atoms':>5} {'energy/eV':>14} {'energy_std/eV':>13} {'max_forces_std/(eV/Å)':>22}")
    out = []
    for k, atoms in enumerate(frames):
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        r = calc.results
        print(f"{k:5d} {len(atoms):5d} {energy:14.5f} {r['energy_std']:13.5f} {r['max_forces_std']:22.5f}")
        store_uncertainties(atoms)
        keep = {key: r[key] for key in ("energy", "forces", "stress") if key in r}
        atoms.calc = SinglePointCalculator(atoms, **keep)
        out.append(atoms)
    if args.output:
        write(args.output, out, format="extxyz")
        print(f"wrote {len(out)} frames with uncertainties to {args.output}")
    return 0
