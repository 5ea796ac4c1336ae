"""The novelty posterior: distances, the variance model, its fit, the file, and the calculator."""

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from ase_race import RACECalculator, load_model, save_model
from ase_race import _keys as K
from ase_race.config import ModelConfig
from ase_race.graph import batch_graphs, from_atoms
from ase_race.posteriors import MVEPosterior, NoveltyPosterior
from ase_race.posteriors.novelty import PARAMETERS
from ase_race.testing import random_model
from ase_race.training.batches import GraphDataset
from ase_race.training.methods.novelty import (
    CalibrationTerms, energy_nll, farthest_points, fit_novelty, fit_scales, forces_nll, joined,
)

from conftest import emt_frames

PARAMS = dict(energy_aleatoric=0.5, energy_scale=2.0, energy_width=3.0, energy_power=4.0, energy_bond=0.3,
              forces_aleatoric=0.8, forces_scale=1.5, forces_width=2.0, forces_power=6.0, forces_bond=0.7)


def _frames_to_dataset(frames, config):
    from ase_race.data.readers import frame_from_atoms

    return GraphDataset([frame_from_atoms(a, source=f"frame {k}") for k, a in enumerate(frames)],
                        config.species, config.r_max, torch.float64)


@pytest.fixture(scope="module")
def fitted():
    config = ModelConfig.from_preset("tiny", species=(1, 6, 8), e0s=(-13.6, -1025.3, -2035.6), dtype="float64",
                                     isolated_limit=0.5, max_log_var=0.0)
    model = random_model(config, seed=5)
    frames = emt_frames(16, seed=1)
    train, valid = _frames_to_dataset(frames[:12], config), _frames_to_dataset(frames[12:], config)
    return fit_novelty(model, train, valid), train


def test_training_atoms_are_at_distance_zero_and_strangers_far(fitted):
    posterior, train = fitted
    graph = train.graphs[0]
    features = posterior.model.outputs(graph, graph[K.POSITIONS], None, last_layer_features=True)[K.FEATURES]
    delta = posterior.novelty(features, graph[K.SPECIES])
    torch.testing.assert_close(delta, torch.zeros_like(delta), atol=1e-5, rtol=0)  # each training atom is a reference
    calc = RACECalculator(posterior)

    def epistemic(atoms):
        atoms.calc = calc
        atoms.get_potential_energy()
        return calc.results["energy_var_epistemic"], calc.results["forces_var_epistemic"]

    near = epistemic(molecule("H2O"))
    lone = epistemic(Atoms("O"))
    squeezed = epistemic(Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.55]]))
    assert lone[0] > near[0] and squeezed[0] > near[0]
    assert lone[1].sum() > near[1].sum()


def test_forces_are_the_networks_and_variances_follow_the_formula(fitted):
    posterior, _ = fitted
    floor = torch.tensor([3.0, 3.5, 2.5], dtype=torch.float64)  # some atoms below: a deficit
    posterior = NoveltyPosterior(posterior.model, posterior.mean, posterior.spread, posterior.references,
                                 posterior.radius, floor, PARAMS)
    atoms = molecule("CH3OH")
    atoms.rattle(0.1, seed=2)
    atoms.positions[5] += [0.0, 0.0, -1.5]  # one hydrogen pulled off
    graph = from_atoms(atoms, (1, 6, 8), posterior.config.r_max, dtype=torch.float64)
    pred = posterior.predict(graph)
    mve = MVEPosterior(posterior.model).predict(graph)
    torch.testing.assert_close(pred.forces, mve.forces, rtol=0, atol=0)
    torch.testing.assert_close(pred.energy, mve.energy, rtol=0, atol=0)
    torch.testing.assert_close(pred.energy_var_aleatoric, 0.5 * mve.energy_var_aleatoric)
    torch.testing.assert_close(pred.forces_cov_aleatoric, 0.8 * mve.forces_cov_aleatoric)
    features = posterior.model.outputs(graph, graph[K.POSITIONS], None, last_layer_features=True)[K.FEATURES]
    delta = posterior.novelty(features, graph[K.SPECIES]).numpy()
    r = atoms.get_all_distances()
    x = r / posterior.config.r_max
    envelope = np.where(x < 1, 1 - 28 * x**6 + 48 * x**7 - 21 * x**8, 0.0)  # u(r/r_c), p = 6
    np.fill_diagonal(envelope, 0.0)
    deficit = np.maximum(0.0, floor.numpy()[graph[K.SPECIES].numpy()] - envelope.sum(1))
    assert deficit.max() > 0.1
    e = 2.0 * np.tanh((delta / 3.0) ** 4) + 0.3 * deficit
    v = (1.5 * np.tanh((delta / 2.0) ** 6)) ** 2 + (0.7 * deficit) ** 2
    assert float(pred.energy_var_epistemic[0]) == pytest.approx(e.sum() ** 2, rel=1e-10)
    expected = v + envelope @ v  # own term plus every neighbour's, weighted by u
    np.testing.assert_allclose(np.diagonal(pred.forces_cov_epistemic.numpy(), axis1=1, axis2=2), np.stack([expected] * 3, 1), rtol=1e-10)


def test_batched_prediction_equals_the_loop_and_the_file_round_trips(fitted, tmp_path):
    posterior, _ = fitted
    structures = [molecule("H2O"), molecule("CH4"), Atoms("O")]
    graphs = [from_atoms(a, (1, 6, 8), posterior.config.r_max, dtype=torch.float64) for a in structures]
    batched = posterior.predict(batch_graphs(graphs))
    loop = [posterior.predict(g) for g in graphs]
    torch.testing.assert_close(batched.energy_var_epistemic, torch.cat([p.energy_var_epistemic for p in loop]))
    torch.testing.assert_close(batched.forces_cov_epistemic, torch.cat([p.forces_cov_epistemic for p in loop]))
    loaded = load_model(save_model(tmp_path / "novelty.pt", posterior)).posterior
    assert loaded.kind == "novelty" and loaded.parameters == posterior.parameters
    again = loaded.predict(batch_graphs(graphs))
    for name in ("energy", "energy_var_epistemic", "forces_cov_epistemic", "forces"):
        torch.testing.assert_close(getattr(again, name), getattr(batched, name), rtol=0, atol=0)


def test_farthest_points_are_deterministic_and_cover_the_extremes():
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [5.0, 5.0], [9.9, 0.1]], dtype=torch.float64)
    chosen = farthest_points(x, 3)
    assert torch.equal(chosen, farthest_points(x, 3))
    assert set(chosen.tolist()) == {0, 1, 3} or set(chosen.tolist()) == {4, 0, 3}
    assert torch.equal(farthest_points(x, 9), torch.arange(5))


def _terms(n_struct=2):
    # two structures of 2 and 1 atoms; atoms 0 and 1 are neighbours with weight 0.5
    return CalibrationTerms(
        energy_error=torch.tensor([0.3, -1.0], dtype=torch.float64),
        energy_var=torch.tensor([0.04, 0.01], dtype=torch.float64),
        delta=torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64),
        deficit=torch.tensor([0.0, 1.5, 0.2], dtype=torch.float64),
        batch=torch.tensor([0, 0, 1]),
        force_error=torch.tensor([[0.1, 0.0, 0.0], [0.0, -0.2, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64),
        force_cov=torch.eye(3, dtype=torch.float64).repeat(3, 1, 1) * 0.01,
        edges=torch.tensor([[0, 1], [1, 0]]),
        edge_weight=torch.tensor([0.5, 0.5], dtype=torch.float64),
    )


def _theta(f, a, p, w, b):
    return torch.tensor([math.log(f), math.log(a), math.log(p / (12.0 - p)), math.log(w), math.log(b)], dtype=torch.float64)


def test_likelihoods_against_hand_computed_values():
    t = _terms()
    f, a, p, w, b = 2.0, 0.3, 3.0, 1.5, 0.4
    m = (0.0, 1.5, 0.2)
    g = [a * math.tanh((d / w) ** p) + b * mi for d, mi in zip((0.5, 2.0, 4.0), m)]
    v = [f * 0.04 + (g[0] + g[1]) ** 2, f * 0.01 + g[2] ** 2]
    expected = np.mean([0.5 * (math.log(2 * math.pi * vb) + e**2 / vb) for vb, e in zip(v, (0.3, -1.0))])
    assert float(energy_nll(t, _theta(f, a, p, w, b))) == pytest.approx(expected, rel=1e-10)
    own = [(a * math.tanh((d / w) ** p)) ** 2 + (b * mi) ** 2 for d, mi in zip((0.5, 2.0, 4.0), m)]
    var = [own[0] + 0.5 * own[1], own[1] + 0.5 * own[0], own[2]]
    errors = [(0.1, 0.0, 0.0), (0.0, -0.2, 0.0), (1.0, 1.0, 0.0)]
    per_atom = [0.5 * (3 * math.log(2 * math.pi * (f * 0.01 + s + 1e-12)) + sum(c**2 for c in e) / (f * 0.01 + s + 1e-12))
                for s, e in zip(var, errors)]
    assert float(forces_nll(t, _theta(f, a, p, w, b))) == pytest.approx(np.mean(per_atom), rel=1e-10)
    both = joined(t, t)
    assert both.batch.tolist() == [0, 0, 1, 2, 2, 3] and both.edges.tolist() == [[0, 1, 3, 4], [1, 0, 4, 3]]
    assert float(energy_nll(both, _theta(f, a, p, w, b))) == pytest.approx(expected, rel=1e-10)


def test_the_fit_recovers_the_scales_that_generated_the_errors():
    rng = np.random.default_rng(0)
    n = 3000
    delta = torch.tensor(np.exp(rng.uniform(np.log(0.2), np.log(30.0), n)))
    deficit = torch.tensor(np.where(rng.uniform(size=n) < 0.3, rng.uniform(0, 5, n), 0.0))
    truth = dict(f=0.3, a=1.2, p=4.0, w=4.0, b=0.5)
    g = truth["a"] * torch.tanh((delta / truth["w"]) ** truth["p"])
    ale = torch.full((n,), 1e-4, dtype=torch.float64)
    std = torch.sqrt(truth["f"] * ale + (g + truth["b"] * deficit) ** 2)
    force_std = torch.sqrt(truth["f"] * ale + g**2 + (truth["b"] * deficit) ** 2)
    terms = CalibrationTerms(
        energy_error=std * torch.tensor(rng.normal(size=n)), energy_var=ale, delta=delta, deficit=deficit,
        batch=torch.arange(n), force_error=force_std[:, None] * torch.tensor(rng.normal(size=(n, 3))),
        force_cov=ale[:, None, None] * torch.eye(3, dtype=torch.float64), edges=torch.zeros(2, 0, dtype=torch.long),
        edge_weight=torch.zeros(0, dtype=torch.float64),
    )
    fit = fit_scales(terms)
    assert set(fit) == set(PARAMETERS)
    for q in ("energy", "forces"):
        assert fit[f"{q}_aleatoric"] == pytest.approx(truth["f"], rel=0.2)
        assert fit[f"{q}_scale"] == pytest.approx(truth["a"], rel=0.15)
        assert fit[f"{q}_width"] == pytest.approx(truth["w"], rel=0.2)
        assert fit[f"{q}_power"] == pytest.approx(truth["p"], rel=0.25)
        assert fit[f"{q}_bond"] == pytest.approx(truth["b"], rel=0.15)


def test_invalid_state_is_refused_with_the_file_named(fitted, tmp_path):
    from ase_race.errors import ModelFileError

    posterior, _ = fitted
    path = save_model(tmp_path / "good.pt", posterior)
    data = torch.load(path, weights_only=True)
    for key, value in (("radius", torch.full((3,), math.inf, dtype=torch.float64)),
                       ("mean", torch.full_like(posterior.mean, math.nan))):
        bad = {**data, "posterior": {**data["posterior"], "state": {**data["posterior"]["state"], key: value}}}
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ModelFileError, match=f"bad.pt.*{key}"):
            load_model(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="energy_width"):
        NoveltyPosterior(posterior.model, posterior.mean, posterior.spread, posterior.references, posterior.radius,
                         posterior.floor, {**PARAMS, "energy_width": 0.0})


def test_without_validation_atoms_the_radius_comes_from_the_training_atoms_themselves():
    from ase_race.training.methods.novelty import environment_statistics

    rng = np.random.default_rng(3)
    train = [torch.tensor(rng.normal(size=(40, 4)))]
    _, _, references, radius = environment_statistics(train, [torch.zeros(0, 4, dtype=torch.float64)], 100, 0.95)
    assert references[0].shape == (40, 4) and 0.3 < float(radius[0]) < 5.0  # not the 1e-6 of all-zero distances
