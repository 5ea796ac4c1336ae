"""Evaluate M weight sets of one RACE architecture in one batched pass.

Members of an ensemble and samples of SWAG, IVON or Laplace share the architecture and differ
only in their parameter values. Rather than M Python-level forward/backward passes, the
parameters are stacked along a new leading dimension and the network is vmapped over them:

    θ:  (M, …) per parameter         r_m: (M, n, 3), one copy of the positions per member
    E_m = RACE_{θ_m}(r_m)            (M, B)
    F_m = −∂(Σ_m Σ_b E_mb)/∂r_m      one backward pass for every member's forces

Because E_m depends on r_m only, the gradient of the summed energies with respect to the
stacked positions gives each member's own forces. Stress works the same way with one strain
tensor per member (:mod:`ase_race.nn.derivatives`). How the members' outputs are combined is
:mod:`ase_race.posteriors.mixture`; docs/posteriors/README.md compares the methods.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap

from .. import _keys as K
from ..graph import AtomicGraph
from ..nn import RACE
from ..nn.derivatives import derivative_inputs, energy_derivatives


class _Outputs(nn.Module):
    """``RACE.outputs`` as a module's forward, so that ``functional_call`` can swap weights."""

    def __init__(self, model: RACE):
        super().__init__()
        self.model = model

    def forward(self, graph, positions, strain):
        return self.model.outputs(graph, positions, strain)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one vector (P,), in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split (…, P) vectors into a dict of (…, *shape) tensors named like ``model``'s parameters."""
    out, start = {}, 0
    lead = flat.shape[:-1]
    for name, p in model.named_parameters():
        out[name] = flat[..., start : start + p.numel()].reshape(*lead, *p.shape)
        start += p.numel()
    if start != flat.shape[-1]:
        raise ValueError(f"expected {start} parameters, got {flat.shape[-1]}")
    return out


class StackedModel:
    """M weight sets for one RACE architecture, evaluated together.

    Args:
        model: the architecture; its buffers (constants derived from the config) are shared by
            every member, its parameters are replaced by ``params``.
        params: name → (M, *shape) stacked parameters (see :func:`stack_parameters`).
        max_edges_per_pass: members are evaluated in groups such that a group's edges times
            members stay below this (each group one vmapped pass with one backward pass; a
            group of one is a plain pass). Measured on 2 CPU cores (docs/benchmarks.md):
            batching ten members is faster than a loop for a 27-atom molecule (7 k
            edge-members) and 2.3× slower for 192 atoms of water (100 k edge-members), where
            the vmapped backward spends its time allocating and filling slice gradients. The
            default keeps the batched pass where it pays.
    """

    def __init__(self, model: RACE, params: dict[str, torch.Tensor], max_edges_per_pass: int = 16_000):
        self.model = model
        self.params = params
        self.max_edges_per_pass = max_edges_per_pass
        self._module = _Outputs(copy.deepcopy(model)).eval()
        for p in self._module.parameters():
            p.requires_grad_(False)

    @property
    def n_members(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def config(self):
        return self.model.config

    def to(self, device=None, dtype=None) -> "StackedModel":
        self.params = {k: v.to(device=device, dtype=dtype) for k, v in self.params.items()}
        self.model.to(device=device, dtype=dtype)
        self._module.to(device=device, dtype=dtype)
        return self

    def __call__(self, graph: AtomicGraph, compute_stress: bool = False, edge_chunk: int | None = None) -> dict[str, torch.Tensor]:
        """Every member's outputs.

        Graphs small enough for two or more members per pass are evaluated in vmapped groups.
        Larger graphs are evaluated member by member, each member's weights copied into one
        working network that then runs exactly like a single model, with ``edge_chunk``'s
        activation checkpointing (which a ``functional_call`` pass cannot use: its
        recomputation would run after the original weights had been put back), so a large
        system costs M single calls in time and one in peak memory.

        Returns:
            dict with ``energy`` (M, B), ``node_energy`` (M, n), ``energy_var`` (M, B),
            ``forces`` (M, n, 3), ``forces_cov`` (M, n, 3, 3) and, with ``compute_stress``,
            ``stress`` (M, B, 3, 3).
        """
        n_edges = max(int(graph[K.EDGE_INDEX].shape[1]), 1)
        group = max(1, min(self.n_members, self.max_edges_per_pass // n_edges))
        if group == 1:
            return self._one_by_one(graph, compute_stress, edge_chunk)
        parts = [
            self._evaluate(graph, {k: v[start : start + group] for k, v in self.params.items()}, compute_stress)
            for start in range(0, self.n_members, group)
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _one_by_one(self, graph, compute_stress, edge_chunk):
        network = self._module.model
        named = dict(network.named_parameters())
        keys = [K.ENERGY, K.NODE_ENERGY, K.ENERGY_VAR, K.FORCES, K.FORCES_COV] + ([K.STRESS] if compute_stress else [])
        outs = []
        for m in range(self.n_members):
            with torch.no_grad():
                for name, value in self.params.items():
                    named[name].copy_(value[m])
            out = network(graph, compute_forces=True, compute_stress=compute_stress, edge_chunk=edge_chunk)
            outs.append({k: out[k].detach() for k in keys})
        return {k: torch.stack([o[k] for o in outs]) for k in keys}

    def _evaluate(self, graph, params, compute_stress):
        m = next(iter(params.values())).shape[0]
        buffers = {name: b for name, b in self._module.named_buffers()}
        cell = graph[K.CELL]
        with torch.enable_grad():
            positions, strain = derivative_inputs(graph[K.POSITIONS], cell.shape[0], stress=compute_stress, n_members=m)

            def one(p, pos, eps):
                return functional_call(self._module, ({f"model.{k}": v for k, v in p.items()}, buffers), (graph, pos, eps))

            if m == 1:  # a plain pass: vmap over one member only adds overhead
                single = one({k: v[0] for k, v in params.items()}, positions[0], None if strain is None else strain[0])
                out = {k: v.unsqueeze(0) for k, v in single.items()}
            else:
                out = vmap(one, in_dims=(0, 0, 0 if compute_stress else None))(params, positions, strain)
            d = energy_derivatives(out[K.ENERGY].sum(), positions, strain, cell)
        result = {
            K.ENERGY: out[K.ENERGY].detach(),
            K.NODE_ENERGY: out[K.NODE_ENERGY].detach(),
            K.ENERGY_VAR: out[K.ENERGY_VAR].detach(),
            K.FORCES_COV: out[K.FORCES_COV].detach(),
            K.FORCES: d.forces,
        }
        if compute_stress:
            result[K.STRESS] = d.stress
        return result


def stack_parameters(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    """name → (M, *shape): the parameters of M identically built networks, stacked."""
    names = [name for name, _ in models[0].named_parameters()]
    return {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]) for name in names
    }
