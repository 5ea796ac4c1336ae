"""The off-distribution stress test: probe geometry, label reuse, the in-range rule, the metrics
against hand-computed cases, and the command end to end."""

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT

from ase_race.stress import Probe, Scored, atom_pairs, bond_scans, bonds, normal_mode_scans, score
from ase_race.stress.report import label, mark_in_range


def test_bond_scans_pull_one_bond_of_every_type_to_the_limit():
    ethanol = molecule("CH3CH2OH")
    probes = bond_scans(ethanol, max_distance=6.0, n_stretch=5, compress=(0.8,))
    scans = {p.scan.split(" ")[0] for p in probes}
    assert scans == {"C–C", "C–H", "C–O", "H–O"}
    for p in probes:
        i, j = (int("".join(c for c in part if c.isdigit())) for part in p.scan.split("(")[1].rstrip(")").split("–"))
        assert p.atoms.get_distance(i, j) == pytest.approx(p.coordinate, abs=1e-9)
        moved = set(np.flatnonzero(np.linalg.norm(p.atoms.positions - ethanol.positions, axis=1) > 1e-9))
        if p.scan.startswith(("C–H", "H–O")):
            assert moved <= {j}  # the hydrogen alone
        # the moved fragment keeps its shape: every bond not cut keeps its length
        for a, b in bonds(ethanol):
            if {a, b} != {i, j}:
                assert p.atoms.get_distance(a, b) == pytest.approx(ethanol.get_distance(a, b), abs=1e-9)
    assert max(p.coordinate for p in probes if p.scan.startswith("H–O")) == pytest.approx(6.0)


def test_atom_pairs_cover_every_pair_of_elements():
    probes = atom_pairs({1, 6, 8}, distances=(1.0, 5.0))
    assert sorted({p.scan for p in probes}) == sorted(["H–H pair", "H–C pair", "H–O pair", "C–C pair", "C–O pair", "O–O pair"])
    assert all(p.atoms.get_distance(0, 1) == pytest.approx(p.coordinate) for p in probes)


def test_normal_mode_scans_keep_the_centre_of_mass_and_the_amplitude():
    from ase.optimize import BFGS

    water = molecule("H2O")
    water.calc = EMT()
    BFGS(water, logfile=None).run(fmax=1e-4)
    probes = normal_mode_scans(water, EMT(), n_soft=1, n_stiff=1, amplitudes=(0.1, 0.2))
    assert len({p.scan for p in probes}) == 2 and len(probes) == 4
    masses = water.get_masses()
    for p in probes:
        shift = p.atoms.positions - water.positions
        assert np.abs(masses @ shift).max() < 1e-8  # no translation
        assert np.linalg.norm(shift, axis=1).max() == pytest.approx(abs(p.coordinate))


class Counting(EMT):
    calls = 0

    def calculate(self, *args, **kwargs):
        Counting.calls += 1
        super().calculate(*args, **kwargs)


def test_labels_are_reused_from_the_cache_and_failed_references_left_out(tmp_path):
    probes = atom_pairs({1, 6}, distances=(1.0, 2.0))
    cache = tmp_path / "labels.extxyz"
    Counting.calls = 0
    first = label(probes, lambda atoms: Counting(), cache)
    assert Counting.calls == len(probes) == len(first)
    again = label(probes, lambda atoms: Counting(), cache)
    assert Counting.calls == len(probes)  # no new reference calls
    assert [s.energy_ref for s in again] == [s.energy_ref for s in first]

    class Failing(EMT):
        def calculate(self, atoms=None, *args, **kwargs):
            if len(set(atoms.numbers)) > 1:
                raise RuntimeError("SCF did not converge")
            super().calculate(atoms, *args, **kwargs)

    kept = label(probes, lambda atoms: Failing())
    assert len(kept) == sum(len(set(p.atoms.numbers)) == 1 for p in probes)
    # a list of calculators is tried in turn: the second takes over where the first fails
    both = label(probes, lambda atoms: [Failing(), EMT()])
    assert len(both) == len(probes) and [s.energy_ref for s in both] == [s.energy_ref for s in first]


def _scored(kind, error, std, fstd, atoms=None, coordinate=0.0):
    atoms = atoms if atoms is not None else Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    s = Scored(Probe(atoms, kind, f"{kind} scan", coordinate), energy_ref=error, forces_ref=np.zeros((len(atoms), 3)))
    s.energy, s.energy_std, s.max_forces_std, s.forces = 0.0, std, fstd, np.zeros((len(atoms), 3))
    return s


def test_metrics_against_hand_computed_values():
    md = [_scored("md", e, 1.0, 0.1) for e in (0.5, -0.5, 1.5)]
    for s in md:
        s.in_range = True
    pairs = [_scored("atom_pair", e, s, f) for e, s, f in ((1.0, 2.0, 1.0), (3.0, 1.0, 2.0), (-0.5, 1.0, 0.05))]
    report = score(md + pairs, md)
    m = report["kinds"]["atom_pair"]
    assert m["coverage_1sigma"] == pytest.approx(2 / 3) and m["coverage_2sigma"] == pytest.approx(2 / 3)
    assert m["z2_mean"] == pytest.approx((0.25 + 9 + 0.25) / 3) and m["z2_median"] == pytest.approx(0.25)
    assert m["energy_mae"] == pytest.approx(1.5)
    # σ_E of every pair (2, 1, 1) exceeds every MD frame's (1, 1, 1) or ties it
    assert m["auroc_energy_std"] == pytest.approx((3 + 1.5 + 1.5) / 9)
    assert m["auroc_max_forces_std"] == pytest.approx((3 + 3 + 0) / 9)
    assert report["kinds"]["md"]["coverage_1sigma"] == pytest.approx(2 / 3)
    assert report["off_distribution"]["n"] == 3


def test_in_range_is_decided_by_the_bond_lengths_of_the_in_distribution_frames():
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, d]]) for d in (0.70, 0.80)]
    inside, outside = _scored("bond_stretch", 0, 1, 1, frames[0].copy()), _scored("bond_stretch", 0, 1, 1, h2.copy())
    outside.probe.atoms.positions[1, 2] = 0.9
    pair = _scored("atom_pair", 0, 1, 1, Atoms("HC", positions=[[0, 0, 0], [0, 0, 1]]))
    mark_in_range([inside, outside, pair], h2, frames)
    assert (inside.in_range, outside.in_range, pair.in_range) == (True, False, False)


def test_stress_test_command_writes_table_json_and_figure(tmp_path, capsys):
    import json

    from ase_race import save_model
    from ase_race.cli.main import main
    from ase_race.testing import random_posterior

    model = save_model(tmp_path / "m.pt", random_posterior("tiny", seed=1, species=(1, 6, 8), scale=0.5, dtype="float64"))
    out = tmp_path / "st"
    rc = main(["stress-test", str(model), "--structure", "H2O", "--reference", "emt", "--md-frames", "3",
               "--max-distance", "3", "--no-relax", "-o", str(out)])
    assert rc == 0
    report = json.loads((out / "stress_test.json").read_text())
    assert {"bond_stretch", "bond_compress", "atom_pair", "normal_mode", "hot_md", "md"} <= set(report["kinds"])
    assert (out / "stress_test.png").stat().st_size > 0 and "off_distribution" in capsys.readouterr().out
    assert all(math.isfinite(v["energy_mae"]) for v in report["kinds"].values())


def test_splits_differ_in_every_setting_and_small_molecules_are_made_of_the_elements():
    from ase_race.stress import SPLITS, build_probes, small_molecules

    test, calibration = SPLITS["test"], SPLITS["calibration"]
    assert not set(test["molecules"]) & set(calibration["molecules"])
    assert not set(test["pair_distances"]) & set(calibration["pair_distances"])
    assert not set(test["mode_amplitudes"]) & set(calibration["mode_amplitudes"])
    water = small_molecules(["H2O"])[0]
    assert (water.kind, water.scan, water.atoms.get_chemical_formula()) == ("small_molecule", "H2O", "H2O")
    # around water (H, O only) the carbon molecules of the split are left out
    probes = build_probes(molecule("H2O"), EMT(), n_md=2, n_soft_modes=1, n_stiff_modes=1, with_md=False,
                          split="calibration")
    names = {p.scan for p in probes if p.kind == "small_molecule"}
    assert names == {"H2", "H2O2", "OH"}


def test_labelled_files_read_back_as_the_probes_they_label(tmp_path):
    from ase_race.stress import read_labelled

    probes = atom_pairs({1, 8}, distances=(1.0, 2.5))
    first = label(probes, lambda atoms: EMT(), tmp_path / "labels.extxyz")
    back = read_labelled(tmp_path / "labels.extxyz")
    assert [(s.probe.kind, s.probe.scan, s.probe.coordinate) for s in back] == \
        [(s.probe.kind, s.probe.scan, s.probe.coordinate) for s in first]
    for a, b in zip(back, first):
        assert a.energy_ref == pytest.approx(b.energy_ref, abs=1e-10)
        np.testing.assert_allclose(a.forces_ref, b.forces_ref, atol=1e-10)
        np.testing.assert_allclose(a.probe.atoms.positions, b.probe.atoms.positions, atol=1e-10)


def test_in_range_compares_bonds_by_elements_whatever_the_frames_atom_order():
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    frames = [Atoms("HO", positions=[[0, 0, 0], [0, 0, d]]) for d in (0.92, 1.02)]  # the other order
    inside, outside = _scored("bond_stretch", 0, 1, 1, oh.copy()), _scored("bond_stretch", 0, 1, 1, oh.copy())
    outside.probe.atoms.positions[1, 2] = 1.2
    mark_in_range([inside, outside], oh, frames)
    assert (inside.in_range, outside.in_range) == (True, False)


def test_an_isomer_or_a_small_molecule_is_never_in_range():
    ethanol = molecule("CH3CH2OH")
    ether = _scored("small_molecule", 0, 1, 1, molecule("CH3OCH3"))
    frames = [ethanol.copy()]
    same = _scored("small_molecule", 0, 1, 1, ethanol.copy())  # even ethanol itself, as a small molecule
    mark_in_range([ether, same], ethanol, frames)
    assert (ether.in_range, same.in_range) == (False, False)
