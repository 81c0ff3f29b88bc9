"""AMCo: the curriculum, the class mask and the dependence mass on hand-computed values; the parameters after three
epochs against BalanceBenchmark's AMCoTrainer restated here (split-head logits, masks on the flagged modality's
slice, the unimodal cross-entropies on the masked logits, the flags from one softmax over the concatenated logits),
with and without accumulation; DDP against one process and ranks identical; resume inside an epoch; the refusal for
a fusion that is not a split concat head; the warning without unimodal losses; bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import AMCo, ModalityContractError
from lightning_balance.functional import amco_class_mask, amco_dependence_mass, amco_mask_logits, amco_mask_ratio
from tests.helpers import (SaveParams, TinyAV, flat_params, loader, resumable_loader, resume_inside_an_epoch,
                           states_equal, trainer_kwargs)


def _generator(seed, counter):
    """The documented stream: a generator seeded by a splitmix of (seed, draw count)."""
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


def test_curriculum_mask_and_mass_by_hand():
    assert amco_mask_ratio(0.0) == 0.0
    assert amco_mask_ratio(0.1) == pytest.approx(math.sin(math.pi / 6))
    assert amco_mask_ratio(0.2) == pytest.approx(math.sin(math.pi / 3))
    assert amco_mask_ratio(0.3) == amco_mask_ratio(5.0) == pytest.approx(1.0)
    mask = amco_class_mask(10, 0.55, torch.Generator().manual_seed(0))
    assert int((mask == 0).sum()) == 5 and set(mask.tolist()) == {0.0, 1.0}
    assert torch.equal(amco_class_mask(4, 0.0), torch.ones(4))
    o = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (M=2, N=1, C=2)
    fused = o.sum(0)
    out, masked = amco_mask_logits(fused, o, torch.tensor([False, True]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([[4.0, 2.0]]))  # visual's class 1 removed
    torch.testing.assert_close(masked[1], torch.tensor([[3.0, 0.0]]))
    e = torch.exp(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(amco_dependence_mass(o), torch.stack([e[:2].sum(), e[2:].sum()]) / e.sum())


def bb_amco(model, epochs, seed, batch_size=16, accumulate=1, sigma=0.5, eps=0.3, classes=4):
    """AMCoTrainer restated for TinyAV's concat head: per batch the mask (sin curriculum, l_t += epoch/10), the
    flagged modalities' split logits masked, fused = their sum, loss = CE(fused) + Σ CE(masked o_m), then the flags
    from one softmax over [o_a; o_v] averaged over the batch. SGD(0.1, momentum 0.9)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w, b = model.head.weight, model.head.bias
    draw, flagged = 0, 0
    for epoch in range(epochs):
        l_t, dep = 0.0, [False, False]
        for i, batch in enumerate(loader(batch_size=batch_size)):
            pt = math.sin(math.pi / 2 * (min(eps, l_t) / eps))
            n_masked = int(pt * classes)
            mask = torch.ones(classes)
            if n_masked:
                mask[torch.randperm(classes, generator=_generator(seed, draw))[:n_masked]] = 0.0
            draw += 1
            l_t += epoch / 10
            y = batch["target"]
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            oa, ov = za @ w[:, :8].T + b / 2, zv @ w[:, 8:].T + b / 2
            if dep[0]:
                oa = oa * mask
            if dep[1]:
                ov = ov * mask
            flagged += int(any(dep) and n_masked > 0)
            loss = F.cross_entropy(oa + ov, y) + F.cross_entropy(oa, y) + F.cross_entropy(ov, y)
            (loss / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()
            sft = F.softmax(torch.cat([oa, ov], 1).detach(), dim=1)
            dep = [bool(sft[:, :classes].sum() / len(y) > sigma), bool(sft[:, classes:].sum() / len(y) > sigma)]
    return flagged


@pytest.mark.parametrize("accumulate", [1, 2])
def test_parameters_follow_the_benchmark_recipe_over_three_epochs(tmp_path, accumulate):
    cb = AMCo(seed=5)
    model = TinyAV(aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3, accumulate_grad_batches=accumulate)).fit(
        model, loader(batch_size=16 // accumulate))
    reference = TinyAV(aux_losses=True)
    flagged = bb_amco(reference, 3, 5, 16 // accumulate, accumulate)
    assert flagged > 0  # some batches masked a flagged modality
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    plain = TinyAV(aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, accumulate_grad_batches=accumulate)).fit(
        plain, loader(batch_size=16 // accumulate))
    assert (flat_params(plain) - flat_params(model)).abs().max() > 1e-4


@pytest.mark.timeout(300)
def test_ddp_masks_what_one_process_masks(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[AMCo(seed=3), SaveParams(str(ddp_dir))], devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False, max_epochs=3)).fit(
        TinyAV(aux_losses=True), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]) and rank0["states"]["AMCo"] == rank1["states"]["AMCo"]
    single, cb = TinyAV(aux_losses=True), AMCo(seed=3)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(single, loader())
    assert rank0["states"]["AMCo"]["dependent"] == cb.state_dict()["dependent"]
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_resume_inside_an_epoch(tmp_path):
    straight, (straight_cb,), resumed, (resumed_cb,) = resume_inside_an_epoch(
        tmp_path, lambda: [AMCo(seed=2)], lambda seed=0: TinyAV(aux_losses=True, seed=seed), resumable_loader,
        step=6)  # inside epoch 1, after the curriculum has started and a modality may be flagged
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict())
    assert straight_cb.state_dict()["progress"] == pytest.approx(0.8)  # epoch 2: four batches of + 2/10


def test_refuses_a_fusion_that_is_not_a_split_concat_head(tmp_path):
    with pytest.raises(ModalityContractError, match="sum of per-modality logits"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AMCo()])).fit(TinyAV(fusion="gated"), loader())


def test_warns_without_the_unimodal_losses_and_logs(tmp_path):
    logged = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    with pytest.warns(UserWarning, match="add_unimodal_losses"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AMCo(seed=0), Watch()], max_epochs=2,
                                    log_every_n_steps=1)).fit(TinyAV(), loader())
    # the last logged step (epoch 1, batch 3): the curriculum at l_t = 3 · 0.1, ratio sin(π/2 · 0.3/0.3) = 1
    assert logged["balance/amco/ratio"] == pytest.approx(1.0)
    assert {"balance/amco/mass/audio", "balance/amco/dependent/visual"} <= set(logged)


def test_bad_arguments():
    for bad in (dict(sigma=0.0), dict(sigma=1.5), dict(eps=0), dict(seed=-1), dict(seed=True)):
        with pytest.raises(ValueError):
            AMCo(**bad)


@pytest.mark.parametrize("forward_method", ["amco", "opm"])
def test_stacks_with_a_gradient_method_in_either_order(tmp_path, forward_method):
    from lightning_balance import OGMGE, OPM

    def make():
        return AMCo(seed=4) if forward_method == "amco" else OPM(seed=4, start_epoch=0)

    results = []
    for order in ("forward first", "gradient first"):
        pair = [make(), OGMGE(alpha=0.3, seed=1)]
        model = TinyAV(aux_losses=True)
        pl.Trainer(**trainer_kwargs(tmp_path / order, callbacks=pair if order == "forward first" else pair[::-1],
                                    max_epochs=3)).fit(model, loader())
        results.append(flat_params(model))
        assert pair[1].num_edits > 0
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    alone = TinyAV(aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path / "alone", callbacks=[make()], max_epochs=3)).fit(alone, loader())
    assert (flat_params(alone) - results[0]).abs().max() > 1e-5  # OGM-GE acted on top of the forward method
