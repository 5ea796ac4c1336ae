"""Fitting the novelty posterior (docs/posteriors/novelty.md): statistics, references, scales.

Around one network (``base_model``, or an MVE network trained first):

1. the training atoms' last-layer features φ give per-species means μ_Z and spreads s_Z, and a
   farthest-point subset of at most ``max_references`` standardised environments per species;
2. the validation atoms' distances to those references give q_Z, their ``quantile``;
3. the constants (f, A, δ₀, p) of :class:`~ase_race.posteriors.novelty.NoveltyPosterior`,
   for energies and for forces, maximise the Gaussian likelihood of the calibration
   structures: the validation set plus ``calibration_file``, which should hold
   off-distribution structures labelled at the training level of theory (otherwise the
   variance is fitted where the network is right and says little about where it is wrong).

Nothing here looks at a test set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from ... import _keys as K
from ...config import ModelConfig
from ...errors import ConfigError, DataError
from ...nn import RACE, build_model
from ...posteriors.novelty import PARAMETERS, NoveltyPosterior
from ..batches import GraphDataset
from .base import Fitted, Method, MethodOptions, base_network

log = logging.getLogger("ase_race.training")


@dataclass(frozen=True)
class NoveltyOptions(MethodOptions):
    """Options of ``method: novelty``.

    Attributes:
        base_model: a single-network model file to build on instead of training an MVE first.
        calibration_file: labelled structures (any format ``ase-race train`` reads) added to
            the validation set for fitting the scales; off-distribution ones (bonds pulled and
            compressed, other molecules, hot MD: ``ase-race stress-test`` writes such files)
            make the variance hold off-distribution. Empty: the validation set only.
        max_references: the most reference environments kept per species.
        quantile: q_Z is this quantile of the validation atoms' distances.
        isolated_limit: the coordination n_on of :class:`~ase_race.config.ModelConfig`'s
            isolated-atom limit, set on the network before anything is fitted (or trained):
            ``"auto"`` takes half the smallest coordination of a training atom, at most 1, so
            that no training atom is changed; None leaves the network's value.
        max_log_var: the aleatoric cap (log eV²) set on the network alike; None leaves it.
    """

    base_model: str = ""
    calibration_file: str = ""
    max_references: int = 4096
    quantile: float = 0.95
    isolated_limit: float | str | None = "auto"
    max_log_var: float | None = 0.0

    training_keys = ("isolated_limit", "max_log_var")

    def __post_init__(self) -> None:
        if self.max_references < 1:
            raise ConfigError(f"novelty.max_references must be at least 1, got {self.max_references}")
        if not 0.0 < self.quantile <= 1.0:
            raise ConfigError(f"novelty.quantile must be in (0, 1], got {self.quantile}")
        if isinstance(self.isolated_limit, str) and self.isolated_limit != "auto":
            raise ConfigError(f"novelty.isolated_limit must be a number, 'auto' or null, got {self.isolated_limit!r}")


def auto_isolated_limit(config: ModelConfig, dataset: GraphDataset) -> float:
    """min(1, ½ min_i n_i) over the atoms of ``dataset``: an n_on that changes none of them."""
    probe = build_model(config)
    smallest = min(float(probe.coordination(g, g[K.POSITIONS], g[K.CELL]).min()) for g in dataset.graphs)
    if smallest <= 0:
        raise DataError("novelty: a training structure has an atom without neighbours; set isolated_limit "
                        "explicitly (or null) for such data")
    return min(1.0, 0.5 * smallest)


def with_limits(model: RACE, isolated_limit: float | None, max_log_var: float | None) -> RACE:
    """``model`` with its config's ``isolated_limit`` and ``max_log_var`` replaced (same weights)."""
    changes = {k: v for k, v in (("isolated_limit", isolated_limit), ("max_log_var", max_log_var)) if v is not None}
    if not changes or all(getattr(model.config, k) == v for k, v in changes.items()):
        return model
    new = build_model(model.config.replace(**changes))
    new.load_state_dict(model.state_dict())
    return new.to(next(model.parameters()).device)


@torch.no_grad()
def atom_features(model: RACE, dataset: GraphDataset, batch_size: int = 16, device="cpu"):
    """Per species of ``model.config.species``: the features φ (N_Z, P) and the coordinations
    n_i (N_Z,) of every atom of ``dataset``, float64. Returns (features, coordinations)."""
    model = model.to(device).eval()
    chunks: list[list[torch.Tensor]] = [[] for _ in model.config.species]
    counts: list[list[torch.Tensor]] = [[] for _ in model.config.species]
    for batch in dataset.batches(batch_size, device):
        graph = batch.graph
        out = model.outputs(graph, graph[K.POSITIONS], None, last_layer_features=True)
        features, species = out[K.FEATURES].double().cpu(), graph[K.SPECIES].cpu()
        n = model.coordination(graph, graph[K.POSITIONS], graph[K.CELL]).double().cpu()
        for z in range(len(chunks)):
            chunks[z].append(features[species == z])
            counts[z].append(n[species == z])
    width = model.config.num_layers * model.config.readout_hidden
    return ([torch.cat(c) if c else torch.zeros(0, width, dtype=torch.float64) for c in chunks],
            [torch.cat(c) if c else torch.zeros(0, dtype=torch.float64) for c in counts])


def farthest_points(x: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``x`` (N, P) chosen greedily, each farthest from those before
    (the first is the row farthest from the mean): a deterministic cover of the set."""
    if x.shape[0] <= m:
        return torch.arange(x.shape[0])
    chosen = [int(((x - x.mean(0)) ** 2).sum(1).argmax())]
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(m - 1):
        j = int(nearest.argmax())
        chosen.append(j)
        nearest = torch.minimum(nearest, ((x - x[j]) ** 2).sum(1))
    return torch.tensor(chosen)


def leave_one_out_distances(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each row's distance to its nearest other row of ``x`` (N, P), in chunks of rows."""
    out = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start:start + chunk], x)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = math.inf
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def environment_statistics(train_features: list[torch.Tensor], valid_features: list[torch.Tensor],
                           max_references: int, quantile: float, species=()):
    """(μ (S, P), s (S, P), references [(N_Z, P)], q (S,)) from per-species feature sets.

    s_Z is the per-feature standard deviation with a floor of 10⁻³ of its largest entry (a
    feature that never varies on training data must not make every distance infinite); q_Z is
    the ``quantile`` of validation atoms' distances to the references (for a species without
    validation atoms, of each training atom's distance to its nearest other training atom).
    """
    means, spreads, references, radii = [], [], [], []
    for z, (a, v) in enumerate(zip(train_features, valid_features)):
        name = species[z] if species else z
        if a.shape[0] < 2:
            raise DataError(f"novelty: species {name} has {a.shape[0]} training atoms; at least 2 are needed")
        mean, spread = a.mean(0), a.std(0)
        spread = spread.clamp(min=1e-3 * float(spread.max()) + 1e-12)
        x = (a - mean) / spread
        keep = farthest_points(x, max_references)
        ref = x[keep]
        if v.shape[0] == 0:
            d = leave_one_out_distances(x)
        else:
            d = torch.cdist((v - mean) / spread, ref).min(dim=1).values
        radius = float(torch.quantile(d, quantile)) if d.numel() else 1.0
        means.append(mean), spreads.append(spread), references.append(ref), radii.append(max(radius, 1e-6))
    return torch.stack(means), torch.stack(spreads), references, torch.tensor(radii, dtype=torch.float64)


@dataclass
class CalibrationTerms:
    """What the scale fit needs per calibration structure, from one pass of the network.

    ``energy_error`` (B,) eV and ``energy_var`` (B,) eV² (aleatoric); ``delta``, ``deficit``
    and ``batch`` (n,) the atoms' novelty, missing coordination and structure index;
    ``force_error`` (n, 3) eV/Å and ``force_cov`` (n, 3, 3) (eV/Å)² (aleatoric); ``edges`` (2, E) the (atom j, neighbour i)
    pairs and ``edge_weight`` (E,) their envelope weights w_ji.
    """

    energy_error: torch.Tensor
    energy_var: torch.Tensor
    delta: torch.Tensor
    deficit: torch.Tensor
    batch: torch.Tensor
    force_error: torch.Tensor
    force_cov: torch.Tensor
    edges: torch.Tensor
    edge_weight: torch.Tensor


@torch.no_grad()
def _edge_weights(model: RACE, graph) -> torch.Tensor:
    centre, neighbour = graph[K.EDGE_INDEX]
    cell, positions = graph[K.CELL], graph[K.POSITIONS]
    shifts = torch.einsum("ec,ecd->ed", graph[K.EDGE_SHIFTS], cell[graph[K.BATCH][centre]])
    return model.radial.envelope(torch.linalg.norm(positions[neighbour] - positions[centre] + shifts, dim=-1))


def calibration_terms(posterior: NoveltyPosterior, dataset: GraphDataset, batch_size: int = 8, device="cpu") -> CalibrationTerms:
    """Errors, aleatoric variances (uncalibrated) and novelties of the network on ``dataset``."""
    model = posterior.model.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in dataclasses.fields(CalibrationTerms)}
    structures = atoms = 0
    for batch in dataset.batches(batch_size, device):
        graph = batch.graph
        out = model(graph, compute_forces=True)
        with torch.no_grad():
            features = model.outputs(graph, graph[K.POSITIONS], None, last_layer_features=True)[K.FEATURES]
        parts["energy_error"].append((batch.ref["energy"] - out[K.ENERGY].detach()).double().cpu())
        parts["energy_var"].append(out[K.ENERGY_VAR].detach().double().cpu())
        parts["delta"].append(posterior.novelty(features, graph[K.SPECIES]).cpu())
        parts["deficit"].append(posterior.deficit(graph).cpu())
        parts["batch"].append(graph[K.BATCH].cpu() + structures)
        parts["force_error"].append((batch.ref["forces"] - out[K.FORCES].detach()).double().cpu())
        parts["force_cov"].append(out[K.FORCES_COV].detach().double().cpu())
        parts["edges"].append(graph[K.EDGE_INDEX].cpu() + atoms)
        parts["edge_weight"].append(_edge_weights(model, graph).double().cpu())
        structures += batch.n_structures
        atoms += graph[K.POSITIONS].shape[0]
    return CalibrationTerms(**{k: torch.cat(v, dim=1 if k == "edges" else 0) for k, v in parts.items()})


def joined(a: CalibrationTerms, b: CalibrationTerms) -> CalibrationTerms:
    """The structures of ``a`` then those of ``b`` (b's structure and atom indices shifted)."""
    shift = {"batch": a.energy_error.shape[0], "edges": a.delta.shape[0]}
    return CalibrationTerms(**{f.name: torch.cat([getattr(a, f.name), getattr(b, f.name) + shift.get(f.name, 0)],
                                                 dim=1 if f.name == "edges" else 0)
                               for f in dataclasses.fields(CalibrationTerms)})


def _minimise(loss, start: list[float], steps: int = 500) -> list[float]:
    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = loss(theta)
        value.backward()
        return value

    optimiser.step(closure)
    return [float(t) for t in theta.detach()]


MAX_POWER = 12.0


def _unpack(theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """θ = (log f, log A, logit p/p_max, log δ₀, log b) → (f, A, p, δ₀, b); p stays in (0, p_max)."""
    bounded = theta.clamp(-30.0, 30.0)  # keeps every trial step of the line search finite
    return (bounded[0].exp(), bounded[1].exp(), MAX_POWER * torch.sigmoid(theta[2]), bounded[3].exp(),
            bounded[4].exp())


def _g(delta, scale, power, width):
    return scale * torch.tanh((delta.clamp(min=1e-12) / width) ** power)


def energy_nll(terms: CalibrationTerms, theta: torch.Tensor) -> torch.Tensor:
    """Mean over structures of ½[log 2π v_b + e_b²/v_b], v_b = f v_ale,b + (Σ_{i∈b} g(δ_i) + b m_i)²."""
    factor, scale, power, width, bond = _unpack(theta)
    n = terms.energy_error.shape[0]
    atom = _g(terms.delta, scale, power, width) + bond * terms.deficit
    std = terms.delta.new_zeros(n).index_add(0, terms.batch, atom)
    var = factor * terms.energy_var + std**2
    return 0.5 * (torch.log(2 * math.pi * var) + terms.energy_error**2 / var).mean()


def forces_nll(terms: CalibrationTerms, theta: torch.Tensor) -> torch.Tensor:
    """Mean over atoms of the 3-d Gaussian NLL of the force error with
    C_j = f C_ale,j + (v_j + Σ_i w_ji v_i) I₃, v_i = g(δ_i)² + (b m_i)²."""
    factor, scale, power, width, bond = _unpack(theta)
    own = _g(terms.delta, scale, power, width) ** 2 + (bond * terms.deficit) ** 2
    var = own + own.new_zeros(own.shape[0]).index_add(0, terms.edges[0], terms.edge_weight * own[terms.edges[1]])
    cov = factor * terms.force_cov + (var + 1e-12)[:, None, None] * torch.eye(3, dtype=var.dtype)
    chol = torch.linalg.cholesky(cov)
    y = torch.linalg.solve_triangular(chol, terms.force_error[:, :, None], upper=False)[:, :, 0]
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * (3 * math.log(2 * math.pi) + logdet + (y**2).sum(-1)).mean()


STARTS = ((0.0, -6.0, 0.0, 0.0, -3.0), (-2.0, -1.0, 0.5, 1.5, -1.0), (-2.0, 0.0, 1.0, 2.0, -5.0),
          (-4.0, -3.0, 0.0, 0.5, 0.0))


def fit_scales(terms: CalibrationTerms) -> dict[str, float]:
    """(f, A, δ₀, p, b) of maximum likelihood for energies and for forces, each from a few
    starting points (the likelihood is not convex in the power and width), the best kept."""
    best: dict[str, float] = {}
    for name, nll in (("energy", energy_nll), ("forces", forces_nll)):
        results = []
        for start in STARTS:
            try:
                theta = _minimise(lambda t, nll=nll: nll(terms, t), list(start))
                with torch.no_grad():
                    value = float(nll(terms, torch.tensor(theta, dtype=torch.float64)))
            except torch.linalg.LinAlgError:  # a start that wandered where a covariance is singular
                continue
            if math.isfinite(value):
                results.append((value, theta))
        if not results:
            raise DataError(f"novelty: the {name} scale fit did not converge on the calibration data")
        factor, scale, power, width, bond = (float(v) for v in _unpack(torch.tensor(min(results)[1], dtype=torch.float64)))
        best.update({f"{name}_aleatoric": factor, f"{name}_scale": scale, f"{name}_width": width,
                     f"{name}_power": power, f"{name}_bond": bond})
    return best


def fit_novelty(model: RACE, train: GraphDataset, valid: GraphDataset, calibration: GraphDataset | None = None,
                max_references: int = 4096, quantile: float = 0.95, device="cpu") -> NoveltyPosterior:
    """The novelty posterior around ``model``: statistics from ``train`` and ``valid``, scales
    fitted on ``valid`` plus ``calibration``."""
    model = model.to(device).eval()
    train_features, train_counts = atom_features(model, train, device=device)
    mean, spread, references, radius = environment_statistics(
        train_features, atom_features(model, valid, device=device)[0], max_references, quantile, model.config.species,
    )
    floor = torch.tensor([float(c.min()) for c in train_counts], dtype=torch.float64)
    posterior = NoveltyPosterior(model, mean, spread, references, radius, floor, dict.fromkeys(PARAMETERS, 1.0))
    terms = calibration_terms(posterior, valid, device=device)
    if calibration is not None and len(calibration):
        terms = joined(terms, calibration_terms(posterior, calibration, device=device))
    posterior.parameters = fit_scales(terms)
    log.info("novelty: %s references, q=%s, coordination floor %s, %s", [r.shape[0] for r in references],
             [round(float(q), 3) for q in radius], [round(float(n), 3) for n in floor], posterior.parameters)
    return posterior.to(device="cpu")


class Novelty(Method):
    """Feature-space novelty around ``base_model`` or around an MVE network trained first."""

    kind = "novelty"
    Options = NoveltyOptions

    def fit(self, config, model_config, train, valid, *, in_memory=False, on_step=None):
        from ...data import read_frames
        from ..api import label_keys
        from .mve import MVE

        options = config.novelty
        summary: dict = {}
        limit = options.isolated_limit
        if options.base_model:
            base = base_network(options.base_model, "novelty")
            if limit == "auto":
                limit = auto_isolated_limit(base.config, GraphDataset(train.frames, base.config.species,
                                                                      base.config.r_max, base.dtype))
            model = with_limits(base, limit, options.max_log_var)
            summary["base_model"] = str(options.base_model)
        else:
            if limit == "auto":
                limit = auto_isolated_limit(model_config, train)
            limits = {k: v for k, v in (("isolated_limit", limit), ("max_log_var", options.max_log_var)) if v is not None}
            fitted = MVE().fit(config, model_config.replace(**limits), train, valid, in_memory=in_memory, on_step=on_step)
            if fitted is None:
                return None
            model, summary = fitted.posterior.networks()[0], dict(fitted.summary)
        cfg = model.config
        if (cfg.species, cfg.r_max, cfg.dtype) != (model_config.species, model_config.r_max, model_config.dtype):
            train = GraphDataset(train.frames, cfg.species, cfg.r_max, model.dtype)
            valid = GraphDataset(valid.frames, cfg.species, cfg.r_max, model.dtype)
        calibration = None
        if options.calibration_file:
            frames = [f for f in read_frames(options.calibration_file, keys=label_keys(config)) if not f.is_isolated_atom]
            unlabelled = [f.source for f in frames if f.energy is None or f.forces is None]
            if unlabelled:
                raise DataError(f"{options.calibration_file}: calibration structures need energies and forces; "
                                f"{unlabelled[0]} has none")
            calibration = GraphDataset(frames, cfg.species, cfg.r_max, model.dtype)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        posterior = fit_novelty(model, train, valid, calibration, options.max_references, options.quantile, device)
        summary["novelty"] = {
            "parameters": posterior.parameters,
            "radius": [float(q) for q in posterior.radius],
            "coordination_floor": [float(n) for n in posterior.floor],
            "references": [int(r.shape[0]) for r in posterior.references],
            "n_calibration": len(valid) + (len(calibration) if calibration is not None else 0),
        }
        return Fitted(posterior, summary)
