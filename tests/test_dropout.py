"""Modality dropout: the drop rule and schedules by hand; in a fit, the masks against the documented stream
restated here; never every modality of a sample; DDP drops what one process drops; resume inside an epoch;
validation untouched; the adaptive schedule's probabilities against scores computed by hand; bad input."""

from __future__ import annotations

import math
import lightning.pytorch as pl
import pytest
import torch

from lightning_balance import ModalityDropout, ModalityMonitor
from lightning_balance.functional import adaptive_probabilities, drop_modalities, scheduled_factor
from tests.helpers import (SaveParams, TinyAV, flat_params, loader, resumable_loader, resume_inside_an_epoch,
                           states_equal, trainer_kwargs)


def _stream(seed, counter, n, m):
    """The documented stream: a generator seeded by a splitmix of (seed, draw count); U(0, 1) of shape (N, M)."""
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return torch.rand(n, m, generator=torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF))


def test_the_drop_rule_by_hand():
    u = torch.tensor([[0.9, 0.1], [0.05, 0.2], [0.1, 0.25], [0.5, 0.5]])
    present = torch.tensor([[True, True], [True, True], [True, True], [False, True]])
    p = torch.tensor([0.3, 0.3])
    kept = drop_modalities(u, present, p)
    # row 0: visual falls; row 1: both fall, visual (0.2 - 0.3) is closer than audio (0.05 - 0.3): kept;
    # row 2: both fall, visual closer again; row 3: audio absent, visual kept
    assert kept.tolist() == [[True, False], [False, True], [False, True], [False, True]]
    lone = drop_modalities(torch.tensor([[0.5, 0.01]]), torch.tensor([[False, True]]), p)
    assert lone.tolist() == [[False, True]]  # its only modality is never dropped


def test_schedules_by_hand():
    assert scheduled_factor("constant", 5, 10) == 1.0
    assert scheduled_factor("linear", 5, 10) == 0.5 and scheduled_factor("linear", 20, 10) == 1.0
    assert scheduled_factor("cosine", 5, 10) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.5)))
    assert scheduled_factor("cosine", 2, 10) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
    probs = adaptive_probabilities(torch.tensor([0.3, 0.3]), torch.tensor([0.7, 0.3]), 0.9)
    assert probs.tolist() == pytest.approx([0.3 * 2 * 0.7, 0.3 * 2 * 0.3])
    assert adaptive_probabilities(torch.tensor([0.6, 0.6]), torch.tensor([0.9, 0.1]), 0.9).tolist() == pytest.approx([0.9, 0.12])


class Recorder(TinyAV):
    """Keeps the presence mask each training fuse call saw."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.masks = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        present = self.balance_record.present
        self.masks.append(None if present is None else torch.stack([present["audio"], present["visual"]], 1).clone())
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        assert self.balance_record.present is None  # validation is never dropped


def test_the_masks_follow_the_documented_stream_and_the_schedule(tmp_path):
    model = Recorder()
    cb = ModalityDropout(p={"audio": 0.5, "visual": 0.2}, schedule="linear", warmup_steps=4, seed=7)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, ModalityMonitor()], max_epochs=2)).fit(
        model, loader(), loader(n=32, seed=1))
    assert cb.draws == 8 and len(model.masks) == 8
    for step, mask in enumerate(model.masks):
        factor = min(1.0, step / 4)
        p = torch.tensor([0.5 * factor, 0.2 * factor])
        u = _stream(7, step, 16, 2)
        want = u >= p
        both = ~want.any(1)  # restore the modality closest to its threshold
        want[both, (u - p)[both].argmax(1)] = True
        assert torch.equal(mask, want), step
    assert not model.masks[0].logical_not().any()  # p = 0 at step 0
    assert (~model.masks[-1][:, 0]).sum() > 0 and model.masks[-1].any(1).all()


def test_the_fusion_sees_the_fill_for_dropped_samples(tmp_path):
    captured = {}

    class Capture(TinyAV):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            captured.setdefault("record", self.balance_record)
            return loss

    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p=0.6, seed=1)], max_steps=1)).fit(Capture(), loader())
    record = captured["record"]
    dropped = ~record.present["audio"]
    assert dropped.sum() > 0
    assert record.features["audio"][dropped].abs().sum() == 0  # zeros stood in for them before the head
    assert record.features["audio"][~dropped].abs().sum() > 0


def test_never_every_modality_of_a_sample(tmp_path):
    model = Recorder()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p=0.95, seed=2)], max_epochs=1)).fit(
        model, loader(missing=(0.3, 0.3)))
    for mask in model.masks:
        assert mask.any(1).all()
        assert mask.sum() < mask.numel() / 2 + 16  # most dropped


@pytest.mark.timeout(300)
def test_ddp_drops_what_one_process_drops(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[ModalityDropout(p=0.4, seed=3), SaveParams(str(ddp_dir))],
                                devices=2, strategy="ddp_spawn", use_distributed_sampler=False)).fit(
        TinyAV(aux_losses=True), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = TinyAV(aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p=0.4, seed=3)])).fit(single, loader())
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    plain = TinyAV(aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(plain, loader())
    assert (flat_params(plain) - flat_params(single)).abs().max() > 1e-3  # dropout changed training


@pytest.mark.parametrize("schedule", ["constant", "adaptive"])
def test_resume_inside_an_epoch(tmp_path, schedule):
    straight, (straight_cb,), resumed, (resumed_cb,) = resume_inside_an_epoch(
        tmp_path, lambda: [ModalityDropout(p=0.4, schedule=schedule, seed=5)],
        lambda seed=0: TinyAV(aux_losses=True, seed=seed), resumable_loader, step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict())


def test_the_adaptive_schedule_drops_the_dominant_modality_more(tmp_path):
    class Logged(pl.Callback):
        def __init__(self):
            self.p = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.p.append([float(trainer.callback_metrics[f"balance/dropout/p/{m}"]) for m in ("audio", "visual")])

    start = TinyAV(aux_losses=True)
    batch = next(iter(loader()))
    with torch.no_grad():  # step 0: p = 0.3 for both (no shares yet); the masks of the documented stream
        u = _stream(4, 0, 16, 2)
        kept = u >= 0.3
        both = ~kept.any(1)
        kept[both, (u - 0.3)[both].argmax(1)] = True
        za = start.audio_encoder(batch["audio"]) * kept[:, :1]
        zv = start.visual_encoder(batch["visual"]) * kept[:, 1:]
        w, b = start.head.weight, start.head.bias
        y = batch["target"]
        sums = []
        for i, logits in enumerate((za @ w[:, :8].T + b / 2, zv @ w[:, 8:].T + b / 2)):
            rows = kept[:, i]
            sums.append(float(torch.softmax(logits[rows], 1).gather(1, y[rows][:, None]).sum()) * 16 / int(rows.sum()))
    shares = [s / sum(sums) for s in sums]
    logged = Logged()
    cb = ModalityDropout(p=0.3, schedule="adaptive", seed=4)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, logged], max_steps=2, log_every_n_steps=1)).fit(
        TinyAV(aux_losses=True), loader())
    assert logged.p[0] == pytest.approx([0.3, 0.3])
    assert logged.p[1] == pytest.approx([min(0.9, 0.3 * 2 * c) for c in shares], rel=1e-5)
    assert shares[0] > shares[1] and logged.p[1][0] > logged.p[1][1]  # audio leads on TinyAV's data


@pytest.mark.parametrize("kwargs, match", [
    ({"p": 1.0}, "p must be a probability in \\[0, 1\\)"),
    ({"p": {"audio": -0.1}}, "p must be a probability"),
    ({"schedule": "step"}, "schedule must be"),
    ({"schedule": "linear"}, "give warmup_steps >= 1"),
    ({"p_max": 1.0}, "p_max must be in \\(0, 1\\)"),
    ({"momentum": 1.0}, "momentum must be in \\[0, 1\\)"),
    ({"seed": -1}, "seed must be None or an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModalityDropout(**kwargs)


def test_an_empty_fuse_call_counts_its_draw(tmp_path):
    import warnings

    cb = ModalityDropout(p=0.3, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(TinyAV(), loader())
    assert cb.draws == 4
    assert not [w for w in caught if "never edited" in str(w.message)]  # it edits no gradient: nothing to warn
    cb._enabled, cb._p_now = True, torch.tensor([0.3, 0.3])
    assert cb.tap_presence(TinyAV(), None, 0, torch.device("cpu")) is None and cb.draws == 5  # the stream moves on


def test_a_probability_for_an_unknown_modality_is_named(tmp_path):
    with pytest.raises(ValueError, match="names modalities \\['depth'\\]"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p={"depth": 0.2})], max_epochs=1)).fit(
            TinyAV(), loader())


def test_one_modality_may_be_the_only_one_dropped(tmp_path):
    model = Recorder()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p=0.5, seed=2, modalities=["audio"])],
                                max_epochs=1)).fit(model, loader())
    masks = torch.cat(model.masks)
    assert masks[:, 1].all() and 0.3 < 1 - masks[:, 0].float().mean() < 0.7  # visual never, audio about half
    with pytest.raises(ValueError, match="needs at least two droppable modalities"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p=0.5, schedule="adaptive",
                                                                         modalities=["audio"])], max_epochs=1)).fit(
            TinyAV(), loader())
    with pytest.raises(ValueError, match=r"did you mean 'audoi' -> 'audio'"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityDropout(p={"audoi": 0.2})], max_epochs=1)).fit(
            TinyAV(), loader())
