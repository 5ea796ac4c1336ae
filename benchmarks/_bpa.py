"""3BPA files shared by the benchmarks: where they are and the de-duplicated test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.io import read, write

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "3bpa"


def mixed_temperature_test_set(out: Path) -> Path:
    """The mixed-temperature file without the frames it shares with the 300 K file (extxyz)."""
    path = Path(out) / "test_mixedT_unique.extxyz"
    if path.exists():
        return path
    seen = {np.round(a.positions, 5).tobytes() for a in read(DATA / "train_300K.xyz", ":")}
    mixed = read(DATA / "train_mixedT.xyz", ":")
    unique = [a for a in mixed if np.round(a.positions, 5).tobytes() not in seen]
    print(f"test set: {len(mixed)} mixed-temperature frames, {len(mixed) - len(unique)} shared with the 300 K file, "
          f"{len(unique)} kept")
    write(path, unique, format="extxyz")
    return path
