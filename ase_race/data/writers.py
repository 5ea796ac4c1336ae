"""The one writer of structure files: extended XYZ, replaced atomically.

Every file the package writes for later reading (labelled sets, selections, predictions, caches
of reference labels) goes through :func:`write_structures`, so a killed process or two writers
side by side never leave a half-written file: readers see the old content or the new.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

from ase import Atoms

from .._atomic import atomic_write_text


def write_structures(path: str | os.PathLike, structures: Iterable[Atoms]) -> Path:
    """Write ``structures`` (labels in ``info``/``arrays`` or an attached calculator) to ``path``
    as extended XYZ, atomically. Missing parent folders are created. Returns ``path``."""
    from ase.io import write

    buffer = io.StringIO()
    write(buffer, list(structures), format="extxyz")
    return atomic_write_text(path, buffer.getvalue())
