"""Forces, virial and stress as derivatives of the energy, for every caller that needs them.

With the energy E(r, ε) evaluated at positions r and a symmetric strain ε (zero at the
evaluation point; :meth:`ase_race.nn.RACE.outputs` applies r → r(1 + ε), cell → cell(1 + ε)):

    F      = −∂E/∂r                              eV/Å     (n, 3)
    W      = −∂E/∂ε                              eV       (B, 3, 3)  virial
    σ      = (1/V) ∂E/∂ε = −W/V,  V = |det cell|  eV/Å³    (B, 3, 3)  stress, ASE's sign

One autograd call gives all three. Three callers share it: a single network
(:class:`~ase_race.nn.RACE`), M stacked weight sets evaluated by ``vmap``
(:mod:`ase_race.posteriors.stacked`, a leading member dimension on r and ε), and the
last-layer Laplace Jacobians (:mod:`ase_race.posteriors.last_layer`, R energy rows
differentiated at once with batched gradient outputs). docs/architecture.md states the
energy these derivatives are taken of.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Derivatives(NamedTuple):
    """The derivatives of one energy (or of R energy rows: a leading R dimension on each).

    ``forces`` (…, n, 3) eV/Å; ``virial`` and ``stress`` (…, B, 3, 3) in eV and eV/Å³.
    Each is None when its input (positions or strain) was not given.
    """

    forces: torch.Tensor | None
    virial: torch.Tensor | None
    stress: torch.Tensor | None


def derivative_inputs(
    positions: torch.Tensor,
    n_graphs: int,
    *,
    forces: bool = True,
    stress: bool = False,
    n_members: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensors to evaluate the energy at, so that it can be differentiated by them.

    Args:
        positions: (n, 3) Å, the graph's positions (left untouched).
        n_graphs: B, the number of structures in the graph.
        forces: make the positions a fresh leaf that requires grad; otherwise they are
            returned as given.
        stress: also return a zero strain (B, 3, 3) that requires grad.
        n_members: M: give each of M stacked members its own copy of the positions (M, n, 3)
            (with ``forces``) and strain (M, B, 3, 3), so that the gradient of the members' summed energies
            holds each member's own derivatives.
    Returns:
        (positions, strain or None).
    """
    lead = () if n_members is None else (n_members,)
    if forces:
        positions = positions.detach()
        if n_members is not None:
            positions = positions.expand(n_members, -1, -1).clone()
        positions = positions.requires_grad_(True)
    strain = positions.new_zeros(*lead, n_graphs, 3, 3).requires_grad_(True) if stress else None
    return positions, strain


def energy_derivatives(
    energy: torch.Tensor,
    positions: torch.Tensor | None,
    strain: torch.Tensor | None,
    cell: torch.Tensor,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Derivatives:
    """F = −∂E/∂r, W = −∂E/∂ε and σ = (1/V) ∂E/∂ε by one autograd call.

    Args:
        energy: () the energy to differentiate, summed over structures (and members: a
            structure's and a member's energy depend on its own atoms and copy only, so the
            gradient of the sum holds each one's derivatives); or (R,) R rows, each
            differentiated separately in one batched backward pass (identity gradient
            outputs, ``is_grads_batched``), which adds a leading R dimension to every result.
        positions: the leaf from :func:`derivative_inputs`, (n, 3) or (M, n, 3) Å; None: no
            forces.
        strain: (B, 3, 3) or (M, B, 3, 3), zero; None: no virial or stress.
        cell: (B, 3, 3) Å, the unstrained cells (V = |det cell|, shared by the members).
        create_graph, retain_graph: as for :func:`torch.autograd.grad` (training on forces
            needs ``create_graph``).
    Returns:
        :class:`Derivatives`: forces (…, n, 3) eV/Å, virial (…, B, 3, 3) eV and stress
        (…, B, 3, 3) eV/Å³ (ASE's sign: positive under tension). The stress is computed as
        ∂E/∂ε / V, which is the same floating-point number as −W/V.
    """
    inputs = [t for t in (positions, strain) if t is not None]
    if not inputs:
        return Derivatives(None, None, None)
    if energy.dim() > 1:
        raise ValueError(f"energy must be a scalar or (R,) rows, got shape {tuple(energy.shape)}; sum it first")
    batched = {}
    if energy.dim() == 1:
        eye = torch.eye(energy.shape[0], dtype=energy.dtype, device=energy.device)
        batched = {"grad_outputs": eye, "is_grads_batched": True}
    grads = torch.autograd.grad(energy, inputs, create_graph=create_graph, retain_graph=retain_graph, **batched)
    forces = -grads[0] if positions is not None else None
    virial = stress = None
    if strain is not None:
        volume = torch.linalg.det(cell).abs()
        virial = -grads[-1]
        stress = grads[-1] / volume[:, None, None]
    return Derivatives(forces, virial, stress)
