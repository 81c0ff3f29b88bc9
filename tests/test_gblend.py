"""Gradient-Blending: the weight formula by hand; on a constructed case where one head overfits, that
head's weight collapses; the weights reach the module's loss; identical DDP ranks; resume parity; bad input."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_balance import GradientBlending, ModalityContractError
from lightning_balance.functional import gblend_weights
from tests.helpers import TinyAV, trainer_kwargs


def test_weights_by_hand():
    # two heads: k=0 generalises (held-out loss 2.0 -> 1.0, gap 0.1 -> 0.3), k=1 overfits (held-out loss rises)
    w, g, o = gblend_weights(torch.tensor([1.9, 1.0]), torch.tensor([2.0, 1.2]),
                             torch.tensor([0.7, 0.2]), torch.tensor([1.0, 1.5]))
    assert g.tolist() == pytest.approx([1.0, -0.3])
    assert o.tolist() == pytest.approx([0.2, 1.1])
    raw = [1.0 / 0.2**2, 1e-8]
    assert w.tolist() == pytest.approx([raw[0] / sum(raw), raw[1] / sum(raw)])
    # three heads, all generalising: w ∝ dG / dO^2 (dO = 0.1, 0.1 and 0.0, the last floored at 1e-8)
    w, _, _ = gblend_weights(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.5, 1.5, 1.5]),
                             torch.tensor([0.5, 0.8, 0.9]), torch.tensor([1.1, 1.2, 1.4]))
    raw = torch.tensor([0.4 / 0.1**2, 0.3 / 0.1**2, 0.1 / 1e-8])
    torch.testing.assert_close(w, raw / raw.sum())
    with pytest.raises(ValueError, match="shape"):
        gblend_weights(torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2))


class NoisyVisual(Dataset):
    """Audio carries the class; visual is pure noise with many features (its head can only memorise)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(4, 6, generator=torch.Generator().manual_seed(1234)) * 2.0
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.a = means[self.y] + torch.randn(n, 6, generator=g)
        self.v = torch.randn(n, 24, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"audio": self.a[i], "visual": self.v[i], "target": self.y[i]}


class HoldoutData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(NoisyVisual(32, 0), batch_size=16)

    def holdout_dataloader(self):
        return DataLoader(NoisyVisual(128, 1), batch_size=64)


def test_an_overfitting_head_gets_no_weight(tmp_path):
    cb = GradientBlending(every_n_epochs=2, estimate_epochs=30)
    model = TinyAV(aux_losses=True, dims=(6, 24), lr=0.1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3))
    trainer.fit(model, datamodule=HoldoutData())
    assert [h["epoch"] for h in cb.history] == [0, 2]
    first = cb.history[0]
    assert first["delta_g/visual"] <= 0 < first["delta_g/audio"]  # the noise head's held-out loss got worse
    assert cb.weights["visual"] < 1e-6 < cb.weights["audio"]
    assert sum(cb.weights.values()) == pytest.approx(1.0)
    assert model.loss_weights == cb.weights  # the training loss uses them
    fresh = GradientBlending()
    fresh.load_state_dict(cb.state_dict())
    assert fresh.weights == cb.weights and fresh.history == cb.history


def test_estimate_does_not_touch_the_model(tmp_path):
    """The branches train copies: with the first estimate at epoch 1, epoch 0 equals a run without it."""
    from tests.helpers import flat_params

    runs = []
    for callbacks in ([], [GradientBlending(every_n_epochs=5, start_epoch=1, estimate_epochs=2)]):
        model = TinyAV(aux_losses=True, dims=(6, 24))
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(model, datamodule=HoldoutData())
        runs.append(model)
    assert not torch.equal(flat_params(runs[0]), flat_params(runs[1]))  # epoch 1 used the new weights
    one = []
    for callbacks in ([], [GradientBlending(every_n_epochs=5, start_epoch=1, estimate_epochs=2)]):
        model = TinyAV(aux_losses=True, dims=(6, 24))
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=1)).fit(model, datamodule=HoldoutData())
        one.append(flat_params(model))
    assert torch.equal(one[0], one[1])


def test_needs_holdout_data_and_the_unimodal_losses(tmp_path):
    class NoHoldout(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(NoisyVisual(32, 0), batch_size=16)

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradientBlending()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="holdout"):
        trainer.fit(TinyAV(aux_losses=True, dims=(6, 24)), datamodule=NoHoldout())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradientBlending(start_epoch=5)], max_epochs=1))
    with pytest.raises(ModalityContractError, match="add_unimodal_losses"):
        trainer.fit(TinyAV(dims=(6, 24)), datamodule=HoldoutData())


@pytest.mark.parametrize("kwargs, match", [({"every_n_epochs": 0}, "every_n_epochs"), ({"estimate_epochs": 0}, "estimate_epochs"),
                                           ({"max_batches": -1}, "max_batches"), ({"start_epoch": -1}, "start_epoch")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientBlending(**kwargs)


def test_datamodule_holdout_split():
    from lightning_balance.data import AVDigitsDataModule

    plain, held = AVDigitsDataModule(), AVDigitsDataModule(holdout_fraction=0.1)
    plain.setup()
    held.setup()
    n = len(plain.splits["train"]["target"])
    assert len(held.splits["holdout"]["target"]) + len(held.splits["train"]["target"]) == n
    assert len(held.splits["holdout"]["target"]) == round(0.1 * n)
    assert torch.equal(plain.splits["val"]["target"], held.splits["val"]["target"])  # val and test untouched
    with pytest.raises(RuntimeError, match="holdout_fraction"):
        plain.holdout_dataloader()
    with pytest.raises(ValueError, match="holdout_fraction"):
        AVDigitsDataModule(holdout_fraction=1.0)


@pytest.mark.timeout(300)
def test_ddp_ranks_train_with_the_same_weights(tmp_path):
    from tests.helpers import SaveParams

    cb = GradientBlending(every_n_epochs=1, estimate_epochs=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, SaveParams(str(tmp_path))], max_epochs=2,
                                          devices=2, strategy="ddp_spawn"))
    trainer.fit(TinyAV(aux_losses=True, dims=(6, 24)), datamodule=HoldoutData())
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["states"]["GradientBlending"] == rank1["states"]["GradientBlending"]
    assert len(rank0["states"]["GradientBlending"]["history"]) == 2


def test_resume_parity(tmp_path):
    """Weights estimated at epoch 0 must still apply after resuming at epoch 2, and the epoch-3 estimate
    must match an uninterrupted run (parameters and callback state)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import flat_params

    def model():
        torch.manual_seed(0)
        return TinyAV(aux_losses=True, dims=(6, 24))

    straight_cb = GradientBlending(every_n_epochs=3, estimate_epochs=2)
    straight = model()
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[straight_cb], max_epochs=4)).fit(straight, datamodule=HoldoutData())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    first = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[GradientBlending(every_n_epochs=3, estimate_epochs=2), ckpt],
                                        max_epochs=2, enable_checkpointing=True))
    first.fit(model(), datamodule=HoldoutData())
    resumed_cb = GradientBlending(every_n_epochs=3, estimate_epochs=2)
    torch.manual_seed(123)
    resumed = TinyAV(aux_losses=True, dims=(6, 24))
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed_cb], max_epochs=4)).fit(
        resumed, datamodule=HoldoutData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(straight_cb.history) == 2 and [h["epoch"] for h in resumed_cb.history] == [0, 3]
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    for got, want in zip(resumed_cb.history, straight_cb.history, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert resumed_cb.weights == pytest.approx(straight_cb.weights, rel=1e-6)
