"""Sample-level and modality-level modality valuation: the functional core against hand values and the Shapley
definition written out, the callback against the official loop restated (sample_level.py), DDP, resume inside an
epoch, absence, the modality-level rule, bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from torch import nn

from lightning_balance import MultimodalMixin
from lightning_balance._errors import ModalityContractError
from lightning_balance.callbacks import SampleValuation
from lightning_balance.data import AVDigitsDataModule, ResumableDataLoader, ValuationDataset
from lightning_balance.functional.valuation import modality_level_copies, sample_level_copies, sample_shapley_values
from tests.helpers import DictDataset, InterleavedSampler, SaveParams, TinyAV, flat_params, trainer_kwargs

# ---------------------------------------------------------------------------------------------- functional core


def test_two_modality_values_are_the_official_ones():
    # rows: subsets ∅, {a}, {v}, {a, v}; columns: four samples
    correct = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    phi = sample_shapley_values(correct)
    official = []
    for i in range(4):  # code/sample_level.py: value_all = 2, value_a = value_v = 1 when correct
        va, vv, vall = float(correct[1, i]), float(correct[2, i]), 2.0 * float(correct[3, i])
        official.append([(va + vall - vv) / 2.0, (vv + vall - va) / 2.0])
    torch.testing.assert_close(phi, torch.tensor(official, dtype=torch.float64))
    assert sample_level_copies(torch.tensor([[-0.5, 0.0], [0.5, 1.0], [1.5, 0.4], [-0.1, -0.10001]],
                                            dtype=torch.float64)).tolist() == [[3, 2], [1, 0], [0, 0], [0, 3]]


def test_three_modalities_against_permutations_written_out():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(8, 20, generator=g) > 0.4
    present = torch.rand(20, 3, generator=g) > 0.3
    # as fuse_subset gives it: a subset's prediction is that of the modalities the sample has in it
    bits = (present.long() << torch.arange(3)).sum(1)
    correct = torch.stack([base[s & bits, torch.arange(20)] for s in range(8)])
    phi = sample_shapley_values(correct, present)
    for i in range(20):
        def v(subset):  # |S ∩ P| · correct(S ∩ P): the fusion never sees an absent modality
            kept = [b for b in subset if present[i, b]]
            return len(kept) * float(correct[sum(1 << b for b in kept), i])
        for m in range(3):
            marginal = []
            for order in itertools.permutations(range(3)):
                before = order[: order.index(m)]
                marginal.append(v(list(before) + [m]) - v(list(before)))
            assert phi[i, m].item() == pytest.approx(sum(marginal) / 6)
            if not present[i, m]:
                assert phi[i, m].item() == 0.0
    full = sample_shapley_values(torch.ones(8, 1, dtype=torch.bool))
    assert full.tolist() == [[1.0, 1.0, 1.0]]  # exactly the fair share: no copy (φ ≥ 1)


def test_modality_level_rule_by_hand():
    def official(phi_a, phi_v, alpha, func):  # AV_KS_Dataset_modality_level, written out
        gap_a, gap_v = 1.0 - phi_a, 1.0 - phi_v
        if func == "linear":
            d = (abs(gap_a - gap_v) / 3 * 2) * alpha
        elif func == "tanh":
            d = math.tanh((abs(gap_a - gap_v) / 3 * 2) * alpha)
        else:
            d = (abs(gap_a - gap_v) / 3 * 2) ** 1.5 * alpha
        return int(d * 100), 0 if gap_a > gap_v else 1

    for phi, alpha, func in (((0.9, 0.3), 1.0, "linear"), ((0.2, 0.8), 0.5, "tanh"), ((0.2, 0.8), 1.0, "square"),
                             ((0.5, 0.5), 1.0, "linear")):
        got = modality_level_copies(torch.tensor(phi, dtype=torch.float64), alpha, 100, func)
        assert got == official(*phi, alpha, func)
    assert modality_level_copies(torch.tensor([0.9, 0.3], dtype=torch.float64), 1.0, 100)[1] == 1  # visual: larger gap
    with pytest.raises(ValueError, match="two modalities"):
        modality_level_copies(torch.ones(3), 1.0, 10)


def test_dataset_copies_keep_one_modality():
    base = DictDataset(8, seed=0, missing=(0.3, 0.0))
    ds = ValuationDataset(base, ("audio", "visual"))
    ds.set_extras(torch.tensor([0, 0, 5]), torch.tensor([1, 0, 0]))
    assert len(ds) == 11
    item = ds[8]
    assert torch.equal(item["audio"], base[0]["audio"]) and item["target"] == base[0]["target"]
    assert bool(item["present"]["visual"]) and not bool(item["present"]["audio"])
    assert bool(ds[9]["present"]["audio"]) == bool(base.present[0, 0])  # an absent modality stays absent
    assert not bool(ds[9]["present"]["visual"])
    with pytest.raises(ValueError, match="base_index"):
        ds.set_extras(torch.tensor([8]), torch.tensor([0]))
    with pytest.raises(ValueError, match="keep"):
        ds.set_extras(torch.tensor([1]), torch.tensor([2]))


# ---------------------------------------------------------------------------------------------- the callback


class Data(pl.LightningDataModule):
    """In-order batches over one ValuationDataset; a new loader every epoch (its length changes)."""

    def __init__(self, batch_size: int = 16, missing=None, resumable: bool = False) -> None:
        super().__init__()
        self.batch_size, self.resumable = batch_size, resumable
        self.train_set = ValuationDataset(DictDataset(64, seed=0, missing=missing), ("audio", "visual"))

    def train_dataloader(self):
        kind = ResumableDataLoader if self.resumable else DataLoader
        return kind(self.train_set, batch_size=self.batch_size, sampler=InterleavedSampler(len(self.train_set)))


def official_loop(model, epochs, warmup):
    """code/sample_level.py restated: plain epochs until `warmup`; at the end of every epoch from warmup − 1 on,
    value each training sample (fused, audio features zeroed, visual features zeroed; value_all = 2), rebuild the
    data set (originals, then per sample its audio-keeping copies and its visual-keeping copies) and train on it
    with the dropped modality's features zeroed."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    base = DictDataset(64, seed=0)
    items = [(i, 0) for i in range(64)]  # (sample, drop): 0 none, 1 drop audio, 2 drop visual
    history = []
    for epoch in range(epochs):
        model.train()
        for start in range(0, len(items), 16):
            chunk = items[start : start + 16]
            idx = torch.tensor([i for i, _ in chunk])
            drop = torch.tensor([d for _, d in chunk])
            a, v = model.audio_encoder(base.a[idx]), model.visual_encoder(base.v[idx])
            a = torch.where((drop == 1)[:, None], torch.zeros_like(a), a)
            v = torch.where((drop == 2)[:, None], torch.zeros_like(v), v)
            opt.zero_grad()
            F.cross_entropy(model.head(torch.cat([a, v], 1)), base.y[idx]).backward()
            opt.step()
        if epoch >= warmup - 1:
            model.eval()
            with torch.no_grad():
                a, v = model.audio_encoder(base.a), model.visual_encoder(base.v)
                pred = model.head(torch.cat([a, v], 1)).argmax(1)
                pred_v = model.head(torch.cat([torch.zeros_like(a), v], 1)).argmax(1)
                pred_a = model.head(torch.cat([a, torch.zeros_like(v)], 1)).argmax(1)
            contribution = {}
            for i in range(64):
                value_all = 2.0 if pred[i] == base.y[i] else 0.0
                value_a = 1.0 if pred_a[i] == base.y[i] else 0.0
                value_v = 1.0 if pred_v[i] == base.y[i] else 0.0
                contribution[i] = ((value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0)
            items = [(i, 0) for i in range(64)]
            for i in range(64):
                ca, cv = contribution[i]
                n_a = 1 if 0.4 < ca < 1 else 2 if -0.1 < ca < 0.4 else 3 if ca < -0.1 else 0
                items += [(i, 2)] * n_a
                n_v = 1 if 0.4 < cv < 1 else 2 if -0.1 < cv < 0.4 else 3 if cv < -0.1 else 0
                items += [(i, 1)] * n_v
            history.append((sum(c[0] for c in contribution.values()) / 64,
                            sum(c[1] for c in contribution.values()) / 64, len(items) - 64))
    return history


def test_matches_the_official_loop(tmp_path):
    cb = SampleValuation(start_epoch=2)
    model = TinyAV(lr=0.2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=5, reload_dataloaders_every_n_epochs=1))
    trainer.fit(model, datamodule=Data())
    reference = TinyAV(lr=0.2)
    history = official_loop(reference, epochs=5, warmup=2)
    assert [e["epoch"] for e in cb.history] == [1, 2, 3, 4]
    for entry, (ca, cv, extra) in zip(cb.history, history):
        assert entry["contribution/audio"] == pytest.approx(ca)
        assert entry["contribution/visual"] == pytest.approx(cv)
        assert entry["extra"] == extra
    assert all(0 < e["extra"] for e in cb.history[:3]), "the test never re-samples"
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_logs_and_the_epoch_after_a_valuation_is_longer(tmp_path):
    seen = []

    class Count(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.num_training_batches)

    cb = SampleValuation(start_epoch=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, Count()], max_epochs=2,
                                          reload_dataloaders_every_n_epochs=1))
    trainer.fit(TinyAV(lr=0.2), datamodule=Data())
    assert seen == [4, math.ceil((64 + cb.history[0]["extra"]) / 16)]
    assert trainer.callback_metrics["balance/valuation/extra"] == cb.history[-1]["extra"]
    assert cb.contributions.shape == (64, 2)
    assert cb.history[0]["extra/audio"] + cb.history[0]["extra/visual"] == cb.history[0]["extra"]


def test_ddp_values_as_one_process_and_ranks_agree(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SampleValuation(start_epoch=2), SaveParams(str(ddp_dir))],
                                max_epochs=2, devices=2, strategy="ddp_spawn", use_distributed_sampler=False,
                                reload_dataloaders_every_n_epochs=1)).fit(TinyAV(lr=0.2), datamodule=Data(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    s0, s1 = rank0["states"]["SampleValuation"], rank1["states"]["SampleValuation"]
    assert torch.equal(s0["base_index"], s1["base_index"]) and torch.equal(s0["keep"], s1["keep"])
    single_cb = SampleValuation(start_epoch=2)
    single = TinyAV(lr=0.2)
    pl.Trainer(**trainer_kwargs(tmp_path / "one", callbacks=[single_cb], max_epochs=2,
                                reload_dataloaders_every_n_epochs=1)).fit(single, datamodule=Data())
    assert s0["base_index"].numel() > 0
    assert torch.equal(s0["base_index"], single_cb.base_index) and torch.equal(s0["keep"], single_cb.keep)
    torch.testing.assert_close(s0["contributions"], single_cb.contributions)
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_resume_inside_a_resampled_epoch(tmp_path):
    """Epochs 0 and 1 have 4 steps; the valuation at the end of epoch 1 grows epoch 2; step 10 is inside it."""
    kw = dict(max_epochs=4, reload_dataloaders_every_n_epochs=1)
    straight_cb, straight = SampleValuation(start_epoch=2), TinyAV(lr=0.2)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[straight_cb], **kw)).fit(straight,
                                                                                   datamodule=Data(resumable=True))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[SampleValuation(start_epoch=2), ckpt],
                                enable_checkpointing=True, **kw)).fit(TinyAV(lr=0.2), datamodule=Data(resumable=True))
    resumed_cb, resumed = SampleValuation(start_epoch=2), TinyAV(lr=0.2, seed=123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path / "c", callbacks=[resumed_cb], **kw)).fit(
            resumed, datamodule=Data(resumable=True), ckpt_path=str(tmp_path / "ckpt" / "step=10.ckpt"))
    assert straight_cb.history[0]["extra"] > 0 and [e["epoch"] for e in resumed_cb.history] == [1, 2, 3]
    assert resumed_cb.history == straight_cb.history
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)


def test_absent_modalities_get_no_copies(tmp_path):
    cb = SampleValuation(start_epoch=1)
    data = Data(missing=(0.4, 0.3))
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, reload_dataloaders_every_n_epochs=1)).fit(
        TinyAV(lr=0.2), datamodule=data)
    present = data.train_set.dataset.present
    copied = cb.base_index
    assert copied.numel() > 0
    assert present[copied].all(), "a copy of a sample that lacks a modality"
    phi = cb.contributions
    assert (phi[~present] == 0).all()


def test_modality_level_on_av_digits(tmp_path):
    cb = SampleValuation(level="modality", start_epoch=1, alpha=1.0)
    data = AVDigitsDataModule(valuation=True, batch_size=128)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, reload_dataloaders_every_n_epochs=1,
                                limit_train_batches=2)).fit(TinyAV(dims=(40, 64), classes=10, lr=0.1), datamodule=data)
    entry = cb.history[0]
    assert cb.keep.unique().numel() <= 1 and entry["extra"] == cb.base_index.numel()
    assert isinstance(data.datasets["train"], ValuationDataset) and len(data.datasets["train"]) == (
        data.datasets["train"].num_base + entry["extra"])


def test_bad_input_names_the_fix(tmp_path):
    for kwargs, match in (({"level": "batch"}, "level"), ({"start_epoch": 0}, "start_epoch"),
                          ({"part_ratio": 0.0}, "part_ratio"), ({"func": "cubic"}, "func")):
        with pytest.raises(ValueError, match=match):
            SampleValuation(**kwargs)
    with pytest.raises(ModalityContractError, match="reload_dataloaders_every_n_epochs=1"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SampleValuation()], max_epochs=1)).fit(TinyAV(), datamodule=Data())
    with pytest.raises(ModalityContractError, match="ValuationDataset"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SampleValuation()], max_epochs=1,
                                    reload_dataloaders_every_n_epochs=1)).fit(TinyAV(), DataLoader(DictDataset(16), 8))

    class NoPresence(TinyAV):
        def training_step(self, batch, batch_idx):
            logits = self.fuse(self.forward_features(batch), batch["target"])
            return F.cross_entropy(logits, batch["target"])

    with pytest.raises(ModalityContractError, match="present=batch"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SampleValuation(start_epoch=1)], max_epochs=2,
                                    reload_dataloaders_every_n_epochs=1)).fit(NoPresence(lr=0.2), datamodule=Data())


def test_modality_level_callback_against_the_official_rule(tmp_path):
    """modality_level.py and AV_KS_Dataset_modality_level restated on the callback's values (checked by the
    sample-level test) and its seeded draws: the mean over the drawn part, gaps 1 − φ̄, |γ_a − γ_v| / 3 · 2 · α,
    int(· N) copies of randomly drawn samples, keeping audio (drop visual) if γ_a > γ_v, else visual."""
    from lightning_balance._distributed import shared_generator

    cb = SampleValuation(level="modality", start_epoch=1, alpha=2.0, seed=3)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, reload_dataloaders_every_n_epochs=1)).fit(
        TinyAV(lr=0.2), datamodule=Data())
    phi = cb.contributions.double()
    g = shared_generator(3, 0, torch.device("cpu"))  # epoch 0's stream: the part, then the copies
    part = torch.randint(64, (int(64 * 0.2),), generator=g)
    part_a = sum(float(phi[i, 0]) for i in part) / len(part)
    part_v = sum(float(phi[i, 1]) for i in part) / len(part)
    gap_a, gap_v = 1.0 - part_a, 1.0 - part_v
    count = int(abs(gap_a - gap_v) / 3 * 2 * 2.0 * 64)
    assert count > 0, "the test draws no copy"
    assert torch.equal(cb.base_index, torch.randint(64, (count,), generator=g))
    assert cb.keep.tolist() == [0 if gap_a > gap_v else 1] * count


def test_modality_level_copies_only_samples_with_both(tmp_path):
    cb = SampleValuation(level="modality", start_epoch=1, alpha=4.0)
    data = Data(missing=(0.4, 0.4))
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2, reload_dataloaders_every_n_epochs=1)).fit(
        TinyAV(lr=0.2), datamodule=data)
    present = data.train_set.dataset.present
    assert cb.base_index.numel() > 0 and present[cb.base_index].all()


def test_eval_modes_restored_and_a_reused_callback_starts_afresh(tmp_path):
    class Frozen(TinyAV):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.audio_encoder = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Tanh())
            self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, head=self.head)
            self.visual_encoder.eval()  # the user keeps this encoder in eval mode

    modes = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            modes.append((pl_module.visual_encoder.training, pl_module.audio_encoder[1].training))

    cb = SampleValuation(start_epoch=1)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[cb, Watch()], max_epochs=2,
                                reload_dataloaders_every_n_epochs=1)).fit(Frozen(lr=0.2), datamodule=Data())
    assert modes[1] == (False, True)
    first = [e["epoch"] for e in cb.history]
    seen = []

    class Count(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.num_training_batches)

    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[cb, Count()], max_epochs=2,
                                reload_dataloaders_every_n_epochs=1)).fit(TinyAV(lr=0.2), datamodule=Data())
    assert first == [0, 1] and [e["epoch"] for e in cb.history] == [0, 1]  # valued again in the second fit
    assert seen[0] == 4  # the second fit's first epoch reads the plain data, not the first fit's copies


def test_needs_encode_batch(tmp_path):
    class NoEncode(TinyAV):
        encode_batch = MultimodalMixin.encode_batch

    with pytest.raises(ModalityContractError, match="encode_batch"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SampleValuation()], max_epochs=1,
                                    reload_dataloaders_every_n_epochs=1)).fit(NoEncode(), datamodule=Data())
