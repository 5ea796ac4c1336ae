"""``ase-race select MODEL POOL -n N --strategy bald-ef``: which structures to label next."""

from __future__ import annotations

from .predict import add_device_options


def add_parser(sub) -> None:
    from ..active import STRATEGIES

    p = sub.add_parser("select", help="rank a pool of structures for labelling (random, energy-std, BALD)")
    p.add_argument("model", help="model file or shipped name")
    p.add_argument("pool", help="structures to choose from (any file ase.io reads, or an rMD17 .npz)")
    p.add_argument("-n", type=int, default=10, help="how many to select")
    p.add_argument("--strategy", choices=STRATEGIES, default="bald-ef", help="acquisition function")
    p.add_argument("--diversity", type=float, default=0.0, help="> 0: penalise near-duplicates of chosen structures")
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("-o", "--output", default="selected.extxyz", help="the selected structures, best first")
    add_device_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from ..active import acquisition_scores, select
    from ..active.acquisition import rdf_descriptor
    from ..calculator import RACECalculator
    from ..data import read_structures, write_structures

    pool = read_structures(args.pool)
    calc = None if args.strategy == "random" else RACECalculator(args.model, device=args.device, dtype=args.dtype)
    scores = acquisition_scores(calc, pool, args.strategy, seed=args.seed)
    descriptors = np.stack([rdf_descriptor(a) for a in pool]) if args.diversity > 0 else None
    chosen = select(scores, args.n, args.diversity, descriptors)
    out = []
    print(f"{'rank':>4} {'index':>6} {'score':>12}")
    for rank, index in enumerate(chosen):
        atoms = pool[index]  # not a copy: that would drop the labels the file attached (extxyz energy=, forces)
        atoms.info.update({"pool_index": index, "acquisition": args.strategy, "acquisition_score": float(scores[index])})
        out.append(atoms)
        print(f"{rank:4d} {index:6d} {scores[index]:12.5g}")
    write_structures(args.output, out)
    print(f"wrote {len(out)} structures to {args.output}")
    return 0
