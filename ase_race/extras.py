"""Optional dependencies: which ``pip`` extra provides each, and a clear error when one is missing.

The core package (the calculator, MD, training of MVE, ensembles, SWAG, IVON, novelty and the
last-layer Laplace) needs none of them. A command that needs one calls :func:`require` before
it does any work, so that a missing package is reported at once with the exact install
command, not after a training run or as a failed reference call per MD step.

laplace-torch is the awkward one: it and BackPACK declare ``torchvision``, whose wheel does not
match a CPU build of torch (``operator torchvision::nms does not exist``) and which neither
needs. Its extra therefore carries only their real dependencies, and laplace-torch itself is
installed without dependencies (the second command of :data:`EXTRAS` ``["laplace"]``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import RaceError

#: laplace-torch and the curvature packages it imports, installed with ``--no-deps``
LAPLACE_NO_DEPS = "laplace-torch==0.3 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 asdfghjkl==0.1a4"


@dataclass(frozen=True)
class Extra:
    """An optional dependency: the module to import, what it provides, how to install it."""

    module: str
    provides: str
    install: str


EXTRAS: dict[str, Extra] = {
    "laplace": Extra(
        "laplace", "the Laplace posterior over all weights (method: laplace, subset: all)",
        f"pip install 'ase-race[laplace]' && pip install --no-deps {LAPLACE_NO_DEPS}",
    ),
    "pyscf": Extra("pyscf", "the PySCF reference (PBE/def2-SVP, the rMD17 level)", "pip install 'ase-race[pyscf]'"),
    "tblite": Extra("tblite", "the GFN2-xTB reference (tblite)", "pip install 'ase-race[tblite]'"),
    "pymatgen": Extra("pymatgen", "reading pymatgen objects and vasprun.xml", "pip install 'ase-race[pymatgen]'"),
    "ipi": Extra("ipi", "i-PI, the server that ase-race serve answers (path integrals, many clients)",
                 "pip install 'ase-race[ipi]'"),
}


class MissingDependency(RaceError, ImportError):
    """An optional package a command needs is not installed; the message says how to install it."""


def available(name: str) -> bool:
    """Whether the optional package ``name`` (a key of :data:`EXTRAS`) can be imported."""
    return importlib.util.find_spec(EXTRAS[name].module) is not None


def require(name: str, needed_for: str | None = None) -> None:
    """Raise :class:`MissingDependency` unless the optional package ``name`` is importable.

    Args:
        name: a key of :data:`EXTRAS`.
        needed_for: what the caller was asked to do (``"--fallback pyscf"``), for the message.
    """
    extra = EXTRAS[name]
    if available(name):
        return
    what = needed_for or extra.provides
    raise MissingDependency(f"{what} needs the optional package {extra.module!r}, which is not installed; "
                            f"install it with: {extra.install}")
