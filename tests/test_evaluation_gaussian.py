"""The shared Gaussian likelihood terms against hand-computed values; the loss agrees with them."""

import math

import pytest
import torch

from ase_race.evaluation import gaussian_nll
from ase_race.evaluation.gaussian import (
    gaussian_nll_scalar,
    gaussian_nll_vector,
    mahalanobis,
    mahalanobis_logdet,
)
from ase_race.training.losses import forces_nll

D = torch.float64
LOG_2PI = math.log(2 * math.pi)


def test_diagonal_covariance():
    delta = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=D)
    cov = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=D)).expand(2, 3, 3)
    maha, logdet = mahalanobis_logdet(delta, cov)
    # 1²/1 + 2²/4 + 3²/9 = 3; det = 36
    assert maha.tolist() == pytest.approx([3.0, 0.0])
    assert logdet.tolist() == pytest.approx([math.log(36)] * 2)
    assert gaussian_nll_vector(delta, cov).tolist() == pytest.approx(
        [0.5 * (3 + math.log(36) + 3 * LOG_2PI), 0.5 * (math.log(36) + 3 * LOG_2PI)]
    )


def test_rotated_covariance():
    # Eigenvalues 4 along (1, 1, 0)/√2, 1 along (1, −1, 0)/√2 and along z: det 4.
    cov = torch.tensor([[2.5, 1.5, 0.0], [1.5, 2.5, 0.0], [0.0, 0.0, 1.0]], dtype=D).expand(3, 3, 3)
    delta = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 2.0]], dtype=D)
    # |δ|²/λ along each eigenvector: 2/4; 2/1; 2/4 + 4/1
    assert mahalanobis(delta, cov).tolist() == pytest.approx([0.5, 2.0, 4.5])
    assert mahalanobis_logdet(delta, cov)[1].tolist() == pytest.approx([math.log(4)] * 3)
    # A plain solve says the same (the evaluators used one before).
    solved = torch.linalg.solve(cov, delta.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(mahalanobis(delta, cov), (delta * solved).sum(-1))


def test_leading_dimensions_and_float32():
    cov = torch.tensor([[2.5, 1.5, 0.0], [1.5, 2.5, 0.0], [0.0, 0.0, 1.0]])
    delta = torch.tensor([1.0, -1.0, 0.0])
    out = mahalanobis(delta.expand(2, 4, 3), cov.expand(2, 4, 3, 3))
    assert out.shape == (2, 4) and out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([2.0] * 8)


def test_gradients_flow_for_the_loss():
    cov = torch.tensor([[2.5, 1.5, 0.0], [1.5, 2.5, 0.0], [0.0, 0.0, 1.0]], dtype=D)[None]
    delta = torch.tensor([[1.0, 1.0, 0.0]], dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(mahalanobis(delta, cov).sum(), delta)
    # ∂(δᵀΣ⁻¹δ)/∂δ = 2 Σ⁻¹ δ = 2 δ / 4 for this eigenvector
    assert grad.tolist() == [pytest.approx([0.5, 0.5, 0.0])]


def test_scalar_nll():
    r = torch.tensor([1.0, -2.0], dtype=D)
    var = torch.tensor([0.25, 4.0], dtype=D)
    expected = [0.5 * (4 + math.log(2 * math.pi * 0.25)), 0.5 * (1 + math.log(2 * math.pi * 4))]
    assert gaussian_nll_scalar(r, var).tolist() == pytest.approx(expected)
    assert gaussian_nll([1.0, -2.0], [0.5, 2.0]) == pytest.approx(sum(expected) / 2)  # numpy front end


def test_not_positive_definite_raises():
    with pytest.raises(torch.linalg.LinAlgError):
        mahalanobis(torch.ones(1, 3, dtype=D), torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=D))[None])


def test_training_loss_and_evaluator_nll_agree():
    """λ_F = 1, β = 0: the force loss is ⟨2 NLL − 3 log 2π⟩ of the evaluators."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 3, dtype=D, generator=gen)
    cov = a @ a.transpose(1, 2) + 0.1 * torch.eye(3, dtype=D)
    pred, ref = torch.randn(5, 3, dtype=D, generator=gen), torch.randn(5, 3, dtype=D, generator=gen)
    loss = forces_nll(pred, cov, ref, torch.ones(5, dtype=D), lam=1.0, beta=0.0)
    nll = gaussian_nll_vector(ref - pred, cov)
    assert float(loss) == pytest.approx(float((2 * nll - 3 * LOG_2PI).mean()), rel=1e-12)
