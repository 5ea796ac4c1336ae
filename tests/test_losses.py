"""The three losses against values computed by hand."""

import math

import pytest
import torch

from ase_race.training.losses import LossWeights, compute_loss

D = torch.float64


def batch(weights=(1.0, 1.0)):
    w = torch.tensor(weights, dtype=D)
    n = torch.tensor([1, 2])
    pred = {
        "energy": torch.tensor([2.0, 1.0], dtype=D),
        "energy_var": torch.tensor([0.25, 1.0], dtype=D),
        "forces": torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0]], dtype=D),
        "forces_cov": torch.stack([torch.eye(3), torch.eye(3), 2 * torch.eye(3)]).to(D),
    }
    ref = {
        "energy": torch.tensor([1.0, 2.0], dtype=D),  # residuals E − μ = −1, +1
        "forces": torch.zeros(3, 3, dtype=D),
        "weight": w,
        "atom_weight": torch.repeat_interleave(w, n),
    }
    return pred, ref


def test_mse():
    loss, parts = compute_loss("mse", *batch(), LossWeights(energy=2.0, forces=10.0))
    # energy: λ_E ⟨r²⟩ with residuals −1, +1
    assert parts["energy"] == pytest.approx(2.0)
    # forces: |ΔF|² per atom 1, 4, 0 → mean 5/3, times λ_F = 10
    assert parts["forces"] == pytest.approx(50 / 3)
    assert float(loss) == pytest.approx(2.0 + 50 / 3)


def test_nll_e():
    _, parts = compute_loss("nll_e", *batch(), LossWeights(energy=2.0, forces=10.0))
    # λ_E ⟨r²/σ²⟩ + ⟨log σ²⟩ = 2 · (1/0.25 + 1/1)/2 + (log 0.25 + 0)/2
    assert parts["energy"] == pytest.approx(5.0 + 0.5 * math.log(0.25))
    assert parts["forces"] == pytest.approx(50 / 3)


def test_nll_jef():
    _, parts = compute_loss("nll_jef", *batch(), LossWeights(energy=1.0, forces=10.0))
    assert parts["energy"] == pytest.approx(2.5 + 0.5 * math.log(0.25))
    # ΔFᵀΣ⁻¹ΔF = 1, 4, 0; log det Σ = 0, 0, log 8
    assert parts["forces"] == pytest.approx(10 * 5 / 3 + math.log(8) / 3)


def test_config_weights():
    pred, ref = batch(weights=(3.0, 1.0))
    pred["energy"] = torch.tensor([3.0, 1.5], dtype=D)  # residuals −2, +0.5
    _, parts = compute_loss("mse", pred, ref, LossWeights(energy=1.0, forces=1.0))
    assert parts["energy"] == pytest.approx((3 * 4.0 + 1 * 0.25) / 4)
    # atom weights 3, 1, 1
    assert parts["forces"] == pytest.approx((3 * 1 + 4 + 0) / 5)


def test_warmup_is_the_mean_only_mse():
    warm, parts = compute_loss("nll_jef", *batch(), LossWeights(energy=2.0, forces=10.0), warmup=True)
    plain, _ = compute_loss("mse", *batch(), LossWeights(energy=2.0, forces=10.0))
    assert float(warm) == float(plain) == pytest.approx(2.0 + 50 / 3)


def test_beta_nll_weights_terms_by_variance():
    _, parts = compute_loss("nll_jef", *batch(), LossWeights(energy=1.0, forces=1.0, beta=0.5))
    e_terms = [(4.0 + math.log(0.25)) * 0.25**0.5, (1.0 + 0.0) * 1.0]
    assert parts["energy"] == pytest.approx(sum(e_terms) / 2)
    f_terms = [1.0 * 1.0, 4.0 * 1.0, math.log(8) * 2**0.5]
    assert parts["forces"] == pytest.approx(sum(f_terms) / 3)


def test_global_normalisation_for_split_batches():
    """Given the totals of the whole batch, a half batch contributes its share of the loss."""
    pred, ref = batch()
    whole, _ = compute_loss("nll_jef", pred, ref, LossWeights())
    first = {k: v[:1] for k, v in pred.items()}
    second = {k: v[1:] for k, v in pred.items()}
    halves = []
    for p, sl_e, sl_a in ((first, slice(0, 1), slice(0, 1)), (second, slice(1, 2), slice(1, 3))):
        p = {"energy": pred["energy"][sl_e], "energy_var": pred["energy_var"][sl_e],
             "forces": pred["forces"][sl_a], "forces_cov": pred["forces_cov"][sl_a]}
        r = {"energy": ref["energy"][sl_e], "forces": ref["forces"][sl_a],
             "weight": ref["weight"][sl_e], "atom_weight": ref["atom_weight"][sl_a],
             "weight_total": ref["weight"].sum(), "atom_weight_total": ref["atom_weight"].sum()}
        halves.append(compute_loss("nll_jef", p, r, LossWeights())[0])
    assert float(halves[0] + halves[1]) == pytest.approx(float(whole))


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'nll'"):
        compute_loss("nll", *batch(), LossWeights())
