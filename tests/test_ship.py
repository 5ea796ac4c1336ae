"""Shipping a model: the file carries the calibration fitted on the validation data and the test
metrics before and after it; ``ase-race ship`` is the same function."""

import pytest
from ase.io import write

from ase_race import load_model
from ase_race.cli.main import main
from ase_race.data import read_frames
from ase_race.data.readers import frame_from_atoms
from ase_race.errors import ConfigError
from ase_race.evaluation import Calibration
from ase_race.modelfile import ModelBundle, save_model
from ase_race.posteriors import EnsemblePosterior
from ase_race.testing import random_model, random_posterior
from ase_race.training import TrainConfig
from ase_race.training.assess import assess, calibrate, gather
from ase_race.training.ship import metrics_summary, ship


@pytest.fixture(scope="module")
def data():
    from conftest import emt_frames

    atoms = emt_frames(10, seed=5)
    return atoms[:6], atoms[6:]  # (validation, test) as labelled ase.Atoms


def frames(atoms_list):
    return [frame_from_atoms(a) for a in atoms_list]


def posterior():
    return random_posterior("tiny", seed=2, species=(1, 6, 8), dtype="float64")


def test_ship_writes_the_fitted_calibration_and_the_test_metrics(tmp_path, data):
    valid, test = data
    bundle = ModelBundle(posterior(), metadata={"training": {"note": "kept"}})
    path = ship(bundle, valid, tmp_path / "shipped.pt", test=test)
    shipped = load_model(path)
    fitted = calibrate(bundle, frames(valid))
    assert shipped.calibration == fitted and not fitted.is_identity
    info = shipped.metadata["shipping"]
    assert info["calibration"] == fitted.to_dict() and info["calibrated_on"].startswith("6 structures")
    assert info["test_raw"] == pytest.approx(metrics_summary(assess(gather(bundle, frames(test)))))
    assert info["test_calibrated"] == pytest.approx(metrics_summary(assess(gather(shipped, frames(test)))))
    assert info["test_raw"]["forces_mae_meV_A"] == pytest.approx(info["test_calibrated"]["forces_mae_meV_A"])
    assert shipped.metadata["training"] == {"note": "kept"}
    assert bundle.calibration.is_identity  # the bundle passed in is left as it was


def test_ship_on_a_recipe_calibrates_on_its_validation_split(tmp_path, data):
    valid, test = data
    train_file, test_file = tmp_path / "train.extxyz", tmp_path / "test.extxyz"
    write(train_file, valid + test, format="extxyz")
    write(test_file, test, format="extxyz")
    config = TrainConfig(train_file=str(train_file), test_file=str(test_file), valid_fraction=4, e0s="fit", seed=3)
    model = save_model(tmp_path / "run.pt", posterior())
    shipped = load_model(ship(model, config, tmp_path / "shipped.pt"))

    from ase_race.training import prepare

    _, _, split = prepare(config)
    assert shipped.calibration == calibrate(load_model(model), split)
    assert shipped.metadata["shipping"]["calibrated_on"] == "the 4 validation structures of the recipe's split"
    assert shipped.metadata["shipping"]["tested_on"] == f"4 structures of {test_file}"  # the recipe's test_file


def test_ensembles_set_their_predictive_through_the_constructor(tmp_path, data):
    valid, _ = data
    members = [random_model(posterior().config, seed=s) for s in (1, 2)]
    ensemble = EnsemblePosterior(members, aleatoric=True)
    shipped = load_model(ship(ensemble, valid, tmp_path / "e.pt", aleatoric=False))
    assert shipped.posterior.aleatoric is False and shipped.metadata["shipping"]["aleatoric"] is False
    assert ensemble.aleatoric is True
    spread_only = EnsemblePosterior(members, aleatoric=False)
    assert shipped.calibration == calibrate(ModelBundle(spread_only), frames(valid))
    with pytest.raises(ConfigError, match="ensembles only"):
        ship(posterior(), valid, tmp_path / "m.pt", aleatoric=False)


def test_uncalibrated_keeps_the_calibration(tmp_path, data):
    _, test = data
    kept = Calibration(energy_var_scale=3.0)
    shipped = load_model(ship(ModelBundle(posterior(), kept), None, tmp_path / "m.pt", test=test))
    assert shipped.calibration == kept and shipped.metadata["shipping"]["calibrated_on"] is None
    assert shipped.metadata["shipping"]["test_calibrated"]["energy_nll"] != shipped.metadata["shipping"]["test_raw"]["energy_nll"]


def test_ship_command(tmp_path, data, capsys):
    valid, test = data
    valid_file, test_file = tmp_path / "valid.extxyz", tmp_path / "test.extxyz"
    write(valid_file, valid, format="extxyz")
    write(test_file, test, format="extxyz")
    model = save_model(tmp_path / "run.pt", posterior())
    out = tmp_path / "models" / "shipped.pt"
    code = main(["ship", str(model), "--calibrate-on", str(valid_file), "--test", str(test_file), "-o", str(out)])
    assert code == 0
    shipped = load_model(out)
    assert shipped.calibration == calibrate(load_model(model), read_frames(valid_file))
    text = capsys.readouterr().out
    assert "calibrated on 6 structures" in text and "calibrated" in text.splitlines()[-2] and str(out) in text
    assert {"test_raw", "test_calibrated"} <= set(shipped.metadata["shipping"])
    # no calibration source: one line, status 2
    assert main(["ship", str(model), "-o", str(out)]) == 2
    assert "--calibrate-on" in capsys.readouterr().err
