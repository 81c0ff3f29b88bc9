"""Diagnostics against constructed cases with known answers."""

import math

import pytest
import torch

from lightning_balance.functional.diagnostics import (
    effective_rank,
    linear_cka,
    masked_accuracy_value,
    numerical_rank,
    shapley_contributions,
    variance_inflation,
)


def test_ranks_of_known_matrices():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 20, generator=g)  # rank 3
    assert numerical_rank(low) == 3
    assert numerical_rank(torch.randn(200, 20, generator=g)) == 20
    # effective rank: isotropic in k dimensions -> about k; one dominant direction -> about 1
    iso = torch.zeros(400, 10)
    iso[:, :4] = torch.randn(400, 4, generator=g)
    assert effective_rank(iso) == pytest.approx(4.0, rel=0.05)
    spiky = torch.randn(400, 10, generator=g) * torch.tensor([100.0] + [1e-3] * 9)
    assert effective_rank(spiky) < 1.1
    assert effective_rank(torch.ones(5, 3)) == 0.0


def test_cka_known_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-6)  # rotation and scale
    assert linear_cka(x, torch.randn(500, 8, generator=g)) < 0.05  # independent
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, x[:10])


def test_vif_rises_with_duplicated_features():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1000, 4, generator=g)
    assert variance_inflation(z).max() < 1.1
    dup = torch.cat([z, z[:, :1] + 0.01 * torch.randn(1000, 1, generator=g)], dim=1)
    vif = variance_inflation(dup)
    assert vif[0] > 100 and vif[-1] > 100 and vif[1:4].max() < 1.1


def test_shapley_by_hand_and_a_noise_modality():
    # two players: v(a)=0.6, v(v)=0.9, v(av)=0.95, v(∅)=0.1
    table = {frozenset(): 0.1, frozenset("a"): 0.6, frozenset("v"): 0.9, frozenset("av"): 0.95}
    phi = shapley_contributions(lambda s: table[frozenset("".join(sorted(s)))], ["a", "v"])
    assert phi["a"] == pytest.approx(0.5 * (0.6 - 0.1) + 0.5 * (0.95 - 0.9))
    assert phi["v"] == pytest.approx(0.5 * (0.9 - 0.1) + 0.5 * (0.95 - 0.6))
    assert phi["a"] + phi["v"] == pytest.approx(0.95 - 0.1)  # efficiency
    # a fused predictor that ignores a pure-noise modality: its contribution is exactly 0
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (300,), generator=g)
    feats = {"signal": torch.nn.functional.one_hot(y, 3).float(), "noise": torch.randn(300, 3, generator=g)}
    def fuse_subset(f, present):  # the contract's way: absent modalities are zeroed
        kept = {k: (z if k in present else torch.zeros_like(z)) for k, z in f.items()}
        return kept["signal"] * 5 + 0.0 * kept["noise"]

    value = masked_accuracy_value(fuse_subset, feats, y)
    phi = shapley_contributions(value, ["signal", "noise"])
    assert phi["noise"] == pytest.approx(0.0, abs=1e-9)
    empty = value(frozenset())  # everything zeroed: the accuracy of always predicting class 0
    assert phi["signal"] == pytest.approx(1 - empty)
    assert math.isclose(sum(phi.values()), 1 - empty)
