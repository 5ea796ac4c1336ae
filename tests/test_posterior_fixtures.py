"""Every posterior kind has a committed model file per state version that still predicts what it
did when written (tests/make_posterior_fixtures.py), and the state version guards the reader."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_race import load_model, save_model
from ase_race.errors import ModelFileError
from ase_race.posteriors import Posterior, posterior_class

_spec = importlib.util.spec_from_file_location("make_posterior_fixtures", Path(__file__).with_name("make_posterior_fixtures.py"))
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

posterior_class("mve")  # imports the built-in posteriors, which registers their kinds
KINDS = sorted(Posterior._registry)
STORED = sorted(fixtures.OUT.glob("*.pt"))


def test_every_registered_kind_has_a_fixture_of_its_current_state_version():
    missing = [kind for kind in KINDS if not fixtures.fixture_path(kind).exists()]
    assert not missing, f"run: python tests/make_posterior_fixtures.py {' '.join(missing)}"


@pytest.mark.parametrize("path", STORED, ids=[p.stem for p in STORED])
def test_fixture_loads_and_predicts_what_it_did(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    got = fixtures.predictions(path)
    for key in fixtures.RESULTS:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=f"{path.name}: {key}")
    kind = path.stem.rsplit("-v", 1)[0]
    assert load_model(path).posterior.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_networks_round_trip_through_with_networks(kind, ethanol):
    """with_networks(networks()) rebuilds the same predictive; a wrong count is refused."""
    from ase_race.graph import from_atoms

    post = load_model(fixtures.fixture_path(kind)).posterior
    again = post.with_networks(post.networks())
    assert type(again) is type(post) and again is not post
    graph = from_atoms(ethanol, post.config.species, post.config.r_max, dtype=post.dtype)
    a, b = post.predict(graph), again.predict(graph)
    torch.testing.assert_close(a.forces_cov, b.forces_cov, rtol=0, atol=0)
    torch.testing.assert_close(a.energy_var, b.energy_var, rtol=0, atol=0)
    with pytest.raises(ValueError, match="networks"):
        post.with_networks(post.networks() * 2)


def test_a_newer_state_version_is_refused_with_both_numbers(tmp_path):
    post = load_model(fixtures.fixture_path("mve")).posterior
    path = save_model(tmp_path / "m.pt", post)
    data = torch.load(path, weights_only=True)
    data["posterior"]["version"] = 99
    torch.save(data, path)
    with pytest.raises(ModelFileError, match="m.pt: written by a newer ase-race.*layout version 99.*reads up to 1"):
        load_model(path)


def test_files_without_a_state_version_read_as_version_1(tmp_path):
    path = save_model(tmp_path / "m.pt", load_model(fixtures.fixture_path("swag")).posterior)
    data = torch.load(path, weights_only=True)
    del data["posterior"]["version"]
    torch.save(data, path)
    assert load_model(path).posterior.kind == "swag"
