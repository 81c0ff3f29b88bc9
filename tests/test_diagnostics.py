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


# ---------------------------------------------------------------------------- VIF (defect 21)
def test_vif_matches_the_regression_definition():
    # VIF_j = 1 / (1 - R_j^2), R_j^2 of an ordinary least-squares fit of feature j on the others + intercept
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 3, generator=g, dtype=torch.float64)
    z = torch.cat([base, base @ torch.tensor([[0.7], [0.2], [0.0]], dtype=torch.float64)
                   + 0.3 * torch.randn(300, 1, generator=g, dtype=torch.float64)], dim=1)
    expected = []
    for j in range(z.shape[1]):
        others = torch.cat([torch.ones(300, 1, dtype=torch.float64), z[:, [k for k in range(4) if k != j]]], dim=1)
        coef = torch.linalg.lstsq(others, z[:, j:j + 1]).solution
        residual = z[:, j:j + 1] - others @ coef
        r2 = 1 - residual.square().sum() / (z[:, j] - z[:, j].mean()).square().sum()
        expected.append(float(1 / (1 - r2)))
    assert variance_inflation(z).tolist() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("n, d", [(40, 64), (40, 39), (40, 38)])
def test_vif_needs_more_samples_than_features(n, d):
    # pure noise: every VIF should be near 1, but with d >= n - 1 the regression of a feature on the d - 1
    # others (plus the intercept) has no residual left, and the factors only measure the ridge (~1e5)
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(5))
    if d >= n - 1:
        with pytest.warns(UserWarning, match=r"needs at least \d+ samples.*vif=False"):
            vif = variance_inflation(z)
        assert vif.shape == (d,) and torch.isnan(vif).all()
    else:
        vif = variance_inflation(z)
        assert torch.isfinite(vif).all() and vif.min() >= 1.0


# ---------------------------------------------------------------------------- uncertainties (defect 20)
def two_modality_problem(n=600, seed=0, strength=(1.0, 1.0)):
    """Two modalities that each carry the class with the given strength, and a fixed concat head."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    feats = {"a": strength[0] * onehot + torch.randn(n, 3, generator=g),
             "b": strength[1] * onehot + torch.randn(n, 3, generator=g)}

    def fuse_subset(f, present):
        return sum(f[m] if m in present else torch.zeros_like(f[m]) for m in ("a", "b"))

    return feats, y, fuse_subset


def test_standard_errors_match_their_analytic_values():
    from lightning_balance.functional import collapse_diagnostics

    feats, y, fuse_subset = two_modality_problem()
    values = collapse_diagnostics(feats, y, fuse_subset, 3, probe=False, vif=False, bootstrap=2000)
    n = y.shape[0]

    def correct(present):
        return (fuse_subset(feats, present).argmax(-1) == y).double()

    # an accuracy is a mean of n Bernoulli outcomes: SE = sqrt(p (1 - p) / n)
    p = correct({"a", "b"}).mean()
    assert values["acc_fused_se"] == pytest.approx(float((p * (1 - p) / n).sqrt()), rel=0.1)
    # for two modalities phi_a = mean_i x_i with x_i = (c_a - c_0 + c_ab - c_b) / 2 per sample: SE = std(x) / sqrt(n)
    c0, ca, cb, cab = correct(set()), correct({"a"}), correct({"b"}), correct({"a", "b"})
    for m, x in (("a", (ca - c0 + cab - cb) / 2), ("b", (cb - c0 + cab - ca) / 2)):
        assert values[f"contribution/{m}"] == pytest.approx(float(x.mean()), abs=1e-12)
        assert values[f"contribution_se/{m}"] == pytest.approx(float(x.std() / n**0.5), rel=0.1)
    lead = (ca - cb) if values["contribution/a"] > values["contribution/b"] else (cb - ca)  # phi_a - phi_b per sample
    assert values["contribution_lead_se"] == pytest.approx(float(lead.std() / n**0.5), rel=0.1)
    drop = cab - cb  # acc_fused - acc_without/a per sample
    assert values["drop_se/a"] == pytest.approx(float(drop.std() / n**0.5), rel=0.1)
    # deterministic for a seed, different draws for another
    again = collapse_diagnostics(feats, y, fuse_subset, 3, probe=False, vif=False, bootstrap=2000)
    other = collapse_diagnostics(feats, y, fuse_subset, 3, probe=False, vif=False, bootstrap=2000, seed=1)
    assert again["contribution_se/a"] == values["contribution_se/a"] != other["contribution_se/a"]


def test_views_of_one_sample_are_resampled_together():
    from lightning_balance.functional.diagnostics import bootstrap_means

    x = (torch.rand(3, 50, generator=torch.Generator().manual_seed(6)) > 0.5).double()
    single = bootstrap_means(x, replicates=300, seed=3)
    # every sample twice (two identical views), grouped by sample: the very same replicates
    twice = bootstrap_means(x.repeat_interleave(2, dim=1), torch.arange(50).repeat_interleave(2), 300, seed=3)
    torch.testing.assert_close(twice, single)
    # without the groups the 100 rows would pass for 100 independent samples: an SE too small by ~sqrt(2)
    naive = bootstrap_means(x.repeat_interleave(2, dim=1), replicates=300, seed=3)
    assert (naive.std(0) / single.std(0)).mean() == pytest.approx(2**-0.5, rel=0.15)


def test_equal_modalities_are_not_called_dominant():
    from lightning_balance.functional import collapse_diagnostics, imbalance_verdict

    feats, y, fuse_subset = two_modality_problem(strength=(1.0, 1.0))
    values = collapse_diagnostics(feats, y, fuse_subset, 3, probe=False, vif=False)
    assert values["contribution/a"] != values["contribution/b"]  # a point estimate alone would name one
    assert values["contribution_lead"] < 1.96 * values["contribution_lead_se"]
    verdict = imbalance_verdict(values, ["a", "b"])
    assert verdict[0].startswith("No modality clearly dominates") and "interval includes 0" in verdict[0]
    assert not any("IGNORED" in line for line in verdict)
    # a real imbalance at the same sample size is reported, with its interval
    feats, y, fuse_subset = two_modality_problem(strength=(2.0, 0.5))
    values = collapse_diagnostics(feats, y, fuse_subset, 3, probe=False, vif=False)
    line = imbalance_verdict(values, ["a", "b"])[0]
    assert line.startswith("a dominates: Shapley contribution to accuracy") and "±" in line


def test_verdict_reports_only_gaps_beyond_their_noise():
    from lightning_balance.functional import diagnostics_table, imbalance_verdict

    values = {"acc_fused": 0.9, "acc_fused_se": 0.012, "contribution/a": 0.351, "contribution/v": 0.349,
              "contribution_se/a": 0.02, "contribution_se/v": 0.02, "contribution_lead": 0.002,
              "contribution_lead_se": 0.03, "contribution_ratio": 1.006,
              "acc_without/a": 0.55, "acc_without/v": 0.56, "drop/a": 0.35, "drop/v": 0.34,
              "drop_se/a": 0.02, "drop_se/v": 0.02,
              "probe/a": 0.595, "probe_se/a": 0.02, "probe/v": 0.40, "probe_se/v": 0.02}
    text = "\n".join(imbalance_verdict(values, ["a", "v"], alone_probe={"a": 0.62, "v": 0.62}))
    assert "No modality clearly dominates" in text and "dominates:" not in text.replace("clearly dominates:", "")
    # 0.025 below alone, tolerance 0.02 -- but one SE of the probe is 0.02: no finding
    assert "a encoder: linear probe 0.595 ± 0.039 after joint training vs 0.620 trained alone -> no clear gap" in text
    assert "v encoder: linear probe 0.400 ± 0.039 after joint training vs 0.620 trained alone -> UNDER-LEARNED" in text
    # the reference's own noise widens the interval: (mean, se) pairs
    text = "\n".join(imbalance_verdict(values, ["a", "v"], alone_probe={"a": (0.62, 0.12), "v": (0.62, 0.12)}))
    assert "0.620 ± 0.235 trained alone -> no clear gap" in text and "UNDER-LEARNED" not in text
    # a contribution of 0 +- 0 is ignored; 0.005 +- 0.02 is neither ignored nor a finding
    ignored = {**values, "contribution/v": 0.0, "contribution_se/v": 0.0, "drop/v": 0.0, "drop_se/v": 0.0}
    assert any(line.startswith("v is IGNORED") for line in imbalance_verdict(ignored, ["a", "v"]))
    unclear = {**ignored, "contribution/v": 0.005, "contribution_se/v": 0.02}
    lines = imbalance_verdict(unclear, ["a", "v"])
    assert not any("IGNORED" in line for line in lines)
    assert any(line.startswith("v: contribution 0.005 ± 0.039 is not distinguishable from 0") for line in lines)
    table = diagnostics_table(values, ["a", "v"], {"a": (0.62, 0.01)})
    assert "| a | 0.351 ± 0.039 | 0.550 | 0.595 ± 0.039 | 0.620 ± 0.020 |" in table
    assert "fused (acc 0.900 ± 0.024)" in table and "1.96 standard errors" in table


# ---------------------------------------------------------------------------- failures warn (defect 22), tokens (18)
def test_non_finite_features_and_too_few_samples_warn_instead_of_raising():
    from lightning_balance.functional import collapse_diagnostics

    feats, y, fuse_subset = two_modality_problem(n=60)
    feats["a"][3, 1] = math.nan
    with pytest.warns(UserWarning, match="features of 'a' are not finite .* in 1 of 60 samples"):
        values = collapse_diagnostics(feats, y, fuse_subset, 3)
    assert math.isnan(values["erank/a"]) and math.isnan(values["probe/a"]) and math.isnan(values["vif_mean/fused"])
    assert math.isfinite(values["erank/b"]) and math.isfinite(values["probe/b"])
    assert math.isfinite(values["contribution/a"])  # what the model does with them is still measured
    feats, y, fuse_subset = two_modality_problem(n=3)
    with pytest.warns(UserWarning, match="need at least 4 labelled samples, got 3"):
        values = collapse_diagnostics(feats, y, fuse_subset, 3, vif=False)
    assert math.isnan(values["probe/a"]) and values["samples"] == 3 and math.isfinite(values["acc_fused"])


def test_token_features_reach_the_fusion_in_their_own_shape():
    from lightning_balance.functional import collapse_diagnostics

    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, 3, (50,), generator=g)
    tokens = {m: torch.nn.functional.one_hot(y, 3).float()[:, None, :] + torch.randn(50, 5, 3, generator=g)
              for m in ("a", "b")}
    shapes = []

    def fuse_subset(f, present):  # a fusion that only takes (N, T, D) tokens, as attention does
        shapes.append({m: tuple(z.shape) for m, z in f.items()})
        return sum(f[m].mean(1) if m in present else f[m].mean(1) * 0 for m in ("a", "b"))

    values = collapse_diagnostics(tokens, y, fuse_subset, 3, vif=False)
    assert all(s == {"a": (50, 5, 3), "b": (50, 5, 3)} for s in shapes)
    # ranks of the pooled vectors: width D = 3, not T * D = 15
    pooled = tokens["a"].mean(1).double()
    centred = pooled - pooled.mean(0)
    assert values["nrank/a"] == int(torch.linalg.matrix_rank(centred)) == 3
    assert values["erank_norm/a"] == pytest.approx(values["erank/a"] / 3)


def test_numerical_rank_of_half_precision_features():
    """Rank-3 features computed in bf16 (200 samples): numpy's max(N, d)·eps tolerance would exceed 1 and give 0;
    read back in float32 without their precision, the rounding noise would count as rank."""
    from lightning_balance.functional.diagnostics import numerical_rank

    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 32, generator=g)
    half = low.bfloat16()
    assert numerical_rank(low) == 3
    assert numerical_rank(half) == 3
    assert numerical_rank(half.float(), precision=torch.bfloat16) == 3
    assert numerical_rank(half.float()) > 3  # the reason the callback passes the features' precision


def test_verdict_warns_first_when_the_model_is_at_chance():
    from lightning_balance.functional import diagnostics_from_correctness, imbalance_verdict

    # 3 of 4 targets are class 0: always predicting it scores 0.75, written out here
    targets = torch.tensor([0, 0, 0, 1] * 10)
    assert diagnostics_from_correctness(torch.ones(4, 40, dtype=torch.bool), ["a", "v"], targets=targets,
                                        probe=False, vif=False, bootstrap=50)["acc_majority"] == 0.75
    values = {"acc_fused": 0.76, "acc_fused_se": 0.03, "acc_majority": 0.75, "contribution/a": 0.3,
              "contribution/v": 0.0, "contribution_se/a": 0.02, "contribution_se/v": 0.0,
              "drop/a": 0.3, "drop/v": 0.0, "drop_se/a": 0.02, "drop_se/v": 0.0,
              "acc_without/a": 0.46, "acc_without/v": 0.76}
    lines = imbalance_verdict(values, ["a", "v"])
    assert lines[0].startswith("The fused model is not clearly above chance yet (accuracy 0.760 ± 0.059 vs 0.750")
    trained = imbalance_verdict({**values, "acc_fused": 0.95, "acc_fused_se": 0.01}, ["a", "v"])
    assert not any("chance" in line for line in trained)
