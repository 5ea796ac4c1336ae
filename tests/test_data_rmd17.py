"""rMD17 .npz files: labels converted from kcal/mol to eV, read directly and through extxyz."""

import numpy as np
import pytest
from ase.units import kcal, mol

from ase_race.data import read_frames, read_rmd17
from ase_race.data.rmd17 import convert, read_rmd17_atoms
from ase_race.errors import DataError


def fake_rmd17(path, n=4, seed=0):
    """An npz with the rMD17 keys: water, energies in kcal/mol, forces in kcal/mol/Å."""
    rng = np.random.default_rng(seed)
    coords = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + 0.05 * rng.normal(size=(n, 3, 3))
    energies = -47000.0 + rng.normal(size=n)
    forces = rng.normal(size=(n, 3, 3)) * 20.0
    np.savez(path, nuclear_charges=np.array([8, 1, 1]), coords=coords, energies=energies, forces=forces,
             old_energies=energies + 1.0)
    return coords, energies, forces


def test_labels_come_in_ev(tmp_path):
    coords, energies, forces = fake_rmd17(tmp_path / "w.npz")
    frames = read_rmd17(tmp_path / "w.npz")
    assert len(frames) == 4
    ev = kcal / mol
    assert ev == pytest.approx(0.0433641, rel=1e-5)
    for k, f in enumerate(frames):
        assert f.atoms.get_chemical_formula() == "H2O" and not f.atoms.pbc.any()
        np.testing.assert_array_equal(f.atoms.positions, coords[k])
        assert f.energy == float(energies[k]) * ev
        np.testing.assert_array_equal(f.forces, forces[k] * ev)
    assert read_frames(tmp_path / "w.npz", index="::2")[1].energy == frames[2].energy  # read_frames reads .npz
    assert read_rmd17_atoms(tmp_path / "w.npz", -1)[0].info["REF_energy"] == frames[3].energy


def test_converted_extxyz_reads_back_the_same_labels(tmp_path):
    for part in ("train", "test"):
        fake_rmd17(tmp_path / f"rmd17_water_{part}_01.npz", seed=1 if part == "train" else 2)
    paths = convert(tmp_path, tmp_path / "xyz", molecule="water")
    assert paths["e0s"] == tmp_path / "isolated_atoms_PBE_def2-SVP.xyz"
    for part in ("train", "test"):
        direct, written = read_rmd17(tmp_path / f"rmd17_water_{part}_01.npz"), read_frames(paths[part])
        assert len(written) == len(direct) == 4
        for a, b in zip(direct, written):
            assert b.energy == pytest.approx(a.energy, rel=1e-12)
            np.testing.assert_allclose(b.forces, a.forces, rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(b.atoms.positions, a.atoms.positions, atol=1e-7)


def test_a_file_without_the_rmd17_keys_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", R=np.zeros((1, 3, 3)))
    with pytest.raises(DataError, match="not an rMD17 file"):
        read_frames(tmp_path / "other.npz")


def test_read_structures_reads_npz_with_labels_and_index(tmp_path):
    from ase_race.data import read_structures

    coords, energies, forces = fake_rmd17(tmp_path / "w.npz", n=5)
    every = read_structures(tmp_path / "w.npz")
    assert len(every) == 5 and every[0].get_chemical_formula() == "H2O"
    np.testing.assert_allclose(every[3].arrays["REF_forces"], forces[3] * kcal / mol, rtol=1e-14)
    picked = read_structures(tmp_path / "w.npz", index="1::2")
    assert [a.info["REF_energy"] for a in picked] == [every[1].info["REF_energy"], every[3].info["REF_energy"]]
    (last,) = read_structures(tmp_path / "w.npz", index=-1, labels=False)
    np.testing.assert_array_equal(last.positions, coords[4])
    assert "REF_energy" not in last.info and "REF_forces" not in last.arrays
    with pytest.raises(DataError, match=r"w.npz: no frames selected by index '9:'"):
        read_structures(tmp_path / "w.npz", index="9:")
    with pytest.raises(DataError, match=r"w.npz: cannot be read as an rMD17 .npz file \(IndexError"):
        read_structures(tmp_path / "w.npz", index=7)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"junk.npz: cannot be read as an rMD17"):
        read_structures(tmp_path / "junk.npz")
