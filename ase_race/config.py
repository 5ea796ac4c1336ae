"""Model hyperparameters as plain, frozen, JSON-round-trippable data.

``ModelConfig`` is the only input of :class:`ase_race.nn.RACE`; a model file stores
``config.to_dict()`` and rebuilds the network from it, so nothing about a model lives
outside this record. Presets are merged in a fixed order: field defaults, then the preset,
then the caller's values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import ConfigError

FORCE_COV_FORMS = ("equivariant", "cholesky")
ENERGY_VAR_FORMS = ("sum", "paper")
DTYPES = ("float32", "float64")
LOSSES = ("mse", "nll_e", "nll_jef")
METHODS = ("mve", "ensemble", "swag", "ivon", "laplace")
LAPLACE_SUBSETS = ("all", "last_layer")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one RACE network (SPEC §2).

    Attributes:
        species: atomic numbers the model knows, sorted ascending.
        e0s: isolated-atom energy per species (eV), same order as ``species``.
        scale: energy scale (eV) multiplying the network's per-atom outputs; variances scale
            with ``scale**2``.
        shift: per-atom energy shift (eV) added after scaling.
        r_max: cutoff radius r_c (Å).
        num_bessel: number of Bessel radial functions.
        envelope_p: exponent p of the polynomial envelope (value and first two derivatives
            vanish at r_c).
        num_layers: number of interaction layers T.
        num_features: width F of the one-body embedding A⁰ (scalars).
        hidden_irreps: e3nn irreps of the node features A^t, one multiplicity for every
            irrep (the restratification multiplies channel c of every irrep by a_ic).
        sh_lmax: largest l of the edge spherical harmonics.
        radial_mlp: hidden widths of the radial MLP R(rbf).
        readout_hidden: width of the hidden scalar layer of each per-layer readout.
        avg_num_neighbors: N̄, the mean number of neighbours within r_c on the training set.
        force_cov: ``"equivariant"`` (Σ = e^s I + Σ_k u_k u_kᵀ, rotates as R Σ Rᵀ) or
            ``"cholesky"`` (the paper's lab-frame L Lᵀ + εI).
        n_cov_vectors: number K of vectors u_k in the equivariant force covariance.
        cov_eps: ε (eV/Å)² added to the diagonal of every force covariance.
        energy_var: ``"sum"`` (σ_E² = Σ_i σ_i², extensive) or ``"paper"``
            (σ_E² = exp(mean_i log σ_i²)).
        dtype: ``"float64"`` or ``"float32"``, the dtype of the weights and of evaluation.
    """

    species: tuple[int, ...] = (1, 6, 8)
    e0s: tuple[float, ...] | None = None
    scale: float = 1.0
    shift: float = 0.0
    r_max: float = 5.0
    num_bessel: int = 8
    envelope_p: int = 6
    num_layers: int = 2
    num_features: int = 32
    hidden_irreps: str = "32x0e+32x1o+32x2e"
    sh_lmax: int = 2
    radial_mlp: tuple[int, ...] = (32, 32)
    readout_hidden: int = 16
    avg_num_neighbors: float = 8.0
    force_cov: str = "equivariant"
    n_cov_vectors: int = 2
    cov_eps: float = 1e-8
    energy_var: str = "sum"
    dtype: str = "float64"

    def __post_init__(self) -> None:
        # Normalise sequences so that from_dict(to_dict()) compares equal.
        object.__setattr__(self, "species", tuple(int(z) for z in self.species))
        object.__setattr__(self, "radial_mlp", tuple(int(w) for w in self.radial_mlp))
        e0s = self.e0s if self.e0s is not None else (0.0,) * len(self.species)
        object.__setattr__(self, "e0s", tuple(float(e) for e in e0s))
        self._validate()

    def _validate(self) -> None:
        if not self.species:
            raise ConfigError("species is empty: give the atomic numbers the model should know")
        if list(self.species) != sorted(set(self.species)) or min(self.species) < 1:
            raise ConfigError(
                f"species must be distinct atomic numbers in ascending order, got {self.species}"
            )
        if len(self.e0s) != len(self.species):
            raise ConfigError(
                f"e0s has {len(self.e0s)} values but species has {len(self.species)}; "
                "give one isolated-atom energy per species"
            )
        _choice("force_cov", self.force_cov, FORCE_COV_FORMS)
        _choice("energy_var", self.energy_var, ENERGY_VAR_FORMS)
        _choice("dtype", self.dtype, DTYPES)
        for name in ("r_max", "avg_num_neighbors", "scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_bessel", "num_layers", "num_features", "readout_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.force_cov == "equivariant" and self.n_cov_vectors < 1:
            raise ConfigError("n_cov_vectors must be at least 1 for the equivariant force covariance")
        if self.cov_eps < 0:
            raise ConfigError(f"cov_eps must be non-negative, got {self.cov_eps}")
        self.hidden_multiplicity  # parses and checks hidden_irreps

    @property
    def hidden_multiplicity(self) -> int:
        """Common multiplicity of every irrep in ``hidden_irreps``."""
        from e3nn import o3

        try:
            irreps = o3.Irreps(self.hidden_irreps)
        except (ValueError, AssertionError) as err:
            raise ConfigError(f"hidden_irreps {self.hidden_irreps!r} is not valid e3nn irreps: {err}")
        muls = {mul for mul, _ in irreps}
        if len(muls) != 1:
            raise ConfigError(
                f"hidden_irreps {self.hidden_irreps!r} mixes multiplicities {sorted(muls)}; "
                "use one multiplicity, e.g. '32x0e+32x1o+32x2e'"
            )
        present = {str(ir) for _, ir in irreps}
        needed = {"0e", "1o"} if self.force_cov == "equivariant" else {"0e"}
        if not needed <= present:
            raise ConfigError(
                f"hidden_irreps {self.hidden_irreps!r} lacks {sorted(needed - present)}, "
                f"which force_cov={self.force_cov!r} reads"
            )
        return muls.pop()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, not tuples)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        return _strict(cls, data, "model config")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Defaults, then preset ``name``, then ``overrides``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)


def _strict(cls, data: Mapping[str, Any], what: str):
    """``cls(**data)`` after refusing keys that are not fields of ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; valid keys are {sorted(known)}")
    return cls(**data)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}")


#: Named presets. ``paper`` follows arXiv 2510.03046; ``small`` is the default for CPU work;
#: ``tiny`` exists for fast tests.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        num_layers=5,
        num_features=128,
        hidden_irreps="+".join(f"64x{l}{p}" for l in range(4) for p in "eo"),
        sh_lmax=3,
        r_max=5.0,
        num_bessel=8,
        radial_mlp=(64, 64),
        readout_hidden=16,
    ),
    "small": dict(
        num_layers=2,
        num_features=32,
        hidden_irreps="32x0e+32x1o+32x2e",
        sh_lmax=2,
        r_max=5.0,
        num_bessel=8,
        radial_mlp=(32, 32),
        readout_hidden=16,
    ),
    "tiny": dict(
        num_layers=2,
        num_features=8,
        hidden_irreps="8x0e+8x1o+8x2e",
        sh_lmax=2,
        r_max=4.0,
        num_bessel=6,
        radial_mlp=(16,),
        readout_hidden=8,
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; every key has a default (see docs/training.md).

    Data keys: ``train_file`` (required), ``valid_file`` (optional; else ``valid_fraction`` of
    the training file, split with ``seed``), ``test_file`` (optional, evaluated at the end),
    ``n_train`` (optional cap on training frames, taken after the split), ``energy_key`` /
    ``forces_key`` / ``stress_key`` (label keys, falling back to values ASE attaches),
    ``e0s`` (``"isolated"``: IsolatedAtom frames in ``e0s_file`` or the training file; ``"fit"``:
    least squares; or a mapping element → eV).

    Model: ``preset`` plus ``model`` (overrides of ModelConfig fields; species, e0s, scale,
    shift and avg_num_neighbors are filled from the data unless given).

    Optimisation: ``loss`` (mse | nll_e | nll_jef), ``energy_weight`` λ_E, ``forces_weight``
    λ_F, ``beta`` (β-NLL), ``warmup_epochs`` (mean-only MSE before the NLL switches on),
    ``batch_size``, ``max_epochs``, ``lr``, ``weight_decay``, ``amsgrad``, ``clip_grad``
    (max gradient norm; 0 = off), ``ema_decay`` (0 = off), ``plateau_patience`` /
    ``plateau_factor`` / ``min_lr`` (plateau learning-rate decay on the validation loss),
    ``max_time_s`` (stop after this wall time, 0 = no limit).

    Posterior (SPEC §4): ``method`` (mve | ensemble | swag | ivon | laplace); ``members`` (deep
    ensemble size M; member k is trained with seed ``seed + k`` in ``output_dir/member_k``,
    all on the same split); ``test_samples`` (samples of SWAG / IVON / Laplace at prediction
    time; 0 = the method's default: 30, 16, 16); ``swag_start_epoch``, ``swag_interval``
    (epochs between snapshots), ``swag_rank`` (deviation columns K), ``swag_lr`` (constant
    learning rate from the start epoch; 0 = keep the current one); ``ivon_lr``, ``ivon_ess``
    (effective sample size; 0 = the number of training atoms), ``ivon_hess_init``,
    ``ivon_beta2``, ``ivon_weight_decay``, ``ivon_train_samples`` (weight samples per step), ``ivon_clip_radius`` (bound on each
    weight's preconditioned step, IVON's guard against the large early gradients of force fields);
    ``laplace_subset`` (all: diagonal GGN over every weight with laplace-torch; last_layer: the
    closed-form last-layer Laplace with force Jacobians), ``laplace_prior_precision`` (0 = by
    marginal likelihood), ``laplace_noise`` (all-weight Laplace: ``residual`` fixes the energy
    noise σ to the RMS training residual; ``marglik`` fits it by marginal likelihood as the
    paper does, which on rMD17 ethanol collapses to σ ≈ 3 eV, see docs/posteriors/laplace.md), ``base_model`` (a model file to fit the Laplace posterior around
    instead of training one first).

    Output: ``output_dir`` (checkpoint, metrics.csv, the model file), ``model_name``,
    ``checkpoint_every`` (steps between checkpoints; one is always written at epoch ends),
    ``seed``, ``device``.
    """

    train_file: str = ""
    valid_file: str = ""
    test_file: str = ""
    e0s_file: str = ""
    valid_fraction: float = 0.05
    n_train: int = 0
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    stress_key: str = "REF_stress"
    e0s: Any = "isolated"
    preset: str = "small"
    model: dict = field(default_factory=dict)
    method: str = "mve"
    loss: str = "nll_jef"
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    beta: float = 0.0
    warmup_epochs: int = 0
    batch_size: int = 8
    max_epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 0.0
    amsgrad: bool = True
    clip_grad: float = 10.0
    ema_decay: float = 0.99
    plateau_patience: int = 10
    plateau_factor: float = 0.8
    min_lr: float = 1e-5
    max_time_s: float = 0.0
    members: int = 10
    test_samples: int = 0
    swag_start_epoch: int = 50
    swag_interval: int = 1
    swag_rank: int = 40
    swag_lr: float = 0.0
    ivon_lr: float = 0.05
    ivon_ess: float = 0.0
    ivon_hess_init: float = 1.0
    ivon_beta2: float = 0.99999
    ivon_weight_decay: float = 1e-4
    ivon_train_samples: int = 1
    ivon_clip_radius: float = 1.0
    laplace_subset: str = "all"
    laplace_prior_precision: float = 0.0
    laplace_noise: str = "residual"
    base_model: str = ""
    output_dir: str = "race_run"
    model_name: str = "model"
    checkpoint_every: int = 100
    seed: int = 0
    device: str = ""

    def __post_init__(self) -> None:
        _choice("loss", self.loss, LOSSES)
        _choice("method", self.method, METHODS)
        _choice("laplace_subset", self.laplace_subset, LAPLACE_SUBSETS)
        _choice("laplace_noise", self.laplace_noise, ("marglik", "residual"))
        if self.members < 1 or self.swag_rank < 2 or self.swag_interval < 1 or self.ivon_train_samples < 1:
            raise ConfigError("members and ivon_train_samples must be ≥ 1, swag_interval ≥ 1, swag_rank ≥ 2")
        if self.batch_size < 1 or self.max_epochs < 0 or self.checkpoint_every < 1:
            raise ConfigError("batch_size and checkpoint_every must be ≥ 1 and max_epochs ≥ 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise ConfigError(f"unknown model keys {unknown} in the training config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys."""
        return _strict(cls, data, "training config")

    @classmethod
    def from_yaml(cls, path: str | None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read a YAML file (or start from defaults when ``path`` is None) and apply
        ``key=value`` overrides; ``model.KEY=value`` sets a model field. Values are YAML."""
        import yaml

        data: dict[str, Any] = {}
        if path:
            with open(path) as handle:
                data = yaml.safe_load(handle) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: a training config must be a YAML mapping")
        data = {**data, "model": dict(data.get("model") or {})}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            parsed = yaml.safe_load(value)
            if key.startswith("model."):
                data["model"][key[len("model."):]] = parsed
            else:
                data[key] = parsed
        return cls.from_dict(data)
