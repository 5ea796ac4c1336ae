"""The RACE interaction layer with restratification, and the per-layer readout.

The equations, with the symbols used here, are in docs/architecture.md (section Equations).

Shapes: ``n`` atoms, ``e`` edges; features are e3nn irreps tensors ``(n, irreps.dim)`` in
component normalisation.
"""

from __future__ import annotations

import math

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn
from torch.utils.checkpoint import checkpoint


def channel_index(irreps: o3.Irreps, per_block: bool) -> torch.Tensor:
    """For each component of ``irreps``, the index of the scalar weight that scales it.

    ``per_block=True``: one weight per (block, channel) — indices 0 … Σ mul − 1.
    ``per_block=False``: one weight per channel shared by every block (all blocks must have the
    same multiplicity) — indices 0 … mul − 1.
    """
    index, offset = [], 0
    for mul, ir in irreps:
        channels = torch.arange(mul) + (offset if per_block else 0)
        index.append(channels.repeat_interleave(ir.dim))
        offset += mul
    return torch.cat(index)


def message_instructions(
    irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_target: o3.Irreps
) -> tuple[o3.Irreps, list[tuple]]:
    """Channel-wise ("uvu") paths h ⊗ Y → ir_out for every ir_out present in ``irreps_target``."""
    wanted = {ir for _, ir in irreps_target}
    irreps_mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted:
                    instructions.append((i, j, len(irreps_mid), "uvu", True))
                    irreps_mid.append((mul, ir_out))
    return o3.Irreps(irreps_mid), instructions


class Interaction(nn.Module):
    """One interaction layer t: A^{t−1} → A^t.

        S_i   = W_skip^{(Z_i)} A_i^{t−1}
        h_j   = W_up A_j^{t−1}
        m_ij  = R(rbf_ij) ⊙ [ h_j ‖ (h_j ⊗ Y(r̂_ij)) ]
        B_i   = W_down( Σ_j m_ij / √N̄ ) / √N̄
        A_i^t = W_lin (a_i ⊗ B_i) + S_i

    ``a_i ⊗ B_i`` multiplies channel c of every irrep of B_i by the scalar a_ic.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_hidden: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_rbf: int,
        radial_mlp: tuple[int, ...],
        num_species: int,
        avg_num_neighbors: float,
    ):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_hidden)
        self.inv_sqrt_nbar = 1.0 / math.sqrt(avg_num_neighbors)
        self.skip = o3.FullyConnectedTensorProduct(
            self.irreps_in, o3.Irreps(f"{num_species}x0e"), self.irreps_out
        )
        self.up = o3.Linear(self.irreps_in, self.irreps_in)
        irreps_mid, instructions = message_instructions(self.irreps_in, irreps_sh, self.irreps_out)
        self.tp = o3.TensorProduct(
            self.irreps_in,
            irreps_sh,
            irreps_mid,
            instructions,
            shared_weights=False,
            internal_weights=False,
        )
        self.num_h_weights = sum(mul for mul, _ in self.irreps_in)
        self.radial = e3nn_nn.FullyConnectedNet(
            [num_rbf, *radial_mlp, self.tp.weight_numel + self.num_h_weights], torch.nn.functional.silu
        )
        self.down = o3.Linear(self.irreps_in + irreps_mid, self.irreps_out)
        self.lin = o3.Linear(self.irreps_out, self.irreps_out)
        self.register_buffer("h_index", channel_index(self.irreps_in, per_block=True), persistent=False)
        self.register_buffer(
            "restrat_index", channel_index(self.irreps_out, per_block=False), persistent=False
        )

    def forward(
        self,
        features: torch.Tensor,
        species_onehot: torch.Tensor,
        restrat: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_rbf: torch.Tensor,
        edge_index: torch.Tensor,
        edge_chunk: int | None = None,
    ) -> torch.Tensor:
        """
        Args:
            features: A^{t−1}, (n, irreps_in.dim).
            species_onehot: (n, n_species).
            restrat: a_i, (n, mul) with mul the hidden multiplicity.
            edge_sh: Y(r̂_ij), (e, irreps_sh.dim).
            edge_rbf: radial embedding, (e, n_rbf).
            edge_index: (2, e), rows (i, j).
            edge_chunk: when set and ``e`` is larger, process edges in chunks of this size with
                activation checkpointing (same result, bounded memory).
        Returns:
            A^t, (n, irreps_hidden.dim).
        """
        centre, neighbour = edge_index[0], edge_index[1]
        skip = self.skip(features, species_onehot)
        h = self.up(features)
        n_edges = edge_index.shape[1]
        if edge_chunk and n_edges > edge_chunk and torch.is_grad_enabled():
            # Large graphs: evaluate the edges in chunks whose activations are recomputed in
            # the backward pass instead of stored, so peak memory no longer grows with n_edges
            # times the message width (about 1.4× the time of the plain path).
            summed = None
            for start in range(0, n_edges, edge_chunk):
                part = slice(start, start + edge_chunk)
                partial = checkpoint(
                    self._aggregate, h, edge_sh[part], edge_rbf[part], centre[part], neighbour[part],
                    use_reentrant=False,
                )
                summed = partial if summed is None else summed + partial
        else:
            summed = self._aggregate(h, edge_sh, edge_rbf, centre, neighbour)
        b = self.down(summed * self.inv_sqrt_nbar) * self.inv_sqrt_nbar
        return self.lin(b * restrat[:, self.restrat_index]) + skip


    def _aggregate(self, h, edge_sh, edge_rbf, centre, neighbour) -> torch.Tensor:
        """Σ_j m_ij for every centre i: (n, message dim)."""
        h_j = h[neighbour]
        weights = self.radial(edge_rbf)
        w_tp, w_h = weights[:, : self.tp.weight_numel], weights[:, self.tp.weight_numel :]
        message = torch.cat([h_j * w_h[:, self.h_index], self.tp(h_j, edge_sh, w_tp)], dim=-1)
        return torch.zeros(h.shape[0], message.shape[1], dtype=message.dtype, device=message.device).index_add(
            0, centre, message
        )


class Readout(nn.Module):
    """Per-layer readout Linear → SiLU → Linear from A^t to the head outputs.

    Output irreps are ``n_scalars x0e`` followed, when ``n_vectors > 0``, by ``n_vectors x1o``;
    vectors pass a gated nonlinearity (SiLU on the hidden scalars, sigmoid gates on vectors) so
    that the readout stays equivariant.
    """

    def __init__(self, irreps_in: o3.Irreps, hidden: int, n_scalars: int, n_vectors: int):
        super().__init__()
        self.irreps_out = o3.Irreps(f"{n_scalars}x0e") + (
            o3.Irreps(f"{n_vectors}x1o") if n_vectors else o3.Irreps("")
        )
        if n_vectors:
            self.act = e3nn_nn.Gate(
                f"{hidden}x0e",
                [torch.nn.functional.silu],
                f"{n_vectors}x0e",
                [torch.sigmoid],
                f"{n_vectors}x1o",
            )
            irreps_mid = self.act.irreps_in
        else:
            irreps_mid = o3.Irreps(f"{hidden}x0e")
            self.act = e3nn_nn.Activation(irreps_mid, [torch.nn.functional.silu])
        self.first = o3.Linear(irreps_in, irreps_mid)
        self.second = o3.Linear(self.act.irreps_out, self.irreps_out)
        self.n_hidden = hidden
        # The first instruction of ``second`` maps the hidden scalars onto the output scalars
        # with a (hidden, n_scalars) weight block and e3nn's 1/√fan_in path normalisation.
        first = self.second.instructions[0]
        if (first.i_in, first.i_out) != (0, 0) or first.path_shape != (hidden, n_scalars):
            raise AssertionError("unexpected e3nn Linear layout in the readout")
        self.energy_weight_norm = first.path_weight

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """(n, irreps_in.dim) → the activated hidden layer (n, act.irreps_out.dim)."""
        return self.act(self.first(features))

    def energy_weights(self) -> torch.Tensor:
        """The weights (hidden,) from the hidden scalars onto output scalar 0 (e_i), a view."""
        n_scalars = self.irreps_out[0].mul
        return self.second.weight[: self.n_hidden * n_scalars].view(self.n_hidden, n_scalars)[:, 0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, irreps_in.dim) → (n, irreps_out.dim)."""
        return self.second(self.hidden(features))
