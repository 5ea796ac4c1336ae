"""``ase-race predict MODEL STRUCTURES``: energies, forces and their uncertainties per frame.

The input's labels are kept (its calculator values, ``REF_*`` keys, anything else it had); the
predictions go under their own prefixed names, ``--info-prefix`` (default ``race_``, the prefix
of every value ``ase_race`` copies into atoms):

================================== ============ ==========================================
key                                shape        meaning
================================== ============ ==========================================
``info[PREFIX + "energy"]``        float        predicted energy, eV
``arrays[PREFIX + "forces"]``      (n, 3)       predicted forces, eV/Å
``info[PREFIX + "stress"]``        (6,)         predicted stress, eV/Å³, Voigt (periodic only)
``info[PREFIX + "energy_std"]``, … as :func:`~ase_race.calculator.store_uncertainties`
================================== ============ ==========================================

So a labelled file predicted and written with ``-o`` can still be scored by ``ase-race
evaluate``, which reads the labels, never the predictions.
"""

from __future__ import annotations

from .. import _keys as K

DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda if available)"
DTYPE_HELP = "compute in this precision (default: the model's)"


def add_device_options(p, dtype: bool = True) -> None:
    """``--device`` (and ``--dtype``) as every command that evaluates a model spells them."""
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    if dtype:
        p.add_argument("--dtype", default=None, choices=["float32", "float64"], help=DTYPE_HELP)


def resolve_device(device: str | None) -> str:
    """``--device``: None means cuda if available, else cpu (as :class:`RACECalculator` does)."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="evaluate structures (any file ase.io reads, or an rMD17 .npz) and report uncertainties",
        description="Predict every selected frame. With -o, the frames are written with their own labels "
        "untouched and the predictions under prefixed keys: info[PREFIX+'energy'], arrays[PREFIX+'forces'], "
        "info[PREFIX+'stress'] (periodic), and the uncertainties info[PREFIX+'energy_std'], "
        "arrays[PREFIX+'forces_std'], ... (PREFIX is --info-prefix, default race_).",
    )
    p.add_argument("model", help="model file or shipped model name")
    p.add_argument("structures", help="structure file (any file ase.io reads, or an rMD17 .npz)")
    p.add_argument("-o", "--output", help="write an extxyz: the input's labels kept, predictions and uncertainties added")
    p.add_argument("--index", default=":", help="frame selection as in ase.io.read, e.g. '::10' (default: all)")
    p.add_argument("--info-prefix", default=K.INFO_PREFIX,
                   help=f"prefix of the predicted keys in the output: PREFIX+'energy', PREFIX+'forces', "
                        f"PREFIX+'energy_std', ... (default: {K.INFO_PREFIX})")
    add_device_options(p)
    p.set_defaults(run=run)


def _check_prefix(prefix: str) -> None:
    from ..data import KeyMap
    from ..errors import ConfigError

    keys = KeyMap()
    taken = {"energy", "forces", "stress", "free_energy", keys.energy, keys.forces, keys.stress}
    clash = sorted({f"{prefix}{name}" for name in ("energy", "forces", "stress")} & taken)
    if clash:
        raise ConfigError(f"--info-prefix {prefix!r} would write the predictions over the labels {clash}")


def store_prediction(atoms, results: dict, prefix: str = K.INFO_PREFIX) -> None:
    """Copy a RACECalculator's ``results`` into ``atoms`` under ``prefix``: energy, forces,
    stress and the uncertainties ``store_uncertainties`` copies; labels are left alone."""
    from ..calculator.observers import ARRAY_KEYS, INFO_KEYS

    for key in (K.ENERGY, K.STRESS, *INFO_KEYS):
        if key in results:
            value = results[key]
            atoms.info[prefix + key] = value.copy() if hasattr(value, "copy") else value
    for key in (K.FORCES, *ARRAY_KEYS):
        if key in results:
            atoms.arrays[prefix + key] = results[key].copy()


def run(args) -> int:
    from ..calculator import RACECalculator
    from ..data import read_structures, write_structures

    _check_prefix(args.info_prefix)
    calc = RACECalculator(args.model, device=args.device, dtype=args.dtype)
    frames = read_structures(args.structures, index=args.index)
    print(f"{'frame':>5} {'atoms':>5} {'energy/eV':>14} {'energy_std/eV':>13} {'max_forces_std/(eV/Å)':>22}")
    for k, atoms in enumerate(frames):
        labels = atoms.calc  # what the file attached (a SinglePointCalculator), or None
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        r = calc.results
        print(f"{k:5d} {len(atoms):5d} {energy:14.5f} {r['energy_std']:13.5f} {r['max_forces_std']:22.5f}")
        store_prediction(atoms, r, args.info_prefix)
        atoms.calc = labels
    if args.output:
        write_structures(args.output, frames)
        print(f"wrote {len(frames)} frames (labels kept; predictions and uncertainties under "
              f"{args.info_prefix}*) to {args.output}")
    return 0
