"""Gradient-Blending: the weight formula and the floor by hand; on a constructed case where one head
overfits, that head's weight collapses, with a warning; the estimate leaves the model, the optimizer and
the random streams alone; resume parity; bad input. (The paper's recipe, optimizers:
test_gblend_recipe.py; DDP, accumulation, mid-epoch resume, random streams, ignore_index: test_gblend_runs.py.)"""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_balance import GradientBlending, ModalityContractError
from lightning_balance.functional import gblend_weights
from lightning_balance.functional.gblend import floor_weights
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


def test_floor_by_hand():
    # one head below the floor: it gets 0.1, the others share 0.9 in their ratio 0.7 : 0.29
    got = floor_weights(torch.tensor([0.7, 0.29, 0.01], dtype=torch.float64), 0.1)
    torch.testing.assert_close(got, torch.tensor([0.7 * 0.9 / 0.99, 0.29 * 0.9 / 0.99, 0.1], dtype=torch.float64))
    # flooring the third pushes the second below the floor (0.101 * 0.9 / 0.981 = 0.0927): both get 0.1
    got = floor_weights(torch.tensor([0.88, 0.101, 0.019], dtype=torch.float64), 0.1)
    torch.testing.assert_close(got, torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64))
    w = torch.tensor([0.5, 0.3, 0.2])
    assert floor_weights(w, 0.0) is w
    torch.testing.assert_close(floor_weights(w, 0.1), w)  # nothing below the floor: unchanged
    with pytest.raises(ValueError, match="min_weight"):
        floor_weights(w, 1 / 3)


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
    cb = GradientBlending(every_n_epochs=2, estimate_epochs=10)
    model = TinyAV(aux_losses=True, dims=(6, 24), lr=0.1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3))
    with pytest.warns(UserWarning, match="head 'visual' fell to"):
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


def test_a_collapsed_fused_head_warns_and_min_weight_keeps_a_floor(tmp_path, recwarn):
    """At lr 0.5 the fused branch overfits the noise modality within the estimate: its held-out loss gets
    worse (ΔG ≤ 0) and the paper's weights give it ~1e-8 of the loss. That is reported, with the numbers
    and the remedies; ``min_weight`` keeps the floor instead."""
    cb = GradientBlending(every_n_epochs=2, estimate_epochs=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1))
    with pytest.warns(UserWarning, match="head 'fused' fell to") as caught:
        trainer.fit(TinyAV(aux_losses=True, dims=(6, 24), lr=0.5), datamodule=HoldoutData())
    entry = cb.history[0]
    assert entry["delta_g/fused"] <= 0 and cb.weights["fused"] < 1e-6
    message = next(str(w.message) for w in caught if "'fused'" in str(w.message))
    for part in (f"{cb.weights['fused']:.3g}", f"ΔG = {entry['delta_g/fused']:.4g}", f"ΔO = {entry['delta_o/fused']:.4g}",
                 "estimate_epochs", "holdout_fraction", "min_weight="):
        assert part in message

    floored = GradientBlending(every_n_epochs=2, estimate_epochs=10, min_weight=0.05)
    recwarn.clear()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[floored], max_epochs=1)).fit(
        TinyAV(aux_losses=True, dims=(6, 24), lr=0.5), datamodule=HoldoutData())
    assert not [w for w in recwarn if "GradientBlending" in str(w.message)]
    assert floored.history[0]["delta_g/fused"] == pytest.approx(entry["delta_g/fused"])  # the same estimate
    assert floored.weights["fused"] == pytest.approx(0.05) and floored.weights["visual"] == pytest.approx(0.05)
    assert floored.weights["audio"] == pytest.approx(0.9)


class Snapshot(pl.Callback):
    """Copies of what an estimate must not change, taken in on_train_epoch_start: placed before and after
    GradientBlending in the callbacks list, it sees the state around the estimate."""

    def __init__(self):
        self.taken = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.taken[trainer.current_epoch] = {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "buffers": {k: v.clone() for k, v in pl_module.named_buffers()},
            "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "training": [m.training for m in pl_module.modules()],
            "requires_grad": [p.requires_grad for p in pl_module.parameters()],
            "trainer": pl_module._trainer,
            "rng": torch.get_rng_state(),
            "loss_weights": dict(pl_module.loss_weights),
        }


def test_estimate_does_not_touch_the_model(tmp_path):
    """The branches train copies: around the estimate at epoch 1 (after an epoch of training, so with
    momentum buffers), the module's parameters, gradients, modes, the optimizer's state and the random
    stream are unchanged; only the loss weights are new."""
    before, after = Snapshot(), Snapshot()
    cb = GradientBlending(every_n_epochs=5, start_epoch=1, estimate_epochs=2)
    model = TinyAV(aux_losses=True, dims=(6, 24))
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[before, cb, after], max_epochs=2)).fit(model, datamodule=HoldoutData())
    assert [h["epoch"] for h in cb.history] == [1]  # the estimate ran ...
    a, b = before.taken[1], after.taken[1]
    assert a["loss_weights"] == dict.fromkeys(("fused", "audio", "visual"), 1.0)
    assert b["loss_weights"] == {h: cb.history[0][f"weight/{h}"] for h in ("fused", "audio", "visual")}
    assert all(abs(w - 1.0) > 1e-3 for w in b["loss_weights"].values())  # ... and changed the weights
    assert a["optimizer"]["state"], "the optimizer has momentum buffers to protect"
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a["grads"], b["grads"], strict=True))
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["training"] == b["training"] and a["requires_grad"] == b["requires_grad"]
    assert b["trainer"] is a["trainer"] is not None
    assert torch.equal(a["rng"], b["rng"])


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
                                           ({"max_batches": -1}, "max_batches"), ({"start_epoch": -1}, "start_epoch"),
                                           ({"min_weight": -0.1}, "min_weight"), ({"min_weight": 0.34}, "min_weight"),
                                           ({"min_weight": True}, "min_weight")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientBlending(**kwargs)


def test_min_weight_must_leave_something_to_blend(tmp_path):
    from tests.helpers import MultiMLP

    model = MultiMLP({"a": 3, "b": 3, "c": 3})  # 4 heads: min_weight < 1/4
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[GradientBlending(min_weight=0.3)], max_epochs=1))
    with pytest.raises(ValueError, match="min_weight=0.3 leaves nothing to blend for 4 heads"):
        trainer.fit(model, datamodule=HoldoutData())


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
