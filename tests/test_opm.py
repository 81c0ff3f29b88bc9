"""OPM's shell: parameters after several steps against the official recipe restated here (split-head scores with
detached weights and b/2, calcu_q, one execute draw per forward pass, Bernoulli keep masks, the 1/(1-theta) factor),
with and without accumulation; DDP against one process and ranks identical; resume inside an epoch; absent
modalities never come back and no sample loses all; M = 3 and a gated fusion; the warm-up warning; bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import OPM
from tests.helpers import (MultiMLP, SaveParams, TinyAV, flat_params, loader, resumable_loader,
                           resume_inside_an_epoch, states_equal, trainer_kwargs)


def _generator(seed, counter):
    """The documented stream: a generator seeded by a splitmix of (seed, call count)."""
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


def _official(model, batches, seed, q_base, lam, p_exe, accumulate=1):
    """The official training loop (BML_TPAMI2024 main.py / Classifier.py), restated for TinyAV's concat head:
    scores from the head's weight halves, detached, with b/2; q from calcu_q; drop with probability p_exe; keep
    with probability 1 - q; every feature divided by 1 - theta; CE on the fused logits; SGD(0.1, momentum 0.9)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    executed = 0
    for step, batch in enumerate(batches):
        za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
        y = batch["target"]
        w, b = model.head.weight.detach(), model.head.bias.detach()
        t1 = za.detach() @ w[:, :8].T + b / 2
        t2 = zv.detach() @ w[:, 8:].T + b / 2
        p1 = sum(float(torch.softmax(t1, 1)[i, y[i]]) for i in range(len(y)))
        p2 = sum(float(torch.softmax(t2, 1)[i, y[i]]) for i in range(len(y)))
        r1, r2 = math.tanh(max(p1 / p2 - 1, 0)), math.tanh(max(p2 / p1 - 1, 0))
        q = [min(1.0, q_base * (1 + lam * r1)) if r1 > 0 else 0.0, min(1.0, q_base * (1 + lam * r2)) if r2 > 0 else 0.0]
        g = _generator(seed, step)
        if float(torch.rand(1, generator=g)) < p_exe:
            executed += 1
            u = torch.rand(len(y), 2, generator=g)
            keep = (u >= torch.tensor(q)).float()
            theta = (8 * q[0] + 8 * q[1]) / 16
            za, zv = za * keep[:, :1] / (1 - theta), zv * keep[:, 1:] / (1 - theta)
        loss = F.cross_entropy(model.head(torch.cat([za, zv], 1)), y) / accumulate
        loss.backward()
        if (step + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return executed


def _batches(n=64, batch_size=16, epochs=2):
    data = list(loader(n=n, batch_size=batch_size))
    return data * epochs


@pytest.mark.parametrize("accumulate", [1, 2])
def test_parameters_follow_the_official_recipe_over_several_steps(tmp_path, accumulate):
    batch_size = 16 // accumulate  # the same samples per optimizer step
    cb = OPM(q_base=0.5, lam=0.5, p_exe=0.7, seed=11, start_epoch=0)
    model = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], accumulate_grad_batches=accumulate)).fit(
        model, loader(batch_size=batch_size))
    reference = TinyAV()
    executed = _official(reference, _batches(batch_size=batch_size), 11, 0.5, 0.5, 0.7, accumulate)
    assert cb.draws == 8 * accumulate and cb.executed == executed and 0 < executed < cb.draws
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    plain = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path, accumulate_grad_batches=accumulate)).fit(plain, loader(batch_size=batch_size))
    assert (flat_params(plain) - flat_params(model)).abs().max() > 1e-3  # the drops changed training


class Recorder(TinyAV):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.masks, self.given = [], []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        present = self.balance_record.present
        self.given.append(torch.stack([batch["present"]["audio"], batch["present"]["visual"]], 1).clone())
        self.masks.append(torch.stack([present["audio"], present["visual"]], 1).clone())
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        assert self.balance_record.present is None or torch.equal(
            self.balance_record.present["audio"], batch["present"]["audio"])  # never dropped


def test_absent_modalities_stay_absent_and_no_sample_loses_all(tmp_path):
    model = Recorder()
    cb = OPM(q_base=0.9, lam=0.5, p_exe=1.0, seed=4, start_epoch=0)
    data = loader(missing=(0.3, 0.3))
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(model, data, loader(missing=(0.3, 0.3)))
    dropped = 0
    for mask, given in zip(model.masks, model.given):
        assert not (mask & ~given).any()  # an absent modality never becomes present
        assert mask.any(1).all()  # every sample keeps a modality (the rescue)
        dropped += int((given & ~mask).sum())
    assert dropped > 0 and cb.executed == 4


@pytest.mark.timeout(300)
def test_ddp_drops_what_one_process_drops(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[OPM(seed=3, start_epoch=0), SaveParams(str(ddp_dir))],
                                devices=2, strategy="ddp_spawn", use_distributed_sampler=False)).fit(
        TinyAV(aux_losses=True), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]) and rank0["states"]["OPM"] == rank1["states"]["OPM"]
    single, cb = TinyAV(aux_losses=True), OPM(seed=3, start_epoch=0)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).fit(single, loader())
    assert rank0["states"]["OPM"]["executed"] == cb.executed > 0
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_resume_inside_an_epoch(tmp_path):
    straight, (straight_cb,), resumed, (resumed_cb,) = resume_inside_an_epoch(
        tmp_path, lambda: [OPM(seed=5, start_epoch=1)], lambda seed=0: TinyAV(aux_losses=True, seed=seed),
        resumable_loader, step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict()) and straight_cb.executed > 0


def test_three_modalities_drop_only_what_leads_the_mean_of_the_others(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=g)
    means = torch.randn(3, 4, generator=g) * 3
    data = [{"a": means[y] + torch.randn(48, 4, generator=g) * 0.3, "b": torch.randn(48, 4, generator=g),
             "c": torch.randn(48, 4, generator=g), "target": y}]
    batches = torch.utils.data.DataLoader([{k: v[i] for k, v in data[0].items()} for i in range(48)], batch_size=16)

    class Watch(MultiMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            p = self.balance_record.present
            self.kept = getattr(self, "kept", []) + [None if p is None else torch.stack([p[m] for m in "abc"], 1)]
            return loss

    model, cb = Watch({"a": 4, "b": 4, "c": 4}, classes=3), OPM(p_exe=1.0, seed=1, start_epoch=1)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(model, batches)
    later = [k for k in model.kept[3:]]
    assert all(k is not None for k in later)
    assert all(k[:, 1:].all() for k in later)  # b and c never lead: never dropped
    assert sum(int((~k[:, 0]).sum()) for k in later) > 0  # a leads and is dropped
    assert model.kept[:3] == [None] * 3  # the warm-up epoch


def test_a_gated_fusion_trains_and_logs(tmp_path):
    model, cb = TinyAV(fusion="gated", unimodal="mask"), OPM(seed=2, start_epoch=0, p_exe=1.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, log_every_n_steps=1))
    trainer.fit(model, loader())
    logged = trainer.callback_metrics
    assert {"balance/opm/q/audio", "balance/opm/executed", "balance/opm/kept/visual"} <= set(logged)
    assert float(logged["balance/opm/executed"]) == 1.0 and torch.isfinite(flat_params(model)).all()


def test_the_official_warm_up_warns_when_the_fit_is_shorter(tmp_path):
    with pytest.warns(UserWarning, match="OPM never ran"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OPM(seed=0)], max_epochs=1)).fit(TinyAV(), loader())


@pytest.mark.parametrize("kwargs, match", [
    (dict(q_base=1.5), "q_base must be a probability"), (dict(lam=-1), "lam must be a number >= 0"),
    (dict(p_exe=2), "p_exe must be a probability"), (dict(seed=-1), "seed must be None or an int"),
    (dict(modalities=["audio"]), "at least 2 modalities"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPM(**kwargs)


def test_fuse_without_targets_is_named(tmp_path):
    class NoTargets(TinyAV):
        def training_step(self, batch, batch_idx):
            return self.fuse(self.forward_features(batch)).sum()

    with pytest.raises(Exception, match=r"OPM scores each modality on the batch's labels"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OPM(start_epoch=0)], max_steps=1)).fit(NoTargets(), loader())
