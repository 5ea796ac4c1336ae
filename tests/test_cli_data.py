"""Commands that read structures: rMD17 .npz input, predict keeping the labels, evaluate's
warning on labels that are predictions, and --device/--dtype where a model is evaluated.

Commands run in-process through ``main`` (a subprocess costs seconds of imports).
"""

from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.units import kcal, mol

from ase_race.cli import evaluate, predict
from ase_race.cli.main import build_parser, main

FIXTURE = str(Path(__file__).parent / "data" / "modelfiles" / "v1.pt")  # knows H, C, O


def labelled_ethanols(n=3):
    """Rattled ethanols with made-up labels: frame 0 as extxyz energy=/forces (a
    SinglePointCalculator on reading), the others under REF_energy / REF_forces."""
    rng = np.random.default_rng(0)
    frames = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=k)
        energy, forces = -10.0 - k, rng.normal(size=(len(atoms), 3))
        if k == 0:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        else:
            atoms.info["REF_energy"] = energy
            atoms.arrays["REF_forces"] = forces
        frames.append(atoms)
    return frames


def fake_rmd17(path, n=4):
    """An npz with the rMD17 keys (water; energies kcal/mol, forces kcal/mol/Å)."""
    rng = np.random.default_rng(1)
    coords = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + 0.03 * rng.normal(size=(n, 3, 3))
    energies = -47000.0 + rng.normal(size=n)
    np.savez(path, nuclear_charges=np.array([8, 1, 1]), coords=coords, energies=energies,
             forces=rng.normal(size=(n, 3, 3)))
    return energies


def test_predict_keeps_the_labels_and_writes_predictions_under_the_prefix(tmp_path, capsys):
    from ase_race.calculator import RACECalculator

    inputs = labelled_ethanols()
    write(tmp_path / "in.extxyz", inputs)
    assert main(["predict", FIXTURE, str(tmp_path / "in.extxyz"), "-o", str(tmp_path / "out.extxyz"),
                 "--device", "cpu"]) == 0
    out = read(tmp_path / "out.extxyz", ":")
    # the labels, where the input had them
    assert out[0].get_potential_energy() == inputs[0].get_potential_energy()
    np.testing.assert_allclose(out[0].get_forces(), inputs[0].get_forces(), atol=1e-8)
    assert [a.info["REF_energy"] for a in out[1:]] == [-11.0, -12.0] and out[1].calc is None
    np.testing.assert_allclose(out[2].arrays["REF_forces"], inputs[2].arrays["REF_forces"], atol=1e-8)
    # the predictions, beside them
    calc = RACECalculator(FIXTURE, device="cpu")
    for atoms, original in zip(out, labelled_ethanols()):
        original.calc = calc
        assert atoms.info["race_energy"] == pytest.approx(original.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(atoms.arrays["race_forces"], original.get_forces(), atol=1e-7)
        assert atoms.info["race_energy_std"] == pytest.approx(calc.results["energy_std"])
        assert atoms.arrays["race_forces_std"].shape == (9, 3)
    # another prefix (two models' predictions in one file), and one that would overwrite labels
    assert main(["predict", FIXTURE, str(tmp_path / "out.extxyz"), "-o", str(tmp_path / "two.extxyz"),
                 "--info-prefix", "MACE_", "--device", "cpu", "--index", "1"]) == 0
    (two,) = read(tmp_path / "two.extxyz", ":")
    assert two.info["MACE_energy"] == pytest.approx(out[1].info["race_energy"], abs=1e-8)
    assert "MACE_energy_std" in two.info and "MACE_forces" in two.arrays and two.info["REF_energy"] == -11.0
    assert "race_energy" in two.info  # the first prediction is left alone too
    capsys.readouterr()
    assert main(["predict", FIXTURE, str(tmp_path / "in.extxyz"), "--info-prefix", "REF_"]) == 2
    assert "would write the predictions over the labels ['REF_energy'" in capsys.readouterr().err


def test_predict_reads_rmd17_npz_with_index(tmp_path, capsys):
    energies = fake_rmd17(tmp_path / "w.npz")
    assert main(["predict", FIXTURE, str(tmp_path / "w.npz"), "--index", "::2", "-o", str(tmp_path / "o.extxyz"),
                 "--device", "cpu"]) == 0
    out = read(tmp_path / "o.extxyz", ":")
    assert len(out) == 2 and out[1].get_chemical_formula() == "H2O"
    assert out[1].info["REF_energy"] == pytest.approx(energies[2] * kcal / mol, rel=1e-12)
    assert "race_energy" in out[1].info and out[1].arrays["REF_forces"].shape == (3, 3)


def test_evaluate_scores_a_predicted_file_by_its_labels_and_warns_on_copies(tmp_path, capsys, monkeypatch):
    import ase_race.training.assess

    monkeypatch.setattr(ase_race.training.assess, "figures", lambda *args, **kwargs: [])  # seconds of matplotlib
    write(tmp_path / "in.extxyz", labelled_ethanols(2))
    main(["predict", FIXTURE, str(tmp_path / "in.extxyz"), "-o", str(tmp_path / "pred.extxyz"), "--device", "cpu"])
    predicted = read(tmp_path / "pred.extxyz", ":")
    capsys.readouterr()
    assert main(["evaluate", FIXTURE, str(tmp_path / "pred.extxyz"), "-o", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    import json

    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    errors = [a.info["race_energy"] - e for a, e in zip(predicted, (-10.0, -11.0))]
    assert metrics["energy"]["total"]["mae"] == pytest.approx(np.mean(np.abs(errors)), rel=1e-6)
    # A file whose labels are the model's own predictions (what predict wrote before).
    for atoms in predicted:
        atoms.info.pop("REF_energy", None), atoms.arrays.pop("REF_forces", None)
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.info["race_energy"], forces=atoms.arrays["race_forces"])
    write(tmp_path / "copies.extxyz", predicted)
    assert main(["evaluate", FIXTURE, str(tmp_path / "copies.extxyz"), "-o", str(tmp_path / "ev2"),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "ase-race evaluate: warning: the energy and forces labels of" in err and "copies.extxyz" in err
    # calibrate refuses them: the fitted variance scale would be ~0
    assert main(["calibrate", FIXTURE, str(tmp_path / "copies.extxyz"), "-o", str(tmp_path / "cal.pt"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ase-race calibrate: error: cannot calibrate: the energy and forces labels of" in err
    assert not (tmp_path / "cal.pt").exists()


def test_select_reads_npz_keeps_labels_and_takes_device_and_dtype(tmp_path, monkeypatch, capsys):
    import ase_race.calculator as calculator

    made = []

    class Spy(calculator.RACECalculator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(calculator, "RACECalculator", Spy)
    fake_rmd17(tmp_path / "pool.npz")
    out = tmp_path / "sel.extxyz"
    assert main(["select", FIXTURE, str(tmp_path / "pool.npz"), "-n", "2", "--strategy", "energy-std",
                 "--device", "cpu", "--dtype", "float32", "-o", str(out)]) == 0
    assert str(made[0].device) == "cpu" and str(made[0].dtype) == "torch.float32"
    chosen = read(out, ":")
    assert len(chosen) == 2 and all("REF_energy" in a.info for a in chosen)
    # labels the file attached as a calculator (extxyz energy=) stay with the selected frames
    write(tmp_path / "pool.extxyz", labelled_ethanols(1))
    assert main(["select", FIXTURE, str(tmp_path / "pool.extxyz"), "-n", "1", "--strategy", "random",
                 "-o", str(out)]) == 0
    assert read(out).get_potential_energy() == -10.0


def test_stress_test_reads_npz_and_takes_device_and_dtype(tmp_path, monkeypatch):
    import ase_race.stress as stress

    seen = {}

    class Stop(Exception):
        pass

    def fake_stress_test(calc, structure, references, in_distribution=None, driver=None, **kwargs):
        seen.update(calc=calc, structure=structure, in_distribution=in_distribution, driver=driver)
        raise Stop

    monkeypatch.setattr(stress, "stress_test", fake_stress_test)
    fake_rmd17(tmp_path / "w.npz")
    with pytest.raises(Stop):
        main(["stress-test", FIXTURE, "--structure", str(tmp_path / "w.npz"), "--reference", "emt",
              "--in-distribution", str(tmp_path / "w.npz"), "--device", "cpu", "--dtype", "float32",
              "--driver", FIXTURE, "-o", str(tmp_path / "st")])
    assert str(seen["calc"].device) == "cpu" and str(seen["calc"].dtype) == "torch.float32"
    assert str(seen["driver"].dtype) == "torch.float64"  # the driver keeps its own precision
    assert seen["structure"].get_chemical_formula() == "H2O" and "REF_energy" not in seen["structure"].info
    assert len(seen["in_distribution"]) == 4 and "REF_energy" in seen["in_distribution"][0].info


def test_device_options_are_spelled_as_predict_spells_them():
    parser = build_parser()
    for command in ("predict", "evaluate", "select", "stress-test"):
        extra = ["x"] if command in ("predict", "evaluate", "select") else ["--reference", "emt"]
        args = parser.parse_args([command, FIXTURE, *extra])
        assert args.device is None and args.dtype is None
        args = parser.parse_args([command, FIXTURE, *extra, "--device", "cpu", "--dtype", "float32"])
        assert (args.device, args.dtype) == ("cpu", "float32")
    # evaluate loads the model where --device says, in --dtype
    bundle = evaluate._load(parser.parse_args(["evaluate", FIXTURE, "x", "--device", "cpu", "--dtype", "float32"]))
    assert str(bundle.posterior.dtype) == "torch.float32"
    assert predict.resolve_device(None) in ("cuda", "cpu") and predict.resolve_device("cpu") == "cpu"


def test_md_and_relax_start_from_the_last_frame_without_its_labels(tmp_path):
    from ase_race.cli.md import load_structure

    write(tmp_path / "in.extxyz", labelled_ethanols(3))
    atoms = load_structure(str(tmp_path / "in.extxyz"))
    np.testing.assert_allclose(atoms.positions, labelled_ethanols(3)[2].positions, atol=1e-8)
    assert atoms.calc is None and "REF_energy" not in atoms.info and "REF_forces" not in atoms.arrays
    fake_rmd17(tmp_path / "w.npz")
    water = load_structure(str(tmp_path / "w.npz"))
    assert water.get_chemical_formula() == "H2O" and water.calc is None and "REF_energy" not in water.info
    assert load_structure(None).get_chemical_formula() == "C2H6O"
