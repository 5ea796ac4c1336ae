"""3BPA files shared by the benchmarks: where they are and the de-duplicated test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.io import read

from ase_race.data import write_structures

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
    write_structures(path, unique)  # atomic: benchmark processes started side by side share it
    return path


def md_temperatures(energies, energies_300k, temperatures=(300.0, 600.0, 1200.0)) -> np.ndarray:
    """The MD temperature each frame most likely came from (K), from its potential energy.

    ``train_mixedT.xyz`` does not record which of its 300/600/1200 K trajectories a frame is
    from. For a harmonic molecule in equilibrium at T, the potential energy above the minimum
    is Gaussian with mean (3N−6)/2·k_BT and std √((3N−6)/2)·k_BT (equipartition; the 300 K file
    has std 0.165 eV where this gives 0.158). The minimum is placed from the 300 K file's mean,
    and each frame takes the temperature of highest likelihood. Shapes: (F,) → (F,).
    """
    kb = 8.617333262e-5  # eV/K
    dof = 3 * 27 - 6  # 3BPA
    t = np.asarray(temperatures, float)
    e_min = float(np.mean(energies_300k)) - dof / 2 * kb * 300.0
    x = np.asarray(energies, float)[:, None] - e_min
    mean, std = dof / 2 * kb * t, np.sqrt(dof / 2) * kb * t
    loglik = -0.5 * ((x - mean) / std) ** 2 - np.log(std)
    return t[np.argmax(loglik, axis=1)]
