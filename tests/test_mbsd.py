"""MBSD loss term: the per-sample weights, logit distance and stronger-to-weaker KL on hand-computed values; the
parameters after several steps against BalanceBenchmark's MBSDTrainer restated here with its per-sample loop (and
the KL over the classes), with and without accumulation, with the weight's gradient kept or not; DDP against one
process; resume inside an epoch; absent modalities; M = 3; ignore_index; bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import MBSDLoss, ModalityContractError
from lightning_balance.functional import mbsd_distillation, mbsd_pair_terms
from tests.helpers import (SaveParams, TinyAV, flat_params, loader, resumable_loader, resume_inside_an_epoch,
                           trainer_kwargs)


def pair_loop(oa, ov, y, detach_weight=True):
    """BalanceBenchmark's per-sample loop for one pair (MBSD_trainer.py), the KL taken over the classes from the
    sample's stronger modality (detached) to its weaker one: Σ_i w_i (RS_i + KL_i) / N."""
    pa, pv = F.softmax(oa, 1), F.softmax(ov, 1)
    total = 0.0
    for i in range(len(y)):
        ta, tv = pa[i][y[i]], pv[i][y[i]]
        w = 0.0
        if pa[i].argmax() == y[i] or pv[i].argmax() == y[i]:
            w = max(ta, tv) - min(ta, tv)
            w = w.detach() if detach_weight else w
        rs = 1 / oa.shape[1] * torch.sum((oa[i] - ov[i]) ** 2)
        strong, weak = (pa[i], pv[i]) if ta >= tv else (pv[i], pa[i])
        kl = torch.sum(strong.detach() * (strong.detach().log() - weak.log()))
        total = total + w * (rs + kl)
    return total / len(y)


def test_hand_computed_pair():
    # sample 0: y=0, audio (.75, .25) right, visual (.5, .5) (argmax 0: right): w = .25, audio teaches visual
    # sample 1: y=1, both predict 0: w = 0
    oa = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    ov = torch.tensor([[0.0, 0.0], [math.log(4), 0.0]])
    y = torch.tensor([0, 1])
    w, rs, kl = mbsd_pair_terms(oa, ov, y)
    assert w.tolist() == pytest.approx([0.25, 0.0])
    assert rs.tolist() == pytest.approx([math.log(3) ** 2 / 2, (math.log(3) - math.log(4)) ** 2 / 2])
    assert kl[0].item() == pytest.approx(.75 * math.log(.75 / .5) + .25 * math.log(.25 / .5))
    # sample 1: true-class probabilities audio .25, visual .2: audio is the stronger one and teaches
    assert kl[1].item() == pytest.approx(.25 * math.log(.25 / .2) + .75 * math.log(.75 / .8), abs=1e-6)
    value, stats = mbsd_distillation([oa, ov], y)
    assert value.item() == pytest.approx(0.25 * (rs[0] + kl[0]).item() / 2)
    assert stats["weight"].item() == pytest.approx(0.125)


def test_three_modalities_average_the_pairs_and_counting_masks():
    g = torch.Generator().manual_seed(0)
    o = [torch.randn(9, 4, generator=g) * 2 for _ in range(3)]
    y = torch.randint(0, 4, (9,), generator=g)
    expected = (pair_loop(o[0], o[1], y) + pair_loop(o[0], o[2], y) + pair_loop(o[1], o[2], y)) / 3
    torch.testing.assert_close(mbsd_distillation(o, y)[0], expected)
    counted = torch.rand(3, 9, generator=g) > 0.3
    rows = lambda i, j: (counted[i] & counted[j]).nonzero().flatten()  # noqa: E731
    pairs = [pair_loop(o[i][rows(i, j)], o[j][rows(i, j)], y[rows(i, j)]) * len(rows(i, j)) / 9
             for i, j in ((0, 1), (0, 2), (1, 2))]
    torch.testing.assert_close(mbsd_distillation(o, y, counted)[0], sum(pairs) / 3)


class MBSDAV(TinyAV):
    def __init__(self, seed=0, **term):
        super().__init__(seed=seed)
        self.configure_loss_terms([MBSDLoss(**term)])

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


def bb_recipe(model, epochs, batch_size, accumulate=1, detach_weight=True):
    """MBSDTrainer.training_step restated for TinyAV's concat head (the unimodal logits its halves with b/2):
    CE(fused) + CE(audio) + CE(visual) + Σ_i w_i (RS_i + KL_i) / N; SGD(0.1, momentum 0.9)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w, b = model.head.weight, model.head.bias
    for _ in range(epochs):
        for i, batch in enumerate(loader(batch_size=batch_size)):
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            y = batch["target"]
            oa, ov = za @ w[:, :8].T + b / 2, zv @ w[:, 8:].T + b / 2
            loss = (F.cross_entropy(model.head(torch.cat([za, zv], 1)), y) + F.cross_entropy(oa, y)
                    + F.cross_entropy(ov, y) + pair_loop(oa, ov, y, detach_weight))
            (loss / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()


@pytest.mark.parametrize("accumulate,detach_weight", [(1, True), (2, True), (1, False)])
def test_parameters_follow_the_benchmark_recipe_over_several_steps(tmp_path, accumulate, detach_weight):
    model = MBSDAV(detach_weight=detach_weight)
    pl.Trainer(**trainer_kwargs(tmp_path, accumulate_grad_batches=accumulate)).fit(model, loader(batch_size=16 // accumulate))
    reference = MBSDAV()
    bb_recipe(reference, 2, 16 // accumulate, accumulate, detach_weight)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    other = MBSDAV(detach_weight=not detach_weight)
    pl.Trainer(**trainer_kwargs(tmp_path, accumulate_grad_batches=accumulate)).fit(other, loader(batch_size=16 // accumulate))
    assert (flat_params(other) - flat_params(model)).abs().max() > 1e-5  # the weight's gradient matters


def test_without_unimodal_losses_only_the_distillation_is_added(tmp_path):
    seen = []

    class Watch(MBSDAV):
        def training_step(self, batch, batch_idx):
            total = super().training_step(batch, batch_idx)
            r = self.balance_record
            oa, ov = (r.features["audio"] @ self.head.weight[:, :8].T + self.head.bias / 2,
                      r.features["visual"] @ self.head.weight[:, 8:].T + self.head.bias / 2)
            seen.append((total.item(), (F.cross_entropy(r.logits, batch["target"]) + pair_loop(oa, ov, batch["target"])).item()))
            return total

    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(Watch(unimodal_losses=False), loader())
    assert len(seen) == 4 and all(a == pytest.approx(b, rel=1e-5) for a, b in seen)


@pytest.mark.timeout(300)
def test_ddp_equals_one_process_with_absent_modalities(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParams(str(ddp_dir))], devices=2, strategy="ddp_spawn",
                                use_distributed_sampler=False)).fit(MBSDAV(), loader(batch_size=8, missing=(0.2, 0.2)))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = MBSDAV()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(single, loader(missing=(0.2, 0.2)))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_resume_inside_an_epoch(tmp_path):
    straight, _, resumed, _ = resume_inside_an_epoch(tmp_path, lambda: [], lambda seed=0: MBSDAV(seed=seed),
                                                     resumable_loader, step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)


def test_absent_modalities_and_unlabelled_samples_count_nowhere(tmp_path):
    seen = []

    class Watch(MBSDAV):
        def training_step(self, batch, batch_idx):
            y = batch["target"].clone()
            y[:2] = -100  # two unlabelled samples per batch
            logits = self.fuse(self.forward_features(batch), y, present=batch["present"])
            r = self.balance_record
            value, _ = self.balance_losses["mbsd"].from_record(self, r)
            oa = r.features["audio"] @ self.head.weight[:, :8].T + self.head.bias / 2
            ov = r.features["visual"] @ self.head.weight[:, 8:].T + self.head.bias / 2
            lab = y != -100
            has_a, has_v = batch["present"]["audio"] & lab, batch["present"]["visual"] & lab
            both = has_a & has_v
            n = int(lab.sum())  # every sum over the labelled samples' count (add_unimodal_losses' convention)
            expected = (F.cross_entropy(oa[has_a], y[has_a], reduction="sum") / n
                        + F.cross_entropy(ov[has_v], y[has_v], reduction="sum") / n
                        + pair_loop(oa[both], ov[both], y[both]) * int(both.sum()) / n)
            seen.append((value.item(), expected.item()))
            return F.cross_entropy(logits, y) + value

    model = Watch()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, loader(missing=(0.3, 0.3)))
    assert len(seen) == 4 and all(a == pytest.approx(b, rel=1e-5) for a, b in seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unimodal_losses"):
        MBSDLoss(unimodal_losses=1)
    with pytest.raises(ValueError, match="at least two"):
        mbsd_distillation([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long))

    class NoTargets(MBSDAV):
        def training_step(self, batch, batch_idx):
            self.fuse(self.forward_features(batch))
            return self.add_loss_terms(torch.zeros((), requires_grad=True))

    with pytest.raises(ModalityContractError, match="fuse\\(features, targets\\)"):
        pl.Trainer(**trainer_kwargs(tmp_path)).fit(NoTargets(), loader())
