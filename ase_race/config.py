"""Model hyperparameters as plain, frozen, JSON-round-trippable data.

(The training run's settings are :class:`ase_race.training.TrainConfig`.)

``ModelConfig`` is the only input of :class:`ase_race.nn.RACE`; a model file stores
``config.to_dict()`` and rebuilds the network from it, so nothing about a model lives
outside this record. Presets are merged in a fixed order: field defaults, then the preset,
then the caller's values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

FORCE_COV_FORMS = ("equivariant", "cholesky")
ENERGY_VAR_FORMS = ("sum", "paper")
DTYPES = ("float32", "float64")
LOSSES = ("mse", "nll_e", "nll_jef")


#: the largest sizes a ModelConfig may ask for
SIZE_LIMITS = {"num_layers": 32, "num_features": 4096, "readout_hidden": 4096, "num_bessel": 256, "sh_lmax": 8,
               "n_cov_vectors": 64}


def coerce_field(key: str, annotation: Any, value: Any) -> Any:
    """``value`` as the declared scalar type of field ``key`` (YAML reads ``1e-3`` as a string;
    a command-line override is always one), or :class:`ConfigError` naming the key and value."""
    kind = getattr(annotation, "__name__", annotation)
    if kind not in ("int", "float", "bool", "str"):
        return value
    bad = ConfigError(f"{key} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
    if kind == "str":
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise bad
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)):
        raise bad
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise bad
        return int(value)
    return float(value)



@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one RACE network (docs/architecture.md).

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
        isolated_limit: None (off), or a coordination n_on > 0: the network's contribution
            g_i = scale·e_i + shift of an atom is blended with its value for the isolated atom,
            g_i − (1 − c(n_i))·g_iso(Z_i), where n_i = Σ_j u(r_ij) counts neighbours with
            the radial envelope u and c rises smoothly from c(0) = 0 to c = 1 for n_i ≥ n_on.
            An atom without neighbours then has energy E0(Z) exactly, and atoms with at least
            n_on (weighted) neighbours are not changed at all.
        max_log_var: None (off), or the largest per-atom log-variance log σ_i² (log eV²) of
            the aleatoric heads: ℓ_i is replaced by ℓ_max − softplus(ℓ_max − ℓ_i), which is
            the identity well below ℓ_max and bounds σ_i² by e^ℓ_max (the force heads' log
            variance and vectors are bounded alike), so that a structure far from the
            training data cannot produce an exponentially large aleatoric variance.
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
    isolated_limit: float | None = None
    max_log_var: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce_field(f.name, f.type, getattr(self, f.name)))
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
        # Bounds far above any useful network, so that a hostile or mistyped file cannot make
        # the loader build one of gigabytes before its weights are checked.
        for name, most in SIZE_LIMITS.items():
            if getattr(self, name) > most:
                raise ConfigError(f"{name}={getattr(self, name)} is above the largest supported value {most}")
        if self.force_cov == "equivariant" and self.n_cov_vectors < 1:
            raise ConfigError("n_cov_vectors must be at least 1 for the equivariant force covariance")
        if self.isolated_limit is not None and not (self.isolated_limit > 0 and math.isfinite(self.isolated_limit)):
            raise ConfigError(f"isolated_limit must be a positive, finite coordination or None, got {self.isolated_limit}")
        if self.max_log_var is not None and not abs(self.max_log_var) <= 50.0:
            raise ConfigError(f"max_log_var must be a log-variance between -50 and 50 (log eV²) or None, got {self.max_log_var}")
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
