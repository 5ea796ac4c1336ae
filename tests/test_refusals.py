"""Input that cannot be right is refused with a clear error: NaN model files, NaN outputs,
unknown calculator keywords, an in-place calibration of a shipped model."""

import math
import re
from pathlib import Path

import pytest
import torch
from ase.build import molecule

from ase_race import RACECalculator, load_model, save_model
from ase_race.errors import ModelFileError, PredictionError
from ase_race.testing import random_posterior


@pytest.fixture
def model_file(tmp_path):
    return save_model(tmp_path / "m.pt", random_posterior("tiny", seed=2, species=(1, 6, 8), dtype="float64"))


@pytest.mark.parametrize("where", ["weight", "e0s"])
def test_a_model_file_with_non_finite_numbers_is_refused_naming_where(model_file, tmp_path, where):
    data = torch.load(model_file, weights_only=True)
    if where == "weight":
        weights = data["posterior"]["state"]["weights"]
        name = next(k for k, v in weights.items() if v.is_floating_point())
        weights[name] = torch.full_like(weights[name], math.nan)
        expected = f"posterior state.weights.{name}"
    else:
        data["config"]["e0s"] = [math.inf, 0.0, 0.0]
        expected = "config.e0s"
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(ModelFileError, match=f"nan.pt.*non-finite.*{expected}"):
        load_model(tmp_path / "nan.pt")


def test_the_calculator_raises_instead_of_returning_nan(model_file):
    calc = RACECalculator(model_file)
    with torch.no_grad():
        for p in calc.posterior.networks()[0].parameters():
            p.fill_(math.nan)
    atoms = molecule("H2O")
    atoms.calc = calc
    with pytest.raises(PredictionError, match="non-finite.*energy"):
        atoms.get_potential_energy()


def test_unknown_calculator_keywords_are_refused_with_the_accepted_ones(model_file):
    with pytest.raises(TypeError, match=r"\['default_dtype'\].*accepts.*'device'"):
        RACECalculator(model_file, default_dtype="float64")
    RACECalculator(model_file, device="cpu", label="ok")  # known ones still pass


def test_calibrate_needs_an_output_and_never_rewrites_a_shipped_model(model_file, tmp_path, emt_file, capsys):
    from ase_race.cli.main import main
    from ase_race.modelfile import resolve_model_path

    with pytest.raises(SystemExit):
        main(["calibrate", str(model_file), str(emt_file)])  # neither -o nor --in-place
    shipped = resolve_model_path("ethanol-mve")
    before = shipped.stat().st_mtime_ns
    assert main(["calibrate", "ethanol-mve", str(emt_file), "--in-place"]) != 0
    assert "shipped model" in capsys.readouterr().err and shipped.stat().st_mtime_ns == before
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(model_file), str(emt_file), "-o", str(out)]) == 0
    assert load_model(out).calibration != load_model(model_file).calibration


def test_bad_labels_are_refused_naming_file_frame_and_key(tmp_path):
    import numpy as np
    from ase.io import write

    from ase_race.data import read_frames
    from ase_race.errors import DataError

    def frames(energy=-1.0, forces=None):
        atoms = molecule("H2O")
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = np.zeros((3, 3)) if forces is None else forces
        good = molecule("H2O")
        good.info["REF_energy"] = -1.0
        good.arrays["REF_forces"] = np.zeros((3, 3))
        return [good, atoms]

    cases = [(dict(energy=math.nan), "frame 1: energy \\(key 'REF_energy'\\) has non-finite"),
             (dict(forces=np.full((3, 3), math.inf)), "frame 1: forces \\(key 'REF_forces'\\) has non-finite")]
    for k, (kwargs, message) in enumerate(cases):
        path = tmp_path / f"bad{k}.extxyz"
        write(path, frames(**kwargs), format="extxyz")
        with pytest.raises(DataError, match=f"bad{k}.extxyz: {message}"):
            read_frames(path)
    truncated = tmp_path / "truncated.extxyz"
    write(truncated, frames(), format="extxyz")
    truncated.write_text("\n".join(truncated.read_text().splitlines()[:-2]) + "\n")
    with pytest.raises(DataError, match="truncated.extxyz: cannot be read"):
        read_frames(truncated)


def test_config_values_are_coerced_from_their_declared_types_or_refused_by_name():
    from ase_race.config import ModelConfig
    from ase_race.errors import ConfigError
    from ase_race.training import TrainConfig

    config = TrainConfig(lr="1e-3", max_epochs=10.0, batch_size="4", amsgrad="false")
    assert (config.lr, config.max_epochs, config.batch_size, config.amsgrad) == (1e-3, 10, 4, False)
    assert isinstance(config.max_epochs, int)
    for kwargs, message in ((dict(max_epochs="ten"), "max_epochs must be an int, got 'ten'"),
                            (dict(batch_size=4.5), "batch_size must be an int, got 4.5"),
                            (dict(lr=-0.01), "lr must be a positive number"),
                            (dict(amsgrad="maybe"), "amsgrad must be a bool")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)
    assert ModelConfig.from_preset("tiny", r_max="4.5").r_max == 4.5
    with pytest.raises(ConfigError, match="r_max must be a float, got 'five'"):
        ModelConfig.from_preset("tiny", r_max="five")
    with pytest.raises(ConfigError, match="num_layers=100000 is above"):
        ModelConfig.from_preset("tiny", num_layers=100000)


def test_a_directory_is_not_a_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["ethanol-novelty", "ethanol-llla", "ethanol-ensemble"])
def test_a_structure_without_atoms_has_zero_energy_and_no_uncertainty(name):
    from ase import Atoms

    atoms = Atoms()
    atoms.calc = RACECalculator(name)
    assert atoms.get_potential_energy() == 0.0 and atoms.get_forces().shape == (0, 3)
    assert atoms.calc.results["energy_std"] == 0.0 and atoms.calc.results["max_forces_std"] == 0.0


POSTERIORS = Path(__file__).parent / "data" / "posteriors"


def test_a_weight_stored_with_the_wrong_dtype_is_refused_by_name(model_file, tmp_path):
    data = torch.load(model_file, weights_only=True)
    weights = data["posterior"]["state"]["weights"]
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 2)
    weights[name] = weights[name].round().long()  # load_state_dict would cast it silently
    torch.save(data, tmp_path / "int.pt")
    with pytest.raises(ModelFileError, match=f"int.pt: weight '{re.escape(name)}' is stored as torch.int64"):
        load_model(tmp_path / "int.pt")
    weights[name] = torch.zeros_like(weights[name], dtype=torch.float16)
    torch.save(data, tmp_path / "half.pt")
    with pytest.raises(ModelFileError, match="half.pt.*stored as torch.float16"):
        load_model(tmp_path / "half.pt")


def test_a_mis_shaped_laplace_covariance_names_the_file(tmp_path):
    data = torch.load(POSTERIORS / "last_layer_laplace-v1.pt", weights_only=True)
    cov = data["posterior"]["state"]["covariance"]
    data["posterior"]["state"]["covariance"] = cov[:-1, :-1]
    torch.save(data, tmp_path / "cov.pt")
    with pytest.raises(ModelFileError, match="cov.pt: malformed model file"):
        load_model(tmp_path / "cov.pt")


@pytest.mark.parametrize("damage", ["truncated", "pickled", "foreign", "wrong-tensors"])
def test_a_damaged_checkpoint_is_an_error_naming_its_path(emt_file, tmp_path, damage):
    from ase_race.errors import TrainingError
    from ase_race.training import TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig(train_file=str(emt_file), e0s="fit", valid_fraction=4, preset="tiny", max_epochs=1,
                      batch_size=4, output_dir=str(out), checkpoint_every=1,
                      model={"num_features": 4, "hidden_irreps": "4x0e+4x1o", "sh_lmax": 1, "radial_mlp": [8],
                             "readout_hidden": 4})
    out.mkdir()
    checkpoint = out / "checkpoint.pt"
    if damage == "wrong-tensors":
        train(cfg.replace(max_epochs=1))
        data = torch.load(checkpoint, weights_only=True)
        data["model"] = {k: v[..., :1] if v.dim() else v for k, v in data["model"].items()}
        data["epoch"] = 0  # so the finished run would resume
        torch.save(data, checkpoint)
        cfg = cfg.replace(max_epochs=2)
    elif damage == "truncated":
        train(cfg)
        checkpoint.write_bytes(checkpoint.read_bytes()[:500])
        cfg = cfg.replace(max_epochs=2)
    elif damage == "pickled":
        torch.save({"train_config": {}, "model_config": {}, "model": Path("x")}, checkpoint)
    else:
        torch.save({"something": torch.zeros(2)}, checkpoint)
    with pytest.raises(TrainingError, match=re.escape(str(checkpoint))):
        train(cfg)
