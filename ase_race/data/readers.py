"""Read labelled structures from anything ``ase.io`` reads, and from pymatgen objects.

Labels are looked up under the mapped keys first (``atoms.info[keys.energy]``,
``atoms.arrays[keys.forces]``, ``atoms.info[keys.stress]``) and then among the values ASE
attached on reading (a ``SinglePointCalculator``: extxyz ``energy=``/``forces``, traj, db).
A frame that lacks a requested label raises :class:`DataError` naming the file, the frame index
and the key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.io import read

from ..errors import DataError

ISOLATED_ATOM_TYPES = ("isolatedatom", "isolated_atom")


@dataclass(frozen=True)
class KeyMap:
    """Where labels live in ``atoms.info`` / ``atoms.arrays`` (extxyz keys)."""

    energy: str = "REF_energy"
    forces: str = "REF_forces"
    stress: str = "REF_stress"
    config_type: str = "config_type"
    config_weight: str = "config_weight"


@dataclass
class Frame:
    """One labelled structure.

    ``energy`` eV; ``forces`` (n, 3) eV/Å; ``stress`` (3, 3) eV/Å³ (ASE sign); absent labels are
    ``None``. ``weight`` multiplies the frame's loss terms; ``source`` is ``"FILE: frame I"``.
    """

    atoms: Atoms
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    weight: float = 1.0
    config_type: str = "Default"
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def is_isolated_atom(self) -> bool:
        return self.config_type.lower() in ISOLATED_ATOM_TYPES


def _calc_value(atoms: Atoms, name: str):
    calc = atoms.calc
    if calc is None:
        return None
    return getattr(calc, "results", {}).get(name)


def _checked(value, shape: tuple[int, ...], where: str) -> np.ndarray:
    """``value`` as a float64 array of ``shape``, finite; else :class:`DataError` naming ``where``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where} is not a number or an array of numbers: {value!r}") from None
    if array.shape != shape:
        raise DataError(f"{where} has shape {array.shape}; expected {shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{where} has non-finite values (NaN or inf)")
    return array


def _stress_3x3(value) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape == (6,):
        xx, yy, zz, yz, xz, xy = value
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if value.shape in ((9,), (3, 3)):
        return value.reshape(3, 3)
    raise DataError(f"stress has shape {value.shape}; expected (6,), (9,) or (3, 3)")


def frame_from_atoms(
    atoms: Atoms,
    keys: KeyMap = KeyMap(),
    require: Sequence[str] = ("energy", "forces"),
    source: str = "",
) -> Frame:
    """Labels of one ``Atoms`` object; ``require`` lists the labels that must be present."""
    energy = atoms.info.get(keys.energy, _calc_value(atoms, "energy"))
    forces = atoms.arrays.get(keys.forces)
    if forces is None:
        forces = _calc_value(atoms, "forces")
    stress = atoms.info.get(keys.stress, _calc_value(atoms, "stress"))
    config_type = str(atoms.info.get(keys.config_type, "Default"))
    found = {"energy": energy, "forces": forces, "stress": stress}
    for label in require:
        if found[label] is None and not (config_type.lower() in ISOLATED_ATOM_TYPES and label != "energy"):
            raise DataError(
                f"{source} has no {label} under key {getattr(keys, label)!r} "
                "(nor a value attached by the file's calculator)"
            )
    where = {label: f"{source}: {label} (key {getattr(keys, label)!r})" for label in found}
    clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    return Frame(
        atoms=clean,
        energy=None if energy is None else float(_checked(energy, (), where["energy"])),
        forces=None if forces is None else _checked(forces, (len(atoms), 3), where["forces"]),
        stress=None if stress is None else _checked(_stress_3x3(stress), (3, 3), where["stress"]),
        weight=float(atoms.info.get(keys.config_weight, 1.0)),
        config_type=config_type,
        source=source,
        info={k: v for k, v in atoms.info.items() if isinstance(v, (int, float, str))},
    )


def _is_rmd17(path: Path, format: str | None) -> bool:
    return format == "rmd17" or (format is None and path.suffix == ".npz")


def read_structures(
    path: str | Path,
    index: str | int | slice = ":",
    format: str | None = None,
    labels: bool = True,
) -> list[Atoms]:
    """The selected structures of ``path`` as a list of ``ase.Atoms`` (one frame is a list of one).

    ``path`` is anything ``ase.io`` reads, or an rMD17 ``.npz`` file (``format="rmd17"`` for
    another suffix), read by :func:`ase_race.data.rmd17.read_rmd17_atoms`. ``index`` selects as
    in :func:`ase.io.read` (``":"``, ``"::5"``, ``-1``, a slice), for ``.npz`` files too.

    Labels stay where the file put them: what ASE attached on reading (a
    ``SinglePointCalculator``: extxyz ``energy=``/``forces``, traj, db) and the info/arrays keys;
    an rMD17 file gives ``info["REF_energy"]`` (eV) and ``arrays["REF_forces"]`` (eV/Å), the
    default :class:`KeyMap`. ``labels=False`` drops both (the calculator and the default
    ``REF_*`` keys): a starting structure for MD or a relaxation, whose labels would be stale
    after the first step.

    Raises :class:`DataError` naming ``path`` when it does not exist, cannot be read, or the
    selection is empty.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if _is_rmd17(path, format):
        from .rmd17 import read_rmd17_atoms

        try:
            images = read_rmd17_atoms(path, index)
        except DataError:
            raise
        except Exception as error:  # not a zip/npz file, a bad index, ...
            raise DataError(f"{path}: cannot be read as an rMD17 .npz file ({type(error).__name__}: {error})") from error
    else:
        try:
            images = read(path, index=index, format=format)
        except Exception as error:  # ase.io raises format-specific errors (XYZError, ...) without the path
            raise DataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    images = images if isinstance(images, list) else [images]
    if not images:
        raise DataError(f"{path}: no frames selected by index {index!r}")
    if not labels:
        keys = KeyMap()
        for atoms in images:
            atoms.calc = None
            for key in (keys.energy, keys.stress):
                atoms.info.pop(key, None)
            atoms.arrays.pop(keys.forces, None)
    return images


def read_frames(
    path: str | Path,
    index: str = ":",
    keys: KeyMap = KeyMap(),
    require: Sequence[str] = ("energy", "forces"),
    format: str | None = None,
) -> list[Frame]:
    """The labels of every selected frame of ``path``, read by :func:`read_structures`
    (extxyz, traj, db, … : anything ``ase.io`` reads; an rMD17 ``.npz`` file, labels in eV and
    eV/Å under its own fixed keys)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if _is_rmd17(path, format):  # its labels have fixed names, whatever ``keys`` says
        keys = KeyMap()
    images = read_structures(path, index, format)
    return [frame_from_atoms(a, keys, require, f"{path}: frame {i}") for i, a in enumerate(images)]


def frames_from_pymatgen(structures: Iterable, energies=None, forces=None, stresses=None) -> list[Frame]:
    """Frames from pymatgen ``Structure``/``Molecule`` objects and label sequences (eV, eV/Å,
    eV/Å³ in ASE's sign)."""
    from ..extras import require

    require("pymatgen", "frames_from_pymatgen")
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = []
    for k, structure in enumerate(structures):
        atoms = AseAtomsAdaptor.get_atoms(structure)
        frames.append(
            Frame(
                atoms=Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc),
                energy=None if energies is None else float(energies[k]),
                forces=None if forces is None else np.asarray(forces[k], dtype=np.float64),
                stress=None if stresses is None else _stress_3x3(stresses[k]),
                source=f"pymatgen structure {k}",
            )
        )
    return frames


def read_vasprun(path: str | Path) -> list[Frame]:
    """Every ionic step of a ``vasprun.xml``: energy, forces, stress.

    The energy is the free energy (``e_fr_energy``), the quantity VASP's forces are derivatives
    of; the σ → 0 extrapolation would be inconsistent with the forces under smearing.

    VASP reports stress in kBar with the opposite sign convention; it is converted to eV/Å³ in
    ASE's convention (positive = tensile).
    """
    from ase.units import GPa

    from ..extras import require

    require("pymatgen", f"reading {path}")
    from pymatgen.io.vasp import Vasprun

    run = Vasprun(str(path), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    steps = run.ionic_steps
    kbar = 0.1 * GPa
    frames = frames_from_pymatgen(
        [s["structure"] for s in steps],
        energies=[s["e_fr_energy"] for s in steps],
        forces=[s["forces"] for s in steps],
        stresses=[-np.asarray(s["stress"]) * kbar for s in steps] if "stress" in steps[0] else None,
    )
    for k, frame in enumerate(frames):
        frame.source = f"{path}: frame {k}"
    return frames


def split_frames(frames: Sequence[Frame], n_valid: int | float, seed: int) -> tuple[list[Frame], list[Frame]]:
    """Seeded random split into (train, valid); a float ``n_valid`` is a fraction."""
    n = len(frames)
    k = int(round(n_valid * n)) if isinstance(n_valid, float) and n_valid < 1 else int(n_valid)
    if not 0 <= k < n:
        raise DataError(f"cannot take {k} validation frames out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    return [frames[i] for i in sorted(order[k:])], [frames[i] for i in sorted(order[:k])]


def fingerprint(frames: Sequence[Frame]) -> str:
    """SHA-256 over numbers, positions, cells and labels: identifies the exact training data."""
    h = hashlib.sha256()
    for f in frames:
        for array in (f.atoms.numbers, f.atoms.positions, f.atoms.cell.array, f.forces):
            if array is not None:
                h.update(np.ascontiguousarray(array).tobytes())
        h.update(repr(f.energy).encode())
    return h.hexdigest()
