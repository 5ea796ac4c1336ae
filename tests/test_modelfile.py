"""Model files: bit-identical round trips, versioned fixtures, and every bad-file error."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ase_race.modelfile as modelfile
from ase_race import RACECalculator, load_model, save_model
from ase_race.errors import ModelFileError
from ase_race.modelfile import FORMAT_VERSION, Calibration, read_model_dict
from ase_race.testing import random_posterior

FIXTURES = Path(__file__).parent / "data" / "modelfiles"


def predictions(model, atoms):
    atoms = atoms.copy()
    atoms.calc = RACECalculator(model)
    atoms.get_potential_energy()
    return atoms.calc.results


@pytest.mark.parametrize("force_cov", ["equivariant", "cholesky"])
def test_round_trip_is_bit_identical(tmp_path, ethanol, force_cov):
    post = random_posterior("tiny", seed=5, species=(1, 6, 8), force_cov=force_cov, energy_var="paper")
    path = save_model(tmp_path / "m.pt", post, Calibration(2.0, 3.0, 1.0), {"note": "test"})
    bundle = load_model(path)
    assert bundle.config == post.config
    assert bundle.calibration == Calibration(2.0, 3.0, 1.0)
    assert bundle.metadata["note"] == "test" and "torch" in bundle.metadata["versions"]
    before, after = predictions(post, ethanol), predictions(bundle, ethanol)
    # Calibration multiplies variances; means are bit-identical.
    assert after["energy"] == before["energy"]
    assert np.array_equal(after["forces"], before["forces"])
    assert after["energy_var"] == 2.0 * before["energy_var"]
    np.testing.assert_array_equal(after["forces_cov"], 3.0 * before["forces_cov"])


def test_file_is_plain_data(tmp_path):
    path = save_model(tmp_path / "m.pt", random_posterior())
    data = torch.load(path, weights_only=True)
    assert data["format"] == "ase-race-model" and data["version"] == FORMAT_VERSION
    json.dumps({k: v for k, v in data.items() if k != "posterior"})  # everything else is JSON-able
    assert data["species"] == list(data["config"]["species"])


@pytest.mark.parametrize("version", range(1, FORMAT_VERSION + 1))
def test_every_format_version_still_loads(version, ethanol):
    """Each version has a fixture file and the energies it gave when written."""
    path = FIXTURES / f"v{version}.pt"
    expected = json.loads((FIXTURES / f"v{version}.json").read_text())
    results = predictions(str(path), ethanol.__class__(**expected["atoms"]))
    np.testing.assert_allclose(results["energy"], expected["energy"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(results["forces"], expected["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(results["energy_var"], expected["energy_var"], rtol=1e-10)


def test_format_change_needs_a_version_bump():
    """The current writer must produce what the newest fixture holds (same keys, same shapes)."""
    fixture = torch.load(FIXTURES / f"v{FORMAT_VERSION}.pt", weights_only=True)
    post = random_posterior("tiny", seed=0, species=tuple(fixture["species"]))
    assert sorted(fixture) == sorted(["format", "version", "config", "species", "e0s", "cutoff",
                                      "dtype", "posterior", "calibration", "metadata"])
    weights = post.state_dict()["weights"]
    stored = fixture["posterior"]["state"]["weights"]
    assert {k: tuple(v.shape) for k, v in stored.items()} == {k: tuple(v.shape) for k, v in weights.items()}


def test_foreign_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="notes.txt: not an ase-race model file"):
        load_model(text)
    tensor = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, tensor)
    with pytest.raises(ModelFileError, match=r"tensor.pt: not an ase-race model file \(format None"):
        load_model(tensor)


def test_truncated_file(tmp_path):
    path = save_model(tmp_path / "m.pt", random_posterior())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="m.pt: truncated or corrupt"):
        load_model(path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ase-race-model", "version": 1, "config": Payload()}, path)
    with pytest.raises(ModelFileError, match="evil.pt: refused to load: .*pickled Python objects"):
        load_model(path)
    assert "must never run" not in capsys.readouterr().out


def test_newer_version_is_refused(tmp_path):
    path = save_model(tmp_path / "m.pt", random_posterior())
    data = torch.load(path, weights_only=True)
    data["version"] = FORMAT_VERSION + 1
    torch.save(data, path)
    with pytest.raises(ModelFileError, match=rf"version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}.*upgrade"):
        load_model(path)


def test_mismatched_weights_are_refused(tmp_path):
    path = save_model(tmp_path / "m.pt", random_posterior())
    data = torch.load(path, weights_only=True)
    data["config"]["num_layers"] = 3
    torch.save(data, path)
    with pytest.raises(ModelFileError, match="weights do not match the stored config"):
        load_model(path)


def test_missing_file_and_unknown_name():
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model("does-not-exist.pt")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = save_model(tmp_path / "m.pt", random_posterior(seed=1))
    good = path.read_bytes()

    def crash(obj, handle):
        handle.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(modelfile.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, random_posterior(seed=2))
    assert path.read_bytes() == good  # the earlier file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary left behind
    read_model_dict(path)
