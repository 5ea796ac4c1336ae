"""RACE: the full network from an atomic graph to energies, forces, stress and their variances.

    E    = Σ_i (scale · e_i + shift + E0(Z_i))                      eV
    F    = −∂E/∂r                                                    eV/Å
    W    = −∂E/∂ε                                                    eV     (virial)
    σ    = (1/V) ∂E/∂ε = −W/V   (ASE's sign)                         eV/Å³
    σ_i² = scale² · exp(ℓ_i)                                        eV²

where e_i, ℓ_i and the force-covariance parameters are sums over layers of the per-layer
readouts, and ε is a symmetric strain (see :mod:`ase_race.nn.derivatives`). The equations of
every layer are in docs/architecture.md.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from .. import _keys as K
from ..config import ModelConfig
from ..graph import AtomicGraph
from . import heads
from .derivatives import derivative_inputs, energy_derivatives
from .layers import Interaction, Readout
from .radial import RadialEmbedding

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class RACE(nn.Module):
    """The RACE network built from a :class:`ModelConfig` (its only constructor argument).

    The weights are created in ``config.dtype``; torch's global default dtype is neither read
    nor changed.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dtype = TORCH_DTYPES[config.dtype]
        n_species = len(config.species)
        mul = config.hidden_multiplicity
        hidden = o3.Irreps(config.hidden_irreps)
        embed = o3.Irreps(f"{config.num_features}x0e")
        self.irreps_sh = o3.Irreps.spherical_harmonics(config.sh_lmax)

        self.embedding = nn.Linear(n_species, config.num_features, bias=False)
        self.restrat = nn.Linear(config.num_features, mul, bias=False)
        self.spherical_harmonics = o3.SphericalHarmonics(
            self.irreps_sh, normalize=True, normalization="component"
        )
        self.radial = RadialEmbedding(config.r_max, config.num_bessel, config.envelope_p)
        self.layers = nn.ModuleList(
            Interaction(
                embed if t == 0 else hidden,
                hidden,
                self.irreps_sh,
                config.num_bessel,
                config.radial_mlp,
                n_species,
                config.avg_num_neighbors,
            )
            for t in range(config.num_layers)
        )
        if config.force_cov == "equivariant":
            n_scalars, n_vectors = 3, config.n_cov_vectors  # e, ℓ, s | u_1 … u_K
        else:
            n_scalars, n_vectors = 8, 0  # e, ℓ, 6 Cholesky parameters
        self.n_scalars, self.n_vectors = n_scalars, n_vectors
        self.readouts = nn.ModuleList(
            Readout(hidden, config.readout_hidden, n_scalars, n_vectors)
            for _ in range(config.num_layers)
        )
        self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.config.dtype]

    def node_outputs(
        self,
        graph: AtomicGraph,
        positions: torch.Tensor,
        cell: torch.Tensor,
        edge_chunk: int | None = None,
        last_layer_features: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Per-atom head outputs summed over layers, before scaling.

        Args:
            graph: atomic graph (species, batch, edge_index, edge_shifts).
            positions: (n_atoms, 3) Å; passed separately so it may carry a strain.
            cell: (n_graphs, 3, 3) Å.
            edge_chunk: see :meth:`forward`.
        Returns:
            scalars (n_atoms, n_scalars): e_i, ℓ_i, then the force-covariance scalars;
            vectors (n_atoms, K, 3): the u_ik of the equivariant covariance (K = 0 otherwise).
            features (n_atoms, T·readout_hidden), only with ``last_layer_features``: see
            :meth:`outputs`.
        """
        onehot = torch.nn.functional.one_hot(graph[K.SPECIES], len(self.config.species)).to(
            positions.dtype
        )
        centre, neighbour = graph[K.EDGE_INDEX]
        shift_vectors = torch.einsum("ec,ecd->ed", graph[K.EDGE_SHIFTS], cell[graph[K.BATCH][centre]])
        vectors = positions[neighbour] - positions[centre] + shift_vectors
        lengths = torch.linalg.norm(vectors, dim=-1)
        edge_sh = self.spherical_harmonics(vectors)
        edge_rbf = self.radial(lengths)

        scalars, vectors_out, last = self._propagate(onehot, edge_sh, edge_rbf, graph[K.EDGE_INDEX], edge_chunk,
                                                    last_layer_features)
        if last_layer_features:
            return scalars, vectors_out, last
        return scalars, vectors_out

    def _propagate(self, onehot, edge_sh, edge_rbf, edge_index, edge_chunk, last_layer_features):
        """The layers and readouts from one-hot species and edge embeddings (see :meth:`node_outputs`)."""
        features = self.embedding(onehot)
        restrat = self.restrat(features)
        out = onehot.new_zeros(onehot.shape[0], self.readouts[0].irreps_out.dim)
        last = []
        for layer, readout in zip(self.layers, self.readouts):
            features = layer(features, onehot, restrat, edge_sh, edge_rbf, edge_index, edge_chunk)
            hidden = readout.hidden(features)
            out = out + readout.second(hidden)
            if last_layer_features:
                last.append(hidden[:, : readout.n_hidden] * readout.energy_weight_norm)
        scalars = out[:, : self.n_scalars]
        vectors_out = out[:, self.n_scalars :].reshape(out.shape[0], self.n_vectors, 3)
        return scalars, vectors_out, (torch.cat(last, dim=1) if last_layer_features else None)

    def isolated_outputs(self, like: torch.Tensor, last_layer_features: bool = False):
        """Head outputs of each species' atom without neighbours: (n_species, n_scalars), and with
        ``last_layer_features`` its features (n_species, T·readout_hidden) too."""
        n = len(self.config.species)
        onehot = torch.eye(n, dtype=like.dtype, device=like.device)
        edge_sh = like.new_zeros(0, self.irreps_sh.dim)
        edge_rbf = like.new_zeros(0, self.config.num_bessel)
        edge_index = torch.zeros(2, 0, dtype=torch.long, device=like.device)
        scalars, _, last = self._propagate(onehot, edge_sh, edge_rbf, edge_index, None, last_layer_features)
        return (scalars, last) if last_layer_features else scalars

    def _cached_isolated(self, like: torch.Tensor, last_layer_features: bool):
        """:meth:`isolated_outputs` (detached), recomputed only when a weight has changed.

        The key is a flat copy of every weight, compared exactly: any change (an optimiser
        step, ``load_state_dict``, a write through ``.data``) misses the cache. Copying and
        comparing 10⁵ numbers costs far less than evaluating the layers on the isolated atoms.
        """
        with torch.no_grad():
            weights = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
            cached = getattr(self, "_isolated_cache", None)
            if (cached is None or cached[0] != (like.dtype, like.device, last_layer_features)
                    or cached[1].shape != weights.shape or cached[1].device != weights.device
                    or not torch.equal(cached[1], weights)):
                cached = ((like.dtype, like.device, last_layer_features), weights.clone(),
                          self.isolated_outputs(like, last_layer_features))
                self._isolated_cache = cached
        return cached[2]

    def coordination(self, graph: AtomicGraph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """n_i = Σ_j u(r_ij) (n_atoms,): neighbours counted with the radial envelope u (1 at
        r = 0, smoothly 0 at r_c), the argument of ``isolated_limit``."""
        return self.neighbour_sum(graph, positions, cell, positions.new_ones(positions.shape[0]))

    def neighbour_sum(self, graph: AtomicGraph, positions: torch.Tensor, cell: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
        """Σ_j u(r_ij) v_j (n_atoms,) over the neighbours j of each atom i, for values v (n_atoms,)."""
        centre, neighbour = graph[K.EDGE_INDEX]
        shift_vectors = torch.einsum("ec,ecd->ed", graph[K.EDGE_SHIFTS], cell[graph[K.BATCH][centre]])
        lengths = torch.linalg.norm(positions[neighbour] - positions[centre] + shift_vectors, dim=-1)
        weights = self.radial.envelope(lengths).to(values.dtype)
        return values.new_zeros(positions.shape[0]).index_add(0, centre, weights * values[neighbour])

    def last_layer_weights(self) -> torch.Tensor:
        """w (T·readout_hidden,): the readouts' weights from hidden scalars onto e_i.

        A view into the parameters, in the order of the ``features`` of :meth:`outputs`.
        """
        return torch.cat([readout.energy_weights() for readout in self.readouts])

    def forward(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
        edge_chunk: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Evaluate the network.

        Args:
            graph: atomic graph in the model's dtype.
            (Energies are always returned in float64; everything else in the model's dtype.)
            compute_forces: also return forces (autograd).
            compute_stress: also return stress and virial (autograd; periodic cells only).
            create_graph: keep the graph of the derivatives (for training on forces).
            edge_chunk: for graphs with more edges than this, evaluate messages in chunks with
                activation checkpointing: identical results, peak memory bounded by the chunk
                instead of the graph (for inference on large systems; not with create_graph).
        Returns:
            dict with ``node_energy`` (n,), ``energy`` (B,), ``node_log_var`` (n,),
            ``energy_var`` (B,), ``forces_cov`` (n, 3, 3) and, as requested, ``forces`` (n, 3),
            ``stress`` and ``virial`` (B, 3, 3).
        """
        if compute_forces or compute_stress:
            # Forces and stress are derivatives: they need autograd even when the caller has
            # switched gradients off (e.g. evaluating under torch.no_grad()).
            with torch.enable_grad():
                return self._forward(graph, compute_forces, compute_stress, create_graph, edge_chunk)
        return self._forward(graph, compute_forces, compute_stress, create_graph, edge_chunk)

    def outputs(
        self,
        graph: AtomicGraph,
        positions: torch.Tensor,
        strain: torch.Tensor | None = None,
        edge_chunk: int | None = None,
        last_layer_features: bool = False,
        cache_isolated: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Every output that is not a derivative, at the given positions and strain.

        Free of autograd calls, so that ``torch.func.vmap`` can batch it over stacked weight
        sets and position copies (see :mod:`ase_race.posteriors.stacked`).

        Args:
            graph: atomic graph; its positions are replaced by ``positions``.
            positions: (n, 3) Å.
            strain: (B, 3, 3) or None; the symmetric part deforms positions and cells.
            edge_chunk: see :meth:`forward`.
            last_layer_features: also return ``features`` (n, T·readout_hidden): every readout's
                hidden scalars φ, scaled so that e_i = Σ_p w_p φ_ip + (terms without w), where
                w are the readouts' last-layer weights onto the energy channel.
            cache_isolated: with ``isolated_limit``, reuse the isolated atoms' outputs while the
                weights are unchanged (computed without gradients: for predictions, never for
                training or for derivatives with respect to the weights).
        Returns:
            dict with ``node_energy``, ``energy``, ``node_log_var``, ``energy_var``,
            ``forces_cov`` (see :meth:`forward`).
        """
        cfg = self.config
        batch = graph[K.BATCH]
        cell = graph[K.CELL]
        n_graphs = cell.shape[0]
        if strain is not None:
            sym = 0.5 * (strain + strain.transpose(-1, -2))
            positions = positions + torch.einsum("ni,nij->nj", positions, sym[batch])
            cell = cell + torch.einsum("bij,bjk->bik", cell, sym)
        scalars, vectors, features = self.node_outputs(
            graph, positions, cell, edge_chunk, last_layer_features=True
        ) if last_layer_features else (*self.node_outputs(graph, positions, cell, edge_chunk), None)
        if cfg.isolated_limit is not None:
            # e_i − (1 − c_i)·e_iso(Z_i): an atom without neighbours contributes exactly nothing
            # beyond its E0 (and shift, removed below), atoms with n_i ≥ n_on are unchanged.
            gate = heads.smootherstep(self.coordination(graph, positions, cell) / cfg.isolated_limit)
            iso = (self._cached_isolated(positions, last_layer_features) if cache_isolated
                   else self.isolated_outputs(positions, last_layer_features))
            iso_scalars, iso_features = iso if last_layer_features else (iso, None)
            off = 1.0 - gate
            species = graph[K.SPECIES]
            scalars = torch.cat([(scalars[:, 0] - off * iso_scalars[species, 0])[:, None], scalars[:, 1:]], dim=1)
            if last_layer_features:
                features = features - off[:, None] * iso_features[species]
        else:
            gate = None
        # E0s are large (≈ −1000 eV per heavy atom): add them in float64 so that a float32 model
        # does not round total energies to ~10 meV.
        e0s = torch.tensor(cfg.e0s, dtype=torch.float64, device=scalars.device)
        shift = cfg.shift if gate is None else cfg.shift * gate
        node_energy = (cfg.scale * scalars[:, 0] + shift).double() + e0s[graph[K.SPECIES]]
        energy = node_energy.new_zeros(n_graphs).index_add(0, batch, node_energy)
        node_log_var = scalars[:, 1] + 2.0 * math.log(cfg.scale)
        if cfg.max_log_var is not None:
            node_log_var = heads.soft_cap(node_log_var, cfg.max_log_var)
        if cfg.force_cov == "equivariant":
            forces_cov = heads.covariance_equivariant(scalars[:, 2], vectors, cfg.scale, cfg.cov_eps, cfg.max_log_var)
        else:
            forces_cov = heads.covariance_cholesky(scalars[:, 2:8], cfg.scale, cfg.cov_eps, cfg.max_log_var)
        out = {
            K.NODE_ENERGY: node_energy,
            K.ENERGY: energy,
            K.NODE_LOG_VAR: node_log_var,
            K.ENERGY_VAR: heads.energy_variance(node_log_var, batch, n_graphs, cfg.energy_var),
            K.FORCES_COV: forces_cov,
        }
        if last_layer_features:
            out[K.FEATURES] = features
        return out

    def _forward(self, graph, compute_forces, compute_stress, create_graph, edge_chunk):
        cell = graph[K.CELL]
        positions, strain = derivative_inputs(
            graph[K.POSITIONS], cell.shape[0], forces=compute_forces, stress=compute_stress
        )
        out = self.outputs(graph, positions, strain, edge_chunk)
        if compute_forces or compute_stress:
            d = energy_derivatives(
                out[K.ENERGY].sum(), positions if compute_forces else None, strain, cell,
                create_graph=create_graph, retain_graph=create_graph,
            )
            if compute_forces:
                out[K.FORCES] = d.forces
            if compute_stress:
                out[K.VIRIAL] = d.virial
                out[K.STRESS] = d.stress
        return out


def build_model(config: ModelConfig, seed: int = 0) -> RACE:
    """``RACE(config)`` with weights drawn from ``seed``, leaving torch's global RNG untouched.

    Library code builds every network through this function: constructing modules draws random
    initial weights, and doing that from the global generator would change a user's random
    stream (for example, loading a model file would alter the next ``torch.randn``).
    """
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed CUDA's, which fork_rng
        # (with no devices) does not restore.
        torch.default_generator.manual_seed(seed)
        return RACE(config)
