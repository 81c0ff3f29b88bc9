"""OGM / OGM-GE math against values computed by hand from the paper's formulas."""

import math

import pytest
import torch

from lightning_balance._distributed import shared_generator
from lightning_balance.functional import (
    ge_noise_std,
    modality_scores,
    ogm_coefficients,
    ogm_ratios,
    true_class_probability,
)


def softmax_row(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_true_class_probability_and_scores_by_hand():
    audio = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]]
    visual = [[0.0, 0.0, 0.0], [1.0, -1.0, 2.0], [0.2, 0.1, 0.0]]
    y = [0, 1, 2]
    s_a = sum(softmax_row(r)[t] for r, t in zip(audio, y))
    s_v = sum(softmax_row(r)[t] for r, t in zip(visual, y))
    stacked = torch.tensor([audio, visual])
    targets = torch.tensor(y)
    per_sample = true_class_probability(stacked, targets)
    assert per_sample.shape == (2, 3)
    assert per_sample[0, 0].item() == pytest.approx(softmax_row(audio[0])[0], rel=1e-6)
    scores = modality_scores(stacked, targets)
    assert scores.tolist() == pytest.approx([s_a, s_v], rel=1e-6)


def test_scores_are_float32_for_half_logits():
    logits = torch.randn(2, 4, 5).half()
    assert modality_scores(logits, torch.tensor([0, 1, 2, 3])).dtype == torch.float32


def test_two_modality_coefficients_by_hand():
    # s_a = 2, s_v = 1, alpha = 0.5: rho_a = 2 -> k_a = 1 - tanh(1); rho_v = 0.5 -> k_v = 1
    ratios, coeffs = ogm_coefficients(torch.tensor([2.0, 1.0]), alpha=0.5)
    assert ratios.tolist() == pytest.approx([2.0, 0.5])
    assert coeffs.tolist() == pytest.approx([1 - math.tanh(1.0), 1.0])
    # exact tie: the official `if ratio_v > 1: ... else:` branch slows audio (the first modality)
    _, coeffs = ogm_coefficients(torch.tensor([3.0, 3.0]), alpha=0.8)
    assert coeffs.tolist() == pytest.approx([1 - math.tanh(0.8), 1.0])
    # just above 1: k jumps to 1 - tanh(alpha * rho)
    _, coeffs = ogm_coefficients(torch.tensor([3.0003, 3.0]), alpha=0.8)
    assert coeffs[0].item() == pytest.approx(1 - math.tanh(0.8 * 1.0001), rel=1e-5)


def test_m_modality_generalisation_by_hand_and_reduces_to_paper():
    # s = [3, 1, 2]: rho_0 = 3 / 1.5, rho_1 = 1 / 2.5, rho_2 = 2 / 2
    ratios, coeffs = ogm_coefficients(torch.tensor([3.0, 1.0, 2.0]), alpha=0.1)
    assert ratios.tolist() == pytest.approx([2.0, 0.4, 1.0])
    assert coeffs.tolist() == pytest.approx([1 - math.tanh(0.2), 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(2, generator=g) * 30
        r = ogm_ratios(s)
        assert r[0].item() == pytest.approx((s[0] / s[1]).item(), rel=1e-6)
        assert r[1].item() == pytest.approx((s[1] / s[0]).item(), rel=1e-6)


def test_near_zero_scores_are_clamped():
    ratios, coeffs = ogm_coefficients(torch.tensor([1.0, 0.0]), alpha=0.1, eps=1e-8)
    assert torch.isfinite(ratios).all() and torch.isfinite(coeffs).all()
    assert coeffs[0].item() == pytest.approx(0.0, abs=1e-6)  # 1 - tanh(huge)
    assert coeffs[1].item() == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        ogm_coefficients(torch.tensor([1.0, 2.0]), alpha=-1)
    with pytest.raises(ValueError, match="M >= 2"):
        ogm_ratios(torch.tensor([1.0]))


def test_ge_noise_std_by_hand():
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # unbiased std of 1..4 = sqrt(5/3)
    assert ge_noise_std(g).item() == pytest.approx(math.sqrt(5 / 3) + 1e-8, rel=1e-6)
    assert ge_noise_std(torch.tensor([5.0])).item() == pytest.approx(1e-8)


def test_shared_generator_is_a_function_of_seed_and_counter():
    a = torch.randn(5, generator=shared_generator(3, 7, torch.device("cpu")))
    b = torch.randn(5, generator=shared_generator(3, 7, torch.device("cpu")))
    c = torch.randn(5, generator=shared_generator(3, 8, torch.device("cpu")))
    d = torch.randn(5, generator=shared_generator(4, 7, torch.device("cpu")))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
