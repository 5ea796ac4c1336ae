"""Reading labelled data: key mapping, fallbacks, clear errors, E0s and statistics."""

import warnings

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from ase_race.data import (
    Frame,
    KeyMap,
    dataset_statistics,
    fit_e0s,
    isolated_atom_e0s,
    read_frames,
    read_structures,
    split_frames,
)
from ase_race.errors import DataError


def test_mapped_keys_and_weights(emt_file, tmp_path):
    frames = read_frames(emt_file)
    assert len(frames) == 12
    assert frames[0].forces.shape == (3, 3) and frames[1].forces.shape == (5, 3)
    # custom keys and config weights
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])
    atoms.info.update(dft_e=-1.5, config_weight=3.0, config_type="dimer")
    atoms.arrays["dft_f"] = np.ones((2, 3))
    write(tmp_path / "c.extxyz", atoms)
    (f,) = read_frames(tmp_path / "c.extxyz", keys=KeyMap(energy="dft_e", forces="dft_f"))
    assert f.energy == -1.5 and f.weight == 3.0 and f.config_type == "dimer"
    np.testing.assert_array_equal(f.forces, np.ones((2, 3)))


def test_falls_back_to_calculator_values(tmp_path):
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])
    atoms.calc = SinglePointCalculator(atoms, energy=-2.0, forces=np.full((2, 3), 0.5))
    write(tmp_path / "sp.extxyz", atoms)
    (f,) = read_frames(tmp_path / "sp.extxyz")
    assert f.energy == -2.0
    np.testing.assert_array_equal(f.forces, np.full((2, 3), 0.5))


def test_missing_label_names_file_frame_and_key(emt_file, tmp_path):
    frames = [Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]], info={"REF_energy": -1.0}) for _ in range(3)]
    frames[2].info.pop("REF_energy")
    for a in frames:
        a.arrays["REF_forces"] = np.zeros((2, 3))
    path = tmp_path / "gap.extxyz"
    write(path, frames)
    with pytest.raises(DataError, match=r"gap.extxyz: frame 2 has no energy under key 'REF_energy'"):
        read_frames(path)
    with pytest.raises(DataError, match=r"frame 0 has no forces under key 'F'"):
        read_frames(emt_file, keys=KeyMap(forces="F"))


def test_isolated_and_fitted_e0s(tmp_path):
    isolated = [Atoms(s, info={"config_type": "IsolatedAtom", "REF_energy": e}) for s, e in (("H", -13.6), ("O", -2042.0))]
    for a in isolated:
        a.arrays["REF_forces"] = np.zeros((1, 3))
    write(tmp_path / "iso.extxyz", isolated)
    frames = read_frames(tmp_path / "iso.extxyz")
    assert isolated_atom_e0s(frames, [1, 8]) == {1: -13.6, 8: -2042.0}
    with pytest.raises(DataError, match=r"no isolated-atom energy for atomic numbers \[6\]"):
        isolated_atom_e0s(frames, [1, 6, 8])
    # An E0 file without config_type (3BPA's iso_atoms.xyz): unmarked single atoms count only
    # when the caller says every one-atom frame is an isolated atom.
    unmarked = [Atoms(s, info={"REF_energy": e}) for s, e in (("H", -13.6), ("O", -2042.0))]
    write(tmp_path / "unmarked.extxyz", unmarked)
    unmarked = read_frames(tmp_path / "unmarked.extxyz", require=("energy",))
    with pytest.raises(DataError, match="no isolated-atom energy"):
        isolated_atom_e0s(unmarked, [1, 8])
    assert isolated_atom_e0s(unmarked, [1, 8], every_single_atom=True) == {1: -13.6, 8: -2042.0}
    # Exact least squares: energies built from E0(H) = -1, E0(O) = -5.
    mols = []
    for formula, e in (("H2O", -7.0), ("H2O2", -12.0), ("H2", -2.0)):
        a = Atoms(formula, positions=np.arange(len(Atoms(formula)) * 3).reshape(-1, 3), info={"REF_energy": e})
        a.arrays["REF_forces"] = np.zeros((len(a), 3))
        mols.append(a)
    write(tmp_path / "m.extxyz", mols)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # three compositions fix both E0s: no warning
        fitted = fit_e0s(read_frames(tmp_path / "m.extxyz"), [1, 8])
    assert fitted == pytest.approx({1: -1.0, 8: -5.0})


def test_fitted_e0s_of_one_composition_warn(tmp_path):
    """Every frame ethanol: E = 2 E0(C) + 6 E0(H) + E0(O) fixes one combination of three E0s."""
    frames = []
    for k in range(4):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=k)
        frames.append(Frame(atoms=atoms, energy=-100.0 - 0.1 * k))
    with pytest.warns(UserWarning, match=r"1 composition\(s\) \(C2H6O\), which fix only 1 combination.*e0s: isolated"):
        fitted = fit_e0s(frames, [1, 6, 8])
    # still the least-squares (minimum-norm) solution
    assert 6 * fitted[1] + 2 * fitted[6] + fitted[8] == pytest.approx(-100.15)


def test_statistics_and_split(emt_file):
    frames = read_frames(emt_file)
    stats = dataset_statistics(frames, {1: 0.0, 6: 0.0, 8: 0.0}, cutoff=5.0)
    n_neighbours = [len(f.atoms) - 1 for f in frames]  # all atoms of a small molecule are neighbours
    assert stats["avg_num_neighbors"] == pytest.approx(
        sum(n * (n + 1) for n in n_neighbours) / sum(n + 1 for n in n_neighbours)
    )
    forces = np.concatenate([f.forces.ravel() for f in frames])
    assert stats["scale"] == pytest.approx(np.sqrt(np.mean(forces**2)))
    train, valid = split_frames(frames, 3, seed=0)
    assert len(train) == 9 and len(valid) == 3
    assert split_frames(frames, 3, seed=0)[1][0] is valid[0]  # seeded
    assert {f.source for f in train}.isdisjoint({f.source for f in valid})


def test_missing_file():
    with pytest.raises(DataError, match="nope.xyz: no such data file"):
        read_frames("nope.xyz")
    with pytest.raises(DataError, match="nope.xyz: no such file"):
        read_structures("nope.xyz")


def test_read_structures_keeps_labels_or_drops_them(tmp_path):
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]], info={"REF_energy": -1.0, "note": "x"})
    atoms.arrays["REF_forces"] = np.ones((2, 3))
    other = atoms.copy()
    other.calc = SinglePointCalculator(other, energy=-2.0, forces=np.zeros((2, 3)))
    write(tmp_path / "s.extxyz", [atoms, other])
    first, second = read_structures(tmp_path / "s.extxyz")
    assert first.info["REF_energy"] == -1.0 and second.get_potential_energy() == -2.0
    (bare,) = read_structures(tmp_path / "s.extxyz", index=-1, labels=False)
    assert bare.calc is None and "REF_energy" not in bare.info and "REF_forces" not in bare.arrays
    assert bare.info["note"] == "x"  # other info stays
    (tmp_path / "bad.extxyz").write_text("3\nnot a comment line\nH 0 0\n")
    with pytest.raises(DataError, match=r"bad.extxyz: cannot be read \("):
        read_structures(tmp_path / "bad.extxyz")


def test_pymatgen_structures_and_molecules():
    from pymatgen.core import Lattice, Molecule, Structure

    structure = Structure(Lattice.cubic(3.0), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    mol = Molecule(["O", "H", "H"], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    from ase_race.data import frames_from_pymatgen

    frames = frames_from_pymatgen([structure, mol], energies=[-10.0, -14.0], forces=[np.zeros((2, 3)), np.ones((3, 3))])
    assert frames[0].atoms.pbc.all() and frames[0].atoms.get_volume() == pytest.approx(27.0)
    np.testing.assert_allclose(frames[0].atoms.positions[1], [0.75, 0.75, 0.75])
    assert not frames[1].atoms.pbc.any() and list(frames[1].atoms.symbols) == ["O", "H", "H"]
    assert frames[1].energy == -14.0 and frames[1].forces.sum() == 9.0


def test_vasprun_ionic_steps_units_and_sign(monkeypatch):
    """VASP stress is in kBar with pressure sign; frames carry eV/Å³ in ASE's sign."""
    import pymatgen.io.vasp
    from ase.units import GPa
    from pymatgen.core import Lattice, Structure

    from ase_race.data import read_vasprun

    structure = Structure(Lattice.cubic(3.0), ["Si"], [[0, 0, 0]])

    class FakeVasprun:
        def __init__(self, path, **kwargs):
            self.ionic_steps = [
                {"structure": structure, "e_fr_energy": -5.0 - k, "e_0_energy": 99.0, "forces": [[0.1 * k, 0, 0]],
                 "stress": [[10.0, 0, 0], [0, 20.0, 0], [0, 0, 30.0]]}
                for k in range(3)
            ]

    monkeypatch.setattr(pymatgen.io.vasp, "Vasprun", FakeVasprun)
    frames = read_vasprun("vasprun.xml")
    assert [f.energy for f in frames] == [-5.0, -6.0, -7.0]
    assert frames[2].forces[0, 0] == pytest.approx(0.2)
    np.testing.assert_allclose(np.diag(frames[0].stress), [-1.0 * GPa, -2.0 * GPa, -3.0 * GPa])
    assert frames[1].source == "vasprun.xml: frame 1"
