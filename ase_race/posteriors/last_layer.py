"""Closed-form last-layer Laplace: a Gaussian over the readouts' energy weights.

The site energy is linear in the last-layer weights w ∈ R^P (P = T·readout_hidden, every
readout's hidden scalars φ_ip onto the energy channel), with everything else fixed at the MAP:

    E(w) = scale · Σ_i φ_i · w + const        J_E = ∂E/∂w = scale · Σ_i φ_i          (P,)
    F(w) = −∂E/∂r                            J_F = −∂J_E/∂r                        (n, 3, P)

so with the posterior w ~ N(w*, Σ) the predictive is exactly Gaussian (the GLM predictive is
not an approximation here):

    var_epi E = J_E Σ J_Eᵀ        cov_epi F_i = J_F,i Σ J_F,iᵀ (3×3)

J_F comes from one batched backward pass over P + 1 outputs (the energy, for the forces, and
the P feature sums), so a prediction costs about one forward plus one (wider) backward.
The aleatoric part is the network's own heads, as for MVE.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _keys as K
from ..config import ModelConfig
from ..graph import AtomicGraph
from ..nn import RACE, build_model
from ..nn.derivatives import derivative_inputs, energy_derivatives
from .base import Posterior, Prediction, load_weights, rebuilt_in


def last_layer_jacobians(
    model: RACE, graph: AtomicGraph, compute_stress: bool = False, edge_chunk=None, basis: torch.Tensor | None = None
):
    """Outputs of ``model`` plus the energy, force (and stress) Jacobians in the last layer.

    Args:
        basis: optional (P, k) directions U; the force and stress Jacobians are then returned
            for the projected weights only (J_F U), which costs k instead of P rows in the
            batched backward pass.
    Returns:
        (out, J_E (B, P), J_F (P or k, n, 3), J_S (P or k, B, 3, 3) or None), where ``out`` holds
        the usual outputs including ``forces`` (and ``stress``), and J_F = ∂F/∂w, J_S = ∂σ/∂w.
    """
    cell = graph[K.CELL]
    with torch.enable_grad():
        positions, strain = derivative_inputs(graph[K.POSITIONS], cell.shape[0], stress=compute_stress)
        out = model.outputs(graph, positions, strain, edge_chunk, last_layer_features=True)
        features = out.pop(K.FEATURES)  # (n, P)
        n_graphs = graph[K.CELL].shape[0]
        jac_e = features.new_zeros(n_graphs, features.shape[1]).index_add(0, graph[K.BATCH], features)
        jac_e = model.config.scale * jac_e  # (B, P)
        # Row 0: Σ_b E_b (its gradient gives the forces); rows 1…P: Σ_b J_E,bp. Atoms of one graph
        # only change that graph's terms, so each row's gradient is per graph.
        projected = jac_e.sum(0) if basis is None else jac_e.sum(0) @ basis.to(jac_e.device, jac_e.dtype)
        rows = torch.cat([out[K.ENERGY].sum().to(jac_e.dtype)[None], projected])
        d = energy_derivatives(rows, positions, strain, cell)  # (1 + P or k, …) by rows
    out = {k: v.detach() for k, v in out.items()}
    out[K.FORCES] = d.forces[0]
    jac_f = d.forces[1:]
    jac_s = None
    if compute_stress:
        out[K.STRESS] = d.stress[0]
        jac_s = d.stress[1:]
    return out, jac_e.detach(), jac_f, jac_s


class LastLayerLaplacePosterior(Posterior):
    """A RACE network with a Gaussian posterior N(w*, Σ) over its last-layer energy weights.

    Args:
        model: the MAP network (its last-layer weights are w*).
        covariance: Σ, (P, P) in the model's parameter units.
        hyper: the fitted hyperparameters (prior precision, noise), kept for the record.
    """

    kind = "last_layer_laplace"

    def __init__(
        self, model: RACE, covariance: torch.Tensor, hyper: dict[str, float] | None = None, force_rank: int = 0,
        force_basis: torch.Tensor | None = None,
    ):
        n = model.last_layer_weights().numel()
        if covariance.shape != (n, n):
            raise ValueError(f"covariance must be ({n}, {n}), got {tuple(covariance.shape)}")
        self.model = model.eval()
        # float64 always: Σ's eigenvalues span many decades, and J Σ Jᵀ cancels in float32.
        self.covariance = covariance.to(torch.float64)
        self.hyper = dict(hyper or {})
        self.force_rank = int(force_rank)
        #: (P, k) directions chosen for the forces by :meth:`fit_force_basis`, or None
        self.force_basis = None if force_basis is None else force_basis.to(torch.float64)
        if self.force_basis is not None:
            self.force_rank = self.force_basis.shape[1]
        self._set_basis()

    def set_force_rank(self, k: int) -> None:
        """Keep the k leading directions of Σ for forces and stress (0 = all: exact)."""
        self.force_rank = int(k)
        self.force_basis = None
        self._set_basis()

    def fit_force_basis(self, graphs, k: int) -> float:
        """Choose k directions that keep the most force variance on ``graphs``; returns the share kept.

        With Σ = L Lᵀ (L = U Λ^½) the exact force covariance is J_F L Lᵀ J_Fᵀ. A rank-k
        approximation L V Vᵀ Lᵀ (V: k orthonormal columns) is a lower bound; its total force
        variance over the structures, Σ_n Σ_i tr(J_F,ni L V Vᵀ Lᵀ J_F,niᵀ) = tr(Vᵀ M V) with
        M = Lᵀ G L and G = Σ_n Σ_i J_F,niᵀ J_F,ni (P, P), is largest for the k leading
        eigenvectors of M. The leading eigen-directions of Σ alone (:meth:`set_force_rank`)
        ignore how strongly each direction moves the forces, and keep less.

        Args:
            graphs: structures like those the model will see (training or validation graphs).
            k: number of directions (rows in the batched backward pass).
        Returns:
            tr(Vᵀ M V) / tr(M): the share of the exact force variance kept on ``graphs``.
        """
        # Accumulated on the CPU in float64 wherever the model runs (Σ may live on a GPU).
        gram = torch.zeros(self.covariance.shape, dtype=torch.float64)
        for graph in graphs:
            _, _, jac_f, _ = last_layer_jacobians(self.model, graph)  # (P, n, 3)
            flat = jac_f.reshape(jac_f.shape[0], -1).double().cpu()
            gram += flat @ flat.T
        values, vectors = torch.linalg.eigh(self.covariance.double().cpu())
        root = vectors * values.clamp(min=0).sqrt()  # L, Σ = L Lᵀ
        m_values, m_vectors = torch.linalg.eigh(root.T @ gram @ root)
        order = torch.argsort(m_values, descending=True)[: int(k)]
        self.force_basis = (root @ m_vectors[:, order]).to(self.covariance.device)
        self.force_rank = int(k)
        self._set_basis()
        return float(m_values[order].clamp(min=0).sum() / m_values.clamp(min=0).sum())

    def _set_basis(self) -> None:
        """Σ = U Λ Uᵀ; force (and stress) variances use the ``force_rank`` leading directions.

        The energy variance always uses the full Σ. With force_rank = k < P the force
        covariance is Σ_{l≤k} λ_l (J_F u_l)(J_F u_l)ᵀ, a lower bound that keeps the largest
        (least constrained) directions and costs k + 1 rows in the backward pass.
        """
        if self.force_basis is not None:  # columns L v_l: Σ_l (J L v_l)(J L v_l)ᵀ
            self._basis = self.force_basis.cpu()
            return
        values, vectors = torch.linalg.eigh(self.covariance.double().cpu())
        order = torch.argsort(values, descending=True)
        k = self.force_rank or values.numel()
        self._basis = vectors[:, order[:k]] * values[order[:k]].clamp(min=0).sqrt()

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def networks(self) -> list[RACE]:
        return [self.model]

    def with_networks(self, networks: list[RACE]) -> "LastLayerLaplacePosterior":
        return LastLayerLaplacePosterior(self._check_networks(networks)[0], self.covariance, self.hyper,
                                         force_rank=self.force_rank, force_basis=self.force_basis)

    def describe(self) -> str:
        rank = f", force rank {self.force_rank}" if self.force_rank else ""
        return f"{self.kind} ({self.covariance.shape[0]} last-layer weights{rank})"

    def predict(self, graph: AtomicGraph, *, compute_stress: bool = False, edge_chunk: int | None = None) -> Prediction:
        # The basis columns are u_l √λ_l, so Σ_l (J u_l √λ_l)(…)ᵀ = J Σ Jᵀ on the kept directions.
        out, jac_e, jac_f, jac_s = last_layer_jacobians(self.model, graph, compute_stress, edge_chunk, self._basis)
        cov = self.covariance.to(jac_e.device)
        jac_e = jac_e.double()
        energy_epi = torch.einsum("bp,pq,bq->b", jac_e, cov, jac_e)
        dtype = out[K.FORCES].dtype
        forces_epi = torch.einsum("kni,knj->nij", jac_f.double(), jac_f.double()).to(dtype)
        stress_var = torch.einsum("kbij,kbij->bij", jac_s.double(), jac_s.double()).to(dtype) if compute_stress else None
        return Prediction(
            energy=out[K.ENERGY],
            node_energy=out[K.NODE_ENERGY],
            energy_var_aleatoric=out[K.ENERGY_VAR].double(),
            energy_var_epistemic=energy_epi,
            forces_cov_aleatoric=out[K.FORCES_COV],
            forces_cov_epistemic=forces_epi,
            forces=out[K.FORCES],
            stress=out.get(K.STRESS),
            stress_var_epistemic=stress_var,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.model.state_dict()),
            "covariance": self.covariance,
            "hyper": self.hyper,
            "force_rank": self.force_rank,
            **({"force_basis": self.force_basis} if self.force_basis is not None else {}),
        }

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Any]) -> "LastLayerLaplacePosterior":
        model = build_model(config)
        load_weights(model, state["weights"])
        hyper = {k: float(v) for k, v in state.get("hyper", {}).items()}
        return cls(model, state["covariance"], hyper, force_rank=int(state.get("force_rank", 0)),
                   force_basis=state.get("force_basis"))

    def to(self, device=None, dtype=None) -> "LastLayerLaplacePosterior":
        self.model = rebuilt_in(self.model, dtype, device)
        self.covariance = self.covariance.to(device=device)
        if self.force_basis is not None:
            self.force_basis = self.force_basis.to(device=device)
        self._set_basis()
        return self
