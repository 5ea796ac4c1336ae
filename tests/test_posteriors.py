"""Posteriors: mixture rule, BALD, batched members = loop, SWAG moments, Laplace
against closed-form Bayesian linear regression, last-layer Jacobians, and every method's model
file served by the calculator."""

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from ase_race import RACECalculator, load_model, save_model
from ase_race.graph import from_atoms
from ase_race.posteriors import (
    EnsemblePosterior,
    LastLayerLaplacePosterior,
    SWAGPosterior,
    mix_scalar,
    mix_vector,
    mixture_prediction,
)
from ase_race.posteriors.bald import bald, bald_energy, bald_forces, gaussian_bald
from ase_race.posteriors.last_layer import last_layer_jacobians
from ase_race.posteriors.stacked import flat_parameters, unflatten
from ase_race.testing import random_posterior
from ase_race.training.methods.laplace import linear_evidence, optimise_prior_precision
from ase_race.training.methods.swag import SWAGCollector

SPECIES = (1, 6, 8, 14)


def members(n=3, dtype="float64"):
    return [random_posterior("tiny", seed=s, species=SPECIES, scale=2.0, dtype=dtype).model for s in range(n)]


# ---------------------------------------------------------------------------- mixture, BALD
def test_mixture_rule_hand_computed():
    means = torch.tensor([[1.0], [3.0]])
    variances = torch.tensor([[0.5], [1.5]])
    mean, ale, epi = mix_scalar(means, variances)
    assert mean.item() == 2.0 and ale.item() == 1.0 and epi.item() == 1.0  # var of {1, 3} (ddof 0)
    mu = torch.tensor([[[1.0, 0.0, 0.0]], [[-1.0, 2.0, 0.0]]])  # (M=2, n=1, 3)
    cov = torch.stack([torch.eye(3)[None], 3 * torch.eye(3)[None]])
    mean, ale, epi = mix_vector(mu, cov)
    assert torch.equal(mean, torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.equal(ale, 2 * torch.eye(3)[None])
    # deviations (1, −1, 0) and (−1, 1, 0): mean outer product [[1, −1, 0], [−1, 1, 0], 0]
    expected = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(epi[0], expected)


def _prediction(e_means, e_vars, f_covs):
    outputs = {
        "energy": torch.tensor(e_means, dtype=torch.float64)[:, None],
        "energy_var": torch.tensor(e_vars, dtype=torch.float64)[:, None],
        "node_energy": torch.zeros(len(e_means), 1, dtype=torch.float64),
        "forces": torch.zeros(len(e_means), 1, 3, dtype=torch.float64),
        "forces_cov": torch.tensor(f_covs, dtype=torch.float64)[:, None],
    }
    return mixture_prediction(outputs)


def test_bald_hand_computed():
    # Members: μ = 0, 2 with σ² = 1, 4 → total = 2.5 + 1 = 3.5; BALD_E = ½ln 3.5 − ¼(ln 1 + ln 4).
    p = _prediction([0.0, 2.0], [1.0, 4.0], [np.eye(3), 2 * np.eye(3)])
    assert bald_energy(p).item() == pytest.approx(0.5 * math.log(3.5) - 0.25 * math.log(4.0), abs=1e-14)
    # Equal force means: total covariance 1.5 I → ½ ln 1.5³ − ½ mean(ln 1, ln 8).
    assert bald_forces(p).item() == pytest.approx(1.5 * math.log(1.5) - 0.25 * math.log(8.0), abs=1e-14)
    assert bald(p, "both").item() == pytest.approx(bald_energy(p).item() + bald_forces(p).item())
    # Identical members carry no information about the weights.
    same = _prediction([1.0, 1.0], [2.0, 2.0], [np.eye(3), np.eye(3)])
    assert bald(same).item() == pytest.approx(0.0, abs=1e-14)
    assert gaussian_bald(torch.tensor(2.0), torch.tensor([2.0])).item() == 0.0


# ---------------------------------------------------------------------------- batched = loop
@pytest.mark.parametrize("periodic", [False, True])
def test_batched_members_equal_loop(periodic):
    atoms = bulk("Si", "diamond", a=5.43) if periodic else molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    ens = EnsemblePosterior(members(3))
    graph = from_atoms(atoms, SPECIES, ens.config.r_max, dtype=torch.float64)
    batched = ens.predict(graph, compute_stress=periodic)
    loop = ens.predict_loop(graph, compute_stress=periodic)
    ens._stacked.max_edges_per_pass = 1  # every member in its own plain pass
    one_by_one = ens.predict(graph, compute_stress=periodic)
    torch.testing.assert_close(one_by_one.forces_ensemble, loop.forces_ensemble, rtol=1e-12, atol=1e-15)
    # …and with edge chunking (activation checkpointing must recompute with each member's weights)
    chunked = ens.predict(graph, compute_stress=periodic, edge_chunk=7)
    assert graph["edge_index"].shape[1] > 7
    torch.testing.assert_close(chunked.forces_ensemble, loop.forces_ensemble, rtol=1e-12, atol=1e-15)
    if periodic:
        torch.testing.assert_close(chunked.stress, loop.stress, rtol=1e-12, atol=1e-15)
    # the members themselves are untouched by the working network
    assert all(torch.equal(a, b) for a, b in zip(ens.members[0].parameters(), members(3)[0].parameters()))
    names = ["energy", "energy_var_aleatoric", "energy_var_epistemic", "forces", "forces_cov_aleatoric",
             "forces_cov_epistemic", "forces_ensemble"] + (["stress", "stress_var_epistemic"] if periodic else [])
    for name in names:
        a, b = getattr(batched, name), getattr(loop, name)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * max(1.0, b.abs().max().item()), msg=name)
    assert batched.energy_var_epistemic.item() > 0 and batched.forces_cov_epistemic.abs().sum() > 0


def test_sampled_posterior_equals_loop_over_its_samples(ethanol):
    base = members(1)[0]
    n = flat_parameters(base).numel()
    gen = torch.Generator().manual_seed(0)
    swag = SWAGPosterior(base, flat_parameters(base).double() ** 2 + 1e-4, 1e-3 * torch.randn(4, n, generator=gen, dtype=torch.float64), n_samples=5)
    graph = from_atoms(ethanol, SPECIES, base.config.r_max, dtype=torch.float64)
    batched = swag.predict(graph)
    models = []
    for theta in swag.samples():
        model = random_posterior("tiny", species=SPECIES, scale=2.0, dtype="float64").model
        model.load_state_dict({**model.state_dict(), **unflatten(model, theta)})
        models.append(model)
    loop = EnsemblePosterior(models).predict_loop(graph)
    torch.testing.assert_close(batched.forces_ensemble, loop.forces_ensemble, rtol=1e-12, atol=1e-15)
    swag._stacked_model().max_edges_per_pass = 1  # sample by sample, with edge chunking
    chunked = swag.predict(graph, edge_chunk=7)
    torch.testing.assert_close(chunked.forces_ensemble, loop.forces_ensemble, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(batched.energy_var_epistemic, loop.energy_var_epistemic, rtol=1e-10, atol=1e-18)
    # Fixed samples: a second call (an MD step) sees the same potential.
    torch.testing.assert_close(swag.predict(graph).energy, batched.energy, rtol=0, atol=0)


# ---------------------------------------------------------------------------- SWAG
def test_swag_moments_exact():
    thetas = torch.tensor([[1.0, 2.0], [3.0, -2.0], [2.0, 0.0], [6.0, 4.0]], dtype=torch.float64)
    swag = SWAGCollector(2, rank=3)
    for t in thetas:
        swag.collect(t)
    assert swag.count == 4
    torch.testing.assert_close(swag.mean, thetas.mean(0))
    torch.testing.assert_close(swag.sq_mean, (thetas**2).mean(0))
    # The last 3 deviations, each from the running mean after its own snapshot.
    running = torch.stack([thetas[: k + 1].mean(0) for k in range(4)])
    torch.testing.assert_close(torch.stack(swag.deviations), (thetas - running)[1:])
    restored = SWAGCollector(2, rank=3)
    restored.load_state_dict(swag.state_dict())
    torch.testing.assert_close(torch.stack(restored.deviations), torch.stack(swag.deviations))


def test_swag_samples_have_the_swag_covariance():
    base = members(1)[0]
    n = flat_parameters(base).numel()
    gen = torch.Generator().manual_seed(1)
    mean = flat_parameters(base).double()
    sq_mean = mean**2 + torch.rand(n, generator=gen, dtype=torch.float64) * 1e-2
    dev = 0.1 * torch.randn(3, n, generator=gen, dtype=torch.float64)
    swag = SWAGPosterior(base, sq_mean, dev)
    samples = swag.draw(8000, torch.Generator().manual_seed(2))
    idx = torch.tensor([0, 5, 17])
    emp = torch.cov((samples[:, idx] - mean[idx]).T)
    exact = 0.5 * torch.diag(sq_mean[idx] - mean[idx] ** 2) + dev[:, idx].T @ dev[:, idx] / (2 * 2)
    torch.testing.assert_close(emp, exact, rtol=0.1, atol=5e-4)
    torch.testing.assert_close(samples.mean(0)[idx], mean[idx], rtol=0, atol=6e-3)


# ---------------------------------------------------------------------------- Laplace
def _linear_problem(n=40, p=4, sigma=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Orthogonal columns: XᵀX is diagonal, so a diagonal GGN is the exact Hessian.
    q, _ = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))
    x = q * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w_true = torch.tensor([1.0, -0.5, 0.2, 2.0], dtype=torch.float64)
    y = x @ w_true + sigma * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y, sigma


def _exact_log_evidence(x, y, alpha, sigma):
    n = x.shape[0]
    c = sigma**2 * torch.eye(n, dtype=x.dtype) + x @ x.T / alpha
    return float(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=x.dtype), c).log_prob(y))


class _Batches(list):
    """(x, y) batches with the ``dataset`` laplace-torch reads (a DataLoader would draw its
    base seed from torch's global generator)."""

    def __init__(self, x, y, size):
        super().__init__((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))
        self.dataset = x


def test_laplace_torch_backend_matches_bayesian_linear_regression():
    from laplace import DiagLaplace

    from ase_race.training.methods.laplace import _energy_ggn_backend

    x, y, sigma = _linear_problem()
    alpha = 0.7
    a = x.T @ x / sigma**2 + alpha * torch.eye(4, dtype=x.dtype)
    w_map = torch.linalg.solve(a, x.T @ y / sigma**2)
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its initial weights globally
        model = torch.nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_map[None])
    la = DiagLaplace(model, "regression", sigma_noise=sigma, prior_precision=alpha, backend=_energy_ggn_backend())
    la.fit(_Batches(x, y[:, None], 7))
    torch.testing.assert_close(la.posterior_variance, torch.diagonal(torch.linalg.inv(a)), rtol=1e-12, atol=0)
    # For a linear model the Laplace evidence at the MAP is exact.
    assert float(la.log_marginal_likelihood()) == pytest.approx(_exact_log_evidence(x, y, alpha, sigma), rel=1e-10)


def test_last_layer_laplace_evidence_matches_bayesian_linear_regression():
    x, y, sigma = _linear_problem()
    gram = x.T @ x / sigma**2

    def w_map(alpha):
        return torch.linalg.solve(gram + alpha * torch.eye(4, dtype=x.dtype), x.T @ y / sigma**2)

    def laplace_log_z(alpha):
        w = w_map(alpha)
        fit = -0.5 * float(((y - x @ w) ** 2).sum()) / sigma**2
        return fit + float(linear_evidence(gram, w, math.log(alpha)))

    # Equal to the exact evidence up to a constant free of α.
    diffs = [laplace_log_z(a) - _exact_log_evidence(x, y, a, sigma) for a in (0.1, 1.0, 10.0)]
    assert max(diffs) - min(diffs) < 1e-9
    # MacKay's fixed point with the weights held at a given w maximises linear_evidence.
    w = w_map(1.0)
    best = optimise_prior_precision(gram, w)
    grid = torch.logspace(-3, 3, 2001, dtype=torch.float64)
    values = torch.stack([linear_evidence(gram, w, g.log()) for g in grid])
    assert best == pytest.approx(float(grid[values.argmax()]), rel=1e-2)


def test_last_layer_jacobians_match_autograd_and_finite_differences(ethanol):
    model = random_posterior("small", seed=7, species=(1, 6, 8), scale=2.0, dtype="float64").model
    graph = from_atoms(ethanol, model.config.species, model.config.r_max, dtype=torch.float64)
    out, jac_e, jac_f, _ = last_layer_jacobians(model, graph)
    # J_E = ∂E/∂w with w the readouts' weights onto the energy channel.
    energy = model(graph, compute_forces=False)["energy"].sum()
    grads = torch.autograd.grad(energy, [r.second.weight for r in model.readouts])
    auto = torch.cat([g[: r.n_hidden * r.irreps_out[0].mul].view(r.n_hidden, -1)[:, 0] for g, r in zip(grads, model.readouts)])
    torch.testing.assert_close(jac_e[0], auto, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["forces"], model(graph)["forces"].detach(), rtol=1e-12, atol=1e-14)
    # J_F = −∂J_E/∂r by central differences, for a few atoms and directions.
    for atom, axis in [(0, 0), (3, 1), (8, 2)]:
        shifted = []
        for sign in (1, -1):
            moved = ethanol.copy()
            moved.positions[atom, axis] += sign * 1e-5
            g = from_atoms(moved, model.config.species, model.config.r_max, dtype=torch.float64)
            shifted.append(last_layer_jacobians(model, g)[1][0])
        fd = -(shifted[0] - shifted[1]) / 2e-5
        torch.testing.assert_close(jac_f[:, atom, axis], fd, rtol=1e-6, atol=1e-9)


def test_last_layer_variances_are_the_jacobian_sandwich(ethanol):
    model = random_posterior("small", seed=7, species=(1, 6, 8), scale=2.0, dtype="float64").model
    p = model.last_layer_weights().numel()
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    cov = a @ a.T / p
    graph = from_atoms(ethanol, model.config.species, model.config.r_max, dtype=torch.float64)
    pred = LastLayerLaplacePosterior(model, cov).predict(graph)
    _, jac_e, jac_f, _ = last_layer_jacobians(model, graph)
    torch.testing.assert_close(pred.energy_var_epistemic, torch.einsum("bp,pq,bq->b", jac_e, cov, jac_e))
    torch.testing.assert_close(pred.forces_cov_epistemic, torch.einsum("pni,pq,qnj->nij", jac_f, cov, jac_f))
    # A low-rank force covariance keeps the largest directions: a lower bound, exact at full rank.
    low = LastLayerLaplacePosterior(model, cov, force_rank=4).predict(graph).forces_cov_epistemic
    gap = torch.linalg.eigvalsh(pred.forces_cov_epistemic - low)
    assert gap.min() > -1e-12


def test_force_informed_basis_keeps_more_force_variance(ethanol, tmp_path):
    from ase_race.modelfile import load_model, save_model

    model = random_posterior("small", seed=7, species=(1, 6, 8), scale=2.0, dtype="float64").model
    p = model.last_layer_weights().numel()
    a = torch.randn(p, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cov = a @ a.T / p
    graphs = []
    for k in range(3):
        atoms = ethanol.copy()
        atoms.rattle(0.05, seed=k)
        graphs.append(from_atoms(atoms, model.config.species, model.config.r_max, dtype=torch.float64))
    exact = [LastLayerLaplacePosterior(model, cov).predict(g).forces_cov_epistemic for g in graphs]

    def kept(post):
        covs = [post.predict(g).forces_cov_epistemic for g in graphs]
        for c, e in zip(covs, exact):  # a lower bound of the exact covariance, atom by atom
            assert torch.linalg.eigvalsh(e - c).min() > -1e-10
        return float(sum(torch.diagonal(c, dim1=1, dim2=2).sum() for c in covs)
                     / sum(torch.diagonal(e, dim1=1, dim2=2).sum() for e in exact))

    informed = LastLayerLaplacePosterior(model, cov)
    share = informed.fit_force_basis(graphs, 4)
    assert informed.force_rank == 4 and kept(informed) == pytest.approx(share, rel=1e-9)
    # The optimum of the trace over rank-4 bases: at least what Σ's own leading directions keep.
    assert share >= kept(LastLayerLaplacePosterior(model, cov, force_rank=4)) - 1e-12
    # All P directions: exact again.
    full = LastLayerLaplacePosterior(model, cov)
    assert full.fit_force_basis(graphs, p) == pytest.approx(1.0)
    for g, e in zip(graphs, exact):
        torch.testing.assert_close(full.predict(g).forces_cov_epistemic, e)
    # The basis travels in the model file; set_force_rank returns to Σ's eigen-directions.
    loaded = load_model(save_model(tmp_path / "llla.pt", informed)).posterior
    assert loaded.force_rank == 4
    torch.testing.assert_close(loaded.predict(graphs[0]).forces_cov_epistemic, informed.predict(graphs[0]).forces_cov_epistemic)
    loaded.set_force_rank(4)
    assert loaded.force_basis is None and "force_basis" not in loaded.state_dict()


# ---------------------------------------------------------------------------- every method, end to end
TINY = {"num_features": 4, "hidden_irreps": "4x0e+4x1o", "sh_lmax": 1, "radial_mlp": [8], "readout_hidden": 4, "dtype": "float64"}
METHODS = {
    "ensemble": dict(method="ensemble", ensemble={"members": 3}),
    "swag": dict(method="swag", swag={"start_epoch": 15, "rank": 4}),
    "ivon": dict(method="ivon"),
    "laplace": dict(method="laplace"),
    "last_layer_laplace": dict(method="laplace", laplace={"subset": "last_layer"}),
    "novelty": dict(method="novelty"),
}


def _dimer(d):
    return Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, d]])


@pytest.fixture(scope="module")
def dimer_file(tmp_path_factory):
    """H2 with EMT labels at bond lengths 0.7–0.9 Å: learnable in seconds, with an obvious outside."""
    from ase.calculators.emt import EMT
    from ase.io import write

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(20):
        atoms = _dimer(rng.uniform(0.7, 0.9))
        atoms.rotate(rng.uniform(0, 180), rng.normal(size=3))
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    path = tmp_path_factory.mktemp("data") / "h2.extxyz"
    write(path, frames, format="extxyz")
    return path


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_method_trains_saves_and_serves_epistemic_uncertainty(kind, dimer_file, tmp_path):
    from ase_race.training import TrainConfig
    from ase_race.training import train

    settings = dict(
        train_file=str(dimer_file), e0s={"H": 0.0}, valid_fraction=4, preset="tiny", model=TINY, loss="nll_jef",
        warmup_epochs=5, batch_size=4, max_epochs=25, lr=0.02, output_dir=str(tmp_path / kind), seed=3,
    )
    path = train(TrainConfig(**{**settings, **METHODS[kind]}))
    bundle = load_model(path)
    assert bundle.posterior.kind == kind
    # The file round-trips: a re-saved copy predicts exactly what the loaded posterior predicts.
    again = load_model(save_model(tmp_path / "again.pt", bundle.posterior, metadata=bundle.metadata))
    graph = from_atoms(_dimer(0.8), bundle.config.species, bundle.config.r_max, dtype=torch.float64)
    torch.testing.assert_close(again.posterior.predict(graph).forces, bundle.posterior.predict(graph).forces, rtol=0, atol=0)

    calc = RACECalculator(path)

    def epistemic(d):
        atoms = _dimer(d)
        atoms.calc = calc
        atoms.get_potential_energy()
        return dict(calc.results)

    near = epistemic(0.8)
    assert near["energy_var_epistemic"] > 0 and near["forces_var_epistemic"].sum() > 0
    assert near["bald"] > 0 and near["bald"] == pytest.approx(near["bald_energy"] + near["bald_forces"])
    if bundle.posterior.provides_ensemble:
        assert calc.get_property("energy_ensemble").shape == (bundle.posterior.n_samples_or_members,)
    # Squeezed to 0.55 Å, a bond length never seen in training, the weights disagree more.
    far = epistemic(0.55)
    assert far["forces_var_epistemic"].sum() > 2 * near["forces_var_epistemic"].sum()


def _trainer(config_kw, dimer_file, out):
    from ase_race.training import TrainConfig
    from ase_race.training.api import prepare
    from ase_race.training.batches import GraphDataset
    from ase_race.training.loop import Trainer
    from ase_race.training.methods import method_class

    settings = dict(
        train_file=str(dimer_file), e0s={"H": 0.0}, valid_fraction=4, preset="tiny", model=TINY, loss="nll_jef",
        warmup_epochs=1, batch_size=4, max_epochs=2, lr=0.02, output_dir=str(out), seed=5,
    )
    cfg = TrainConfig(**{**settings, **config_kw})
    model_config, train_frames, valid_frames = prepare(cfg)
    sets = [GraphDataset(f, model_config.species, model_config.r_max, torch.float64) for f in (train_frames, valid_frames)]
    return cfg, Trainer(cfg, model_config, *sets, hooks=method_class(cfg.method).hooks(cfg))


def test_ivon_posterior_is_the_optimiser_state_and_survives_the_file(dimer_file, tmp_path):
    from ase_race.training.methods import method_class

    # IVON from the first step: the hand-run Trainer below is the whole run
    cfg, trainer = _trainer({"method": "ivon", "ivon": {"warm_start": 0}}, dimer_file, tmp_path / "run")
    trainer.run()
    group = trainer.optimizer.param_groups[0]
    # The method's fit resumes the finished run from its checkpoint and exports the optimiser's state.
    fitted = method_class("ivon")().fit(cfg, trainer.model_config, trainer.train_set, trainer.valid_set)
    post = fitted.posterior
    torch.testing.assert_close(post.variance, 1.0 / (group["ess"] * (group["hess"].double() + group["weight_decay"])))
    torch.testing.assert_close(flat_parameters(post.model), flat_parameters(trainer.best_model()), rtol=0, atol=0)
    assert group["ess"] == sum(len(f.atoms) for f in trainer.train_set.frames)
    loaded = load_model(save_model(tmp_path / "ivon.pt", post)).posterior
    assert loaded.kind == "ivon" and loaded.hyper == post.hyper
    torch.testing.assert_close(loaded.variance, post.variance, rtol=0, atol=0)
    torch.testing.assert_close(loaded.samples(), post.samples(), rtol=0, atol=0)


def test_ivon_warm_start_is_amsgrad_then_ivon_from_its_best_weights(dimer_file, tmp_path):
    from ase_race.errors import ConfigError
    from ase_race.training.loop import Trainer, TrainingHooks
    from ase_race.training.methods import method_class

    cfg, trainer = _trainer({"method": "ivon", "ivon": {"warm_start": 2}, "max_epochs": 3}, dimer_file,
                            tmp_path / "run")
    fitted = method_class("ivon")().fit(cfg, trainer.model_config, trainer.train_set, trainer.valid_set)
    assert fitted.summary["epochs"] == [2, 1]
    warm = torch.load(tmp_path / "run" / "warm_start" / "checkpoint.pt", weights_only=True)
    assert warm["epoch"] == 2 and "exp_avg" in next(iter(warm["optimizer"]["state"].values()))  # Adam's state
    # By hand: the same AMSGrad run, then IVON for the last epoch from its best (EMA) weights,
    # with the mean-only warm-up (1 epoch) already spent.
    sets = (trainer.train_set, trainer.valid_set)
    first = Trainer(cfg.replace(max_epochs=2, output_dir=str(tmp_path / "hand" / "warm")), trainer.model_config, *sets,
                    hooks=TrainingHooks())
    first.run()
    rest = cfg.replace(max_epochs=1, warmup_epochs=0, output_dir=str(tmp_path / "hand"))
    second = Trainer(rest, trainer.model_config, *sets, hooks=method_class("ivon").hooks(rest),
                     initial_weights=first.best_model().state_dict())
    second.run()
    torch.testing.assert_close(flat_parameters(fitted.posterior.model), flat_parameters(second.best_model()), rtol=0,
                               atol=0)
    hess = second.optimizer.param_groups[0]["hess"]
    assert not torch.allclose(hess, torch.full_like(hess, cfg.ivon.hess_init))  # IVON did step
    # A rerun trains nothing more (both phases come from their checkpoints) and gives the same posterior.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", no_training)
        again = method_class("ivon")().fit(cfg, trainer.model_config, *sets)
    assert again.summary == fitted.summary
    torch.testing.assert_close(again.posterior.variance, fitted.posterior.variance, rtol=0, atol=0)
    # The warm start does not depend on IVON's options: a sweep of them reuses it.
    import shutil

    swept = cfg.replace(ivon={"ess": 123.0}, output_dir=str(tmp_path / "swept"))
    shutil.copytree(tmp_path / "run" / "warm_start", tmp_path / "swept" / "warm_start")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        step = Trainer.train_step
        patch.setattr(Trainer, "train_step", lambda self, *a: calls.append(self.config.method) or step(self, *a))
        method_class("ivon")().fit(swept, trainer.model_config, *sets)
    assert calls and set(calls) == {"ivon"}  # only the IVON phase trained
    # A warm start stopped by max_time_s leaves IVON's initial posterior around its weights; a
    # rerun without the limit finishes both phases where the whole run would have.
    short = cfg.replace(max_time_s=1e-9, output_dir=str(tmp_path / "short"))
    stopped = method_class("ivon")().fit(short, trainer.model_config, *sets)
    assert stopped.summary["epochs"] == 1
    ess = sum(len(f.atoms) for f in trainer.train_set.frames)
    expected = 1.0 / (ess * (cfg.ivon.hess_init + cfg.ivon.weight_decay))
    torch.testing.assert_close(stopped.posterior.variance, torch.full_like(stopped.posterior.variance, expected))
    resumed = method_class("ivon")().fit(short.replace(max_time_s=0), trainer.model_config, *sets)
    assert resumed.summary["epochs"] == [2, 1]
    torch.testing.assert_close(flat_parameters(resumed.posterior.model), flat_parameters(fitted.posterior.model),
                               rtol=0, atol=0)
    torch.testing.assert_close(resumed.posterior.variance, fitted.posterior.variance, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="warm_start \\(3 epochs\\) must be below max_epochs \\(3\\)"):
        method_class("ivon")().fit(cfg.replace(ivon=cfg.ivon.__class__(warm_start=3)), trainer.model_config, *sets)


def test_ivon_warm_start_counts_or_fractions_of_max_epochs():
    from ase_race.errors import ConfigError
    from ase_race.training.methods.ivon import IVONOptions

    assert IVONOptions().warm_start_epochs(60) == 45  # the default: three quarters
    assert IVONOptions(warm_start=0.5).warm_start_epochs(7) == 3  # rounded down
    assert IVONOptions().warm_start_epochs(1) == 0 and IVONOptions().warm_start_epochs(2) == 1  # IVON keeps ≥ 1
    assert IVONOptions(warm_start=10).warm_start_epochs(60) == 10 and IVONOptions(warm_start=0).warm_start_epochs(9) == 0
    for bad in (-1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="ivon.warm_start must be"):
            IVONOptions(warm_start=bad)


def test_earlier_configs_with_ivon_warm_start_epochs_still_read():
    from ase_race.errors import ConfigError
    from ase_race.training import TrainConfig

    # What an earlier release's to_dict() wrote, and so what its checkpoints hold, whatever the method.
    earlier = TrainConfig(method="ensemble").to_dict()
    earlier["ivon"] = {k: v for k, v in earlier["ivon"].items() if k != "warm_start"} | {"warm_start_epochs": 0}
    with pytest.warns(FutureWarning, match="IVONOptions: option .warm_start_epochs. is deprecated"):
        config = TrainConfig.from_dict(earlier)
    assert config.ivon.warm_start == 0 and config.ivon.warm_start_epochs(20) == 0  # IVON from scratch, as then
    earlier["ivon"]["warm_start"] = 5
    with pytest.raises(ConfigError, match="'warm_start' only"):
        TrainConfig.from_dict(earlier)
    # The warning names the caller's line, not the package's.
    with pytest.warns(FutureWarning) as caught:
        TrainConfig(ivon={"warm_start_epochs": 3})
    assert caught[0].filename == __file__
    # An option given on top of an old config wins, under either name.
    with pytest.warns(FutureWarning):
        assert config.replace(ivon={"warm_start_epochs": 4}).ivon.warm_start == 4
    assert config.replace(ivon={"warm_start": 6}).ivon.warm_start == 6


def test_an_override_wins_over_an_earlier_option_name_in_the_yaml(tmp_path):
    from ase_race.training import TrainConfig

    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("method: ivon\nivon:\n  warm_start_epochs: 10\n")
    new.write_text("method: ivon\nivon:\n  warm_start: 7\n")
    assert TrainConfig.from_yaml(str(old), ["ivon.warm_start=5"]).ivon.warm_start == 5
    with pytest.warns(FutureWarning):
        assert TrainConfig.from_yaml(str(old)).ivon.warm_start == 10
        assert TrainConfig.from_yaml(str(new), ["ivon.warm_start_epochs=3"]).ivon.warm_start == 3


@pytest.mark.parametrize("method", ["ivon", "swag"])
def test_interrupted_ivon_and_swag_runs_resume_exactly(method, dimer_file, tmp_path):
    extra = {"method": method, "swag": {"start_epoch": 0, "rank": 2}, "max_epochs": 3}
    _, whole = _trainer(extra, dimer_file, tmp_path / "whole")
    whole.run()
    _, first = _trainer(extra, dimer_file, tmp_path / "split")
    first.run(max_steps=5)  # stops mid-epoch 1
    first.save_checkpoint()
    _, second = _trainer(extra, dimer_file, tmp_path / "split")
    second.run()
    torch.testing.assert_close(flat_parameters(second.model), flat_parameters(whole.model), rtol=0, atol=0)
    if method == "ivon":
        torch.testing.assert_close(second.optimizer.param_groups[0]["hess"], whole.optimizer.param_groups[0]["hess"], rtol=0, atol=0)
    else:
        deviations = [torch.stack(t.hooks.collector.deviations) for t in (second, whole)]
        torch.testing.assert_close(*deviations, rtol=0, atol=0)


def test_mse_ensemble_has_finite_bald_and_only_epistemic_variance(ethanol):
    ens = EnsemblePosterior(members(3), aleatoric=False)
    graph = from_atoms(ethanol, SPECIES, ens.config.r_max, dtype=torch.float64)
    p = ens.predict(graph)
    eps = ens.config.cov_eps
    assert torch.allclose(p.energy_var_aleatoric, torch.full_like(p.energy_var_aleatoric, eps))
    assert torch.isfinite(bald(p)).all() and bald(p).item() > 0
    # BALD_E = ½ log(1 + epistemic/floor) for a floored, otherwise noise-free ensemble.
    assert bald_energy(p).item() == pytest.approx(0.5 * math.log1p(p.energy_var_epistemic.item() / eps), rel=1e-9)


def test_diverged_training_stops_with_a_clear_error(dimer_file, tmp_path):
    from ase_race.errors import TrainingError

    cfg, trainer = _trainer({"method": "ivon", "ivon": {"lr": 1e30, "clip_radius": 1e30}, "checkpoint_every": 1},
                            dimer_file, tmp_path / "run")
    with pytest.raises(TrainingError, match="diverged in epoch 0.*'ivon', learning rate 1e\\+30"):
        trainer.run()
    if trainer.checkpoint_path.exists():  # only checkpoints of finite weights were written
        saved = torch.load(trainer.checkpoint_path, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
