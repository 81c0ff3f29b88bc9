"""OPM's functional core (T-PAMI 2024) against values worked out by hand and the official step restated: the
drop probabilities of ``calcu_q``, the width-weighted rescaling and the per-sample dropping of ``execute_drop``."""

import math

import pytest
import torch

from lightning_balance.functional import opm_drop, opm_drop_probabilities, opm_scale


def test_only_the_leading_modality_gets_a_drop_probability():
    q = opm_drop_probabilities(torch.tensor([6.0, 3.0]), q_base=0.5, lam=0.5)
    # rho = 2 for the first: 0.5 * (1 + 0.5 * tanh(1)); the second trails: 0
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(1.0)), 0.0], rel=1e-6)
    assert opm_drop_probabilities(torch.tensor([3.0, 3.0])).tolist() == [0.0, 0.0]  # a tie drops nothing
    # M = 3: each against the mean of the others; 8 / mean(2, 2) = 4, the others 2 / 5 < 1
    q3 = opm_drop_probabilities(torch.tensor([8.0, 2.0, 2.0]), q_base=0.4, lam=1.0)
    assert q3.tolist() == pytest.approx([0.4 * (1 + math.tanh(3.0)), 0.0, 0.0], rel=1e-6)
    # clipped at 1 (BalanceBenchmark's swapped clip arguments never upper-clip)
    assert opm_drop_probabilities(torch.tensor([100.0, 1.0]), q_base=0.9, lam=0.5)[0] == 1.0


def test_the_rescaling_is_one_width_weighted_factor():
    q = torch.tensor([0.6, 0.0])
    # theta = (512 * 0.6 + 256 * 0) / 768 = 0.4
    assert float(opm_scale(q, [512, 256])) == pytest.approx(1 / 0.6)
    with pytest.raises(ValueError, match="every feature would be dropped"):
        opm_scale(torch.tensor([1.0, 1.0]), [4, 4])
    with pytest.raises(ValueError, match="one positive width per modality"):
        opm_scale(q, [4])


def test_dropping_matches_the_official_step_restated():
    """The official execute_drop: keep ~ Bernoulli(1 - q) per sample and modality, multiply, divide by 1 - theta
    (forward and backward), and drop the samples that kept nothing. Here the draws are given."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=g, requires_grad=True)
    v = torch.randn(4, 2, 5, generator=g, requires_grad=True)  # token features
    q = torch.tensor([0.5, 0.25])
    uniform = torch.tensor([[0.7, 0.1], [0.2, 0.9], [0.4, 0.2], [0.5, 0.3]])
    out, keep, survivors = opm_drop({"a": a, "v": v}, uniform, q, [3, 10])
    want_keep = torch.tensor([[True, False], [False, True], [False, False], [True, True]])
    assert torch.equal(keep, want_keep) and survivors.tolist() == [True, True, False, True]
    theta = (3 * 0.5 + 10 * 0.25) / 13
    torch.testing.assert_close(out["a"], a * want_keep[:, :1] / (1 - theta))
    torch.testing.assert_close(out["v"], v * want_keep[:, 1:, None] / (1 - theta))
    (out["a"].sum() + out["v"].sum()).backward()
    torch.testing.assert_close(a.grad, want_keep[:, :1].expand(4, 3).float() / (1 - theta))
    torch.testing.assert_close(v.grad, want_keep[:, 1:, None].expand(4, 2, 5).float() / (1 - theta))


def test_an_absent_modality_is_never_kept():
    a, v = torch.ones(3, 2), torch.ones(3, 2)
    present = torch.tensor([[True, False], [True, True], [False, True]])
    _, keep, survivors = opm_drop({"a": a, "v": v}, torch.full((3, 2), 0.9), torch.tensor([0.5, 0.0]), [2, 2],
                                  present)
    assert torch.equal(keep, present) and survivors.all()
    _, keep, survivors = opm_drop({"a": a, "v": v}, torch.tensor([[0.1, 0.9]] * 3), torch.tensor([0.5, 0.0]), [2, 2],
                                  present)
    assert survivors.tolist() == [False, True, True]  # the first sample had only a, and a was dropped


def test_bad_shapes_and_parameters_are_named():
    with pytest.raises(ValueError, match=r"uniform must be \(N, M\) = \(2, 2\)"):
        opm_drop({"a": torch.ones(2, 1), "v": torch.ones(2, 1)}, torch.ones(2, 3), torch.zeros(2), [1, 1])
    with pytest.raises(ValueError, match="q_base must be in"):
        opm_drop_probabilities(torch.tensor([1.0, 2.0]), q_base=1.5)


def test_rescue_keeps_the_present_modalities_of_a_sample_that_would_lose_all():
    present = torch.tensor([[True, False], [True, True], [True, True]])
    uniform = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.1, 0.1]])
    q = torch.tensor([0.5, 0.2])
    _, keep, survivors = opm_drop({"a": torch.ones(3, 2), "v": torch.ones(3, 2)}, uniform, q, [2, 2], present,
                                  rescue=True)
    # row 0 had only a, dropped: kept; row 1 kept v; row 2 dropped both: keeps both
    assert keep.tolist() == [[True, False], [False, True], [True, True]] and survivors.all()


def test_a_rescued_sample_is_neither_dropped_nor_rescaled():
    # audio leads (q = 0.75), visual never drops; samples 0-1 have only audio, sample 2 both, sample 3 only visual
    present = torch.tensor([[True, False], [True, False], [True, True], [False, True]])
    features = {"audio": torch.ones(4, 2), "visual": torch.ones(4, 2)}
    uniform = torch.zeros(4, 2)  # every audio draw says "drop"
    q = torch.tensor([0.75, 0.0])
    out, keep, survivors = opm_drop(features, uniform, q, [2, 2], present, rescue=True)
    scale = 1 / (1 - 0.75 * 2 / 4)
    torch.testing.assert_close(out["audio"][:, 0], torch.tensor([1.0, 1.0, 0.0, 0.0]))  # rescued rows unscaled
    torch.testing.assert_close(out["visual"][:, 0], torch.tensor([0.0, 0.0, scale, scale]))
    assert survivors.all() and keep[:2, 0].all()


def test_a_modality_absent_from_the_whole_batch_makes_no_other_lead(tmp_path):
    import lightning.pytorch as pl

    from lightning_balance import OPM
    from tests.helpers import TinyAV, loader, trainer_kwargs

    assert OPM().start_epoch == 6  # the official warm-up: epochs 0-5 untouched (main.py: warm_up if epoch <= 5)
    seen = []

    class NoVisual(TinyAV):
        def training_step(self, batch, batch_idx):
            batch = dict(batch)
            n = len(batch["target"])
            batch["present"] = {"audio": torch.ones(n, dtype=torch.bool), "visual": torch.zeros(n, dtype=torch.bool)}
            z = self.forward_features(batch)
            logits = self.fuse(z, batch["target"], present=batch["present"])
            seen.append(self.balance_record.features["audio"].detach().clone() - z["audio"].detach())
            return torch.nn.functional.cross_entropy(logits, batch["target"])

    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OPM(seed=0, start_epoch=0, p_exe=1.0)], max_epochs=1)).fit(
        NoVisual(), loader())
    assert len(seen) == 4 and all(d.abs().max() == 0 for d in seen)  # audio kept, unscaled, in every batch
