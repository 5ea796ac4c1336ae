"""Post-hoc Laplace posteriors around a trained network (docs/posteriors/laplace.md).

* :func:`fit_last_layer_laplace` (``subset: last_layer``): closed form over the last-layer
  energy weights, with a generalised Gauss–Newton (GGN) from energies *and* forces.
* :func:`fit_diag_laplace` (``subset: all``): the paper's variant through ``laplace-torch``:
  every weight, diagonal GGN on energies, prior precision and noise by marginal likelihood.

The network is ``base_model`` (a model file) or, without one, an MVE network trained first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ... import _keys as K
from ...errors import ConfigError
from ...nn import RACE
from ...posteriors.last_layer import LastLayerLaplacePosterior, last_layer_jacobians
from ..batches import GraphDataset
from .base import Fitted, Method, MethodOptions, base_network

log = logging.getLogger("ase_race.training")

SUBSETS = ("all", "last_layer")
NOISE = ("residual", "marglik")


@dataclass(frozen=True)
class LaplaceOptions(MethodOptions):
    """Options of ``method: laplace``.

    Attributes:
        subset: ``all`` (diagonal GGN over every weight, with laplace-torch) or ``last_layer``
            (the closed-form last-layer Laplace with force Jacobians).
        prior_precision: α; 0 = by marginal likelihood.
        noise: all-weight Laplace only: ``residual`` fixes the energy noise σ to the RMS
            training residual; ``marglik`` fits it by marginal likelihood as the paper does
            (on rMD17 ethanol it collapses to σ ≈ 3 eV, see docs/posteriors/laplace.md).
        base_model: a model file to fit around instead of training an MVE network first.
        test_samples: weight samples at prediction time of the all-weight variant (0 = 16).
    """

    subset: str = "all"
    prior_precision: float = 0.0
    noise: str = "residual"
    base_model: str = ""
    test_samples: int = 0

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise ConfigError(f"laplace.subset={self.subset!r} is not one of {SUBSETS}")
        if self.noise not in NOISE:
            raise ConfigError(f"laplace.noise={self.noise!r} is not one of {NOISE}")


def linear_evidence(gram: torch.Tensor, w: torch.Tensor, log_alpha: torch.Tensor | float) -> torch.Tensor:
    """Laplace log evidence of a linear-Gaussian model, up to terms free of the prior.

    With data precision already folded into ``gram`` (G = Σ_n J_nᵀ Λ_n J_n) and the MAP
    weights ``w`` (P,), the prior N(0, α⁻¹ I) gives

        log Z(α) = −½ α‖w‖² + ½ P log α − ½ log det(G + α I)   (+ const).
    """
    log_alpha = torch.as_tensor(log_alpha, dtype=gram.dtype)
    alpha = log_alpha.exp()
    w = w.to(gram.dtype)
    p = w.numel()
    eye = torch.eye(p, dtype=gram.dtype, device=gram.device)
    return -0.5 * alpha * (w @ w) + 0.5 * p * log_alpha - 0.5 * torch.logdet(gram + alpha * eye)


def optimise_prior_precision(gram: torch.Tensor, w: torch.Tensor, steps: int = 200) -> float:
    """α maximising :func:`linear_evidence`, by MacKay's fixed point α = γ / ‖w‖².

    γ = Σ_i λ_i / (λ_i + α) (λ: eigenvalues of G) counts the well-determined directions.
    """
    eig = torch.linalg.eigvalsh(gram.double()).clamp(min=0.0)
    w2 = float(w.double() @ w.double())
    if w2 == 0.0:
        return 1.0
    alpha = 1.0
    for _ in range(steps):
        gamma = float((eig / (eig + alpha)).sum())
        new = max(gamma, 1e-12) / w2
        if abs(new - alpha) <= 1e-12 * alpha:
            break
        alpha = new
    return alpha


def last_layer_gram(model: RACE, dataset: GraphDataset, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """G = Σ_n J_E,nᵀ J_E,n / σ²_E,n + Σ_n Σ_i J_F,niᵀ Σ_F,ni⁻¹ J_F,ni over ``dataset`` (P, P).

    The noise is the network's own predicted variances (it was trained with that likelihood);
    for networks trained with plain MSE the heads are untrained and a homoscedastic noise
    would be the better choice.
    """
    model = model.to(device).eval()
    gram = None
    for batch in dataset.batches(batch_size, device):
        out, jac_e, jac_f, _ = last_layer_jacobians(model, batch.graph)
        jac_e, jac_f = jac_e.double(), jac_f.double()
        e_prec = 1.0 / out[K.ENERGY_VAR].double()  # (B,)
        f_prec = torch.linalg.inv(out[K.FORCES_COV].double())  # (n, 3, 3)
        g = torch.einsum("bp,b,bq->pq", jac_e, e_prec, jac_e)
        g = g + torch.einsum("pni,nij,qnj->pq", jac_f, f_prec, jac_f)
        gram = g if gram is None else gram + g
    return gram


def fit_last_layer_laplace(
    model: RACE, dataset: GraphDataset, prior_precision: float = 0.0, batch_size: int = 8, device="cpu"
) -> LastLayerLaplacePosterior:
    """Σ = (G + α I)⁻¹ with α by marginal likelihood unless ``prior_precision`` > 0."""
    gram = last_layer_gram(model, dataset, batch_size, device)
    w = model.last_layer_weights().detach().double().cpu()
    gram = gram.cpu()
    alpha = prior_precision or optimise_prior_precision(gram, w)
    eye = torch.eye(w.numel(), dtype=torch.float64)
    covariance = torch.linalg.inv(gram + alpha * eye)
    covariance = 0.5 * (covariance + covariance.T)
    hyper = {"prior_precision": alpha, "evidence": float(linear_evidence(gram, w, math.log(alpha)))}
    log.info("last-layer Laplace: P=%d, α=%.4g", w.numel(), alpha)
    return LastLayerLaplacePosterior(model.cpu(), covariance, hyper)


# ---------------------------------------------------------------------- laplace-torch variant
class _EnergyOnly(torch.nn.Module):
    """The network as laplace-torch sees it: a batch of graphs → energies (B, 1) in eV."""

    def __init__(self, model: RACE):
        super().__init__()
        self.model = model

    def forward(self, x: "_Graphs") -> torch.Tensor:
        return self.model(x.graph, compute_forces=False)[K.ENERGY].unsqueeze(-1).to(self.model.dtype)


class _Graphs:
    """A batched graph with the ``.to(device)`` laplace-torch calls on inputs."""

    def __init__(self, graph):
        self.graph = graph

    def to(self, device):
        return _Graphs({k: v.to(device) for k, v in self.graph.items()})


class _Loader:
    """(inputs, energies) batches with the ``dataset`` length laplace-torch reads."""

    def __init__(self, dataset: GraphDataset, batch_size: int, device, dtype):
        self.dataset, self.batch_size, self.device, self.dtype = dataset, batch_size, device, dtype

    def __iter__(self):
        for batch in self.dataset.batches(self.batch_size, self.device):
            yield _Graphs(batch.graph), batch.ref["energy"].to(self.dtype).unsqueeze(-1)


def _energy_ggn_backend():
    """A laplace-torch curvature backend: the exact diagonal GGN of a scalar-output model.

    diag H = Σ_n (∂f_n/∂θ)², from one backward pass per structure. Generic: it needs nothing
    from the model but autograd (BackPACK and ASDL only know standard torch layers).
    """
    from laplace.curvature import CurvatureInterface

    class EnergyGGNDiagonal(CurvatureInterface):
        def diag(self, x, y, **kwargs):
            out = self.model(x)  # (B, 1)
            diag = torch.zeros(sum(p.numel() for p in self.params), dtype=out.dtype, device=out.device)
            for b in range(out.shape[0]):
                grads = torch.autograd.grad(out[b, 0], self.params, retain_graph=True, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)])
                diag += flat.detach() ** 2
            loss = self.factor * self.lossfunc(out.detach(), y)
            return loss, diag

    return EnergyGGNDiagonal


def fit_diag_laplace(
    model: RACE,
    dataset: GraphDataset,
    prior_precision: float = 0.0,
    n_samples: int | None = None,
    sample_seed: int = 0,
    batch_size: int = 8,
    device="cpu",
    steps: int = 300,
    noise: str = "residual",
):
    """The paper's Laplace: every weight, diagonal GGN on energies, with ``laplace-torch``.

    The prior precision α (unless given) and, with ``noise="marglik"``, the energy noise σ
    maximise laplace-torch's marginal likelihood; ``noise="residual"`` keeps σ at the RMS
    training residual (with ~10⁵ weights and ~10³ energies the evidence's Occam factor can
    push σ to eV scale, where the posterior is the prior). Weights that do not change the energy at all (the variance heads'
    last layer) have a zero GGN; the energy likelihood says nothing about them, so they stay
    at the MAP rather than being drawn from the prior.
    """
    from laplace import DiagLaplace

    from ...posteriors import DiagLaplacePosterior

    model = model.to(device).eval()
    wrapped = _EnergyOnly(model)
    residuals = []
    for batch in dataset.batches(batch_size, device):
        residuals.append(batch.ref["energy"] - model(batch.graph, compute_forces=False)[K.ENERGY].detach())
    sigma0 = float(torch.cat(residuals).double().pow(2).mean().sqrt()) or 1e-3
    la = DiagLaplace(
        wrapped, "regression", sigma_noise=sigma0, prior_precision=prior_precision or 1.0,
        backend=_energy_ggn_backend(),
    )
    la.fit(_Loader(dataset, batch_size, device, model.dtype))
    log_sigma = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=noise == "marglik")
    log_alpha = torch.tensor(math.log(prior_precision or 1.0), dtype=torch.float64, requires_grad=not prior_precision)
    params = [p for p in (log_sigma, log_alpha) if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=0.1)
    for _ in range(steps if params else 0):
        optimiser.zero_grad()
        loss = -la.log_marginal_likelihood(log_alpha.exp(), log_sigma.exp())
        loss.backward()
        optimiser.step()
    la.prior_precision = float(log_alpha.detach().exp())
    la.sigma_noise = float(log_sigma.detach().exp())
    variance = la.posterior_variance.detach().double().cpu()
    variance[la.H.detach().cpu() == 0] = 0.0
    hyper = {
        "prior_precision": float(log_alpha.exp()),
        "sigma_noise": float(log_sigma.exp()),
        "log_marginal_likelihood": float(la.log_marginal_likelihood().detach()),
    }
    log.info("diagonal Laplace: α=%.4g, σ=%.4g eV", hyper["prior_precision"], hyper["sigma_noise"])
    return DiagLaplacePosterior(model.cpu(), variance, n_samples, sample_seed, hyper)


class Laplace(Method):
    """Post hoc around ``base_model``, or around an MVE network trained first."""

    kind = "laplace"
    Options = LaplaceOptions
    legacy = {"laplace_subset": "subset", "laplace_prior_precision": "prior_precision", "laplace_noise": "noise",
              "base_model": "base_model", "test_samples": "test_samples"}

    @classmethod
    def requires(cls, options):
        return ("laplace",) if options is not None and options.subset == "all" else ()

    def fit(self, config, model_config, train, valid, *, in_memory=False, on_step=None):
        from .mve import MVE

        options = config.laplace
        summary: dict = {}
        if options.base_model:
            model = base_network(options.base_model, "Laplace")
            if model.config.to_dict() != model_config.to_dict():
                log.info("using the base model's own config (species, E0s, scale) instead of the data's")
            summary["base_model"] = str(options.base_model)
        else:
            fitted = MVE().fit(config, model_config, train, valid, in_memory=in_memory, on_step=on_step)
            if fitted is None:
                return None
            model, summary = fitted.posterior.networks()[0], dict(fitted.summary)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if (model.config.species, model.config.r_max, model.config.dtype) != (
            model_config.species, model_config.r_max, model_config.dtype
        ):  # a base model built differently from the data's config: its own graphs
            train = GraphDataset(train.frames, model.config.species, model.config.r_max, model.dtype)
        if options.subset == "last_layer":
            posterior = fit_last_layer_laplace(model, train, options.prior_precision, device=device)
        else:
            posterior = fit_diag_laplace(
                model, train, options.prior_precision, n_samples=options.test_samples or None,
                sample_seed=config.seed, device=device, noise=options.noise,
            )
        return Fitted(posterior, {**summary, "laplace": posterior.hyper})
