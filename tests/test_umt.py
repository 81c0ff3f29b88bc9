"""UMT and UME: distillation value by hand, frozen eval-mode teachers, the teacher-training helper,
the ensemble, the choice rule, bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import ModalityContractError, UMTLoss, UnimodalEnsemble
from lightning_balance.losses import choose_ume_or_umt, fit_unimodal_teachers
from tests.helpers import DictDataset, TinyAV, flat_params, loader, trainer_kwargs


def test_distillation_by_hand_and_frozen_teachers():
    teacher = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(2))
    term = UMTLoss({"audio": teacher}, weight=10.0)
    z = torch.tensor([[1.0, 3.0]], requires_grad=True)
    x = torch.tensor([[1.0, 1.0]])
    total, per = term({"audio": z}, {"audio": x})
    assert total.item() == pytest.approx((0.0 + 4.0) / 2)
    total.backward()
    assert z.grad is not None and teacher.weight.grad is None and not teacher.weight.requires_grad
    term.train()
    assert not term.teachers.training  # teachers stay in eval mode
    with pytest.raises(ModalityContractError, match="same width"):
        UMTLoss({"audio": nn.Linear(2, 3)})({"audio": z}, {"audio": x})
    with pytest.raises(ValueError, match="at least one teacher"):
        UMTLoss({})


def test_checkpoint_loading(tmp_path):
    source = nn.Linear(3, 2)
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "t.ckpt")
    term = UMTLoss({"audio": nn.Linear(3, 2)}, checkpoints={"audio": str(tmp_path / "t.ckpt")}, state_prefix="encoder.")
    torch.testing.assert_close(term.teachers["audio"].weight, source.weight)


class Terms(TinyAV):
    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"],
                           inputs={"audio": batch["audio"], "visual": batch["visual"]})
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(DictDataset(n=64), batch_size=16)


def test_helper_trains_teachers_and_umt_trains_with_them(tmp_path):
    student = Terms()
    teachers, models = fit_unimodal_teachers(student, Data(), num_classes=4, max_epochs=2,
                                             default_root_dir=str(tmp_path), accelerator="cpu")
    assert set(teachers) == {"audio", "visual"}
    assert not torch.equal(flat_params(teachers["audio"]), flat_params(student.audio_encoder))  # fresh copies
    before = flat_params(teachers["audio"])
    student.configure_loss_terms([UMTLoss(teachers)])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, log_every_n_steps=1))
    trainer.fit(student, loader())
    assert "balance/umt/mse/audio" in trainer.callback_metrics
    assert torch.equal(flat_params(student.balance_losses["umt"].teachers["audio"]), before)  # frozen
    ensemble = UnimodalEnsemble(models)
    batch = next(iter(loader()))
    assert ensemble({"audio": batch["audio"], "visual": batch["visual"]}).shape == (16, 4)


def test_ensemble_by_hand_and_choice_rule():
    a, v = nn.Linear(1, 2), nn.Linear(1, 2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0], [0.0]]))
        a.bias.zero_()
        v.weight.zero_()
        v.bias.zero_()
    x = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[5.0]])}
    pa = torch.softmax(torch.tensor([2.0, 0.0]), -1)
    pv = torch.tensor([0.5, 0.5])
    mean = UnimodalEnsemble({"a": a, "v": v})(x).exp()[0]
    torch.testing.assert_close(mean, (pa + pv) / 2)
    prod = UnimodalEnsemble({"a": a, "v": v}, combine="product")(x).exp()[0]
    torch.testing.assert_close(prod, pa * pv / (pa * pv).sum())
    assert choose_ume_or_umt(0.94, 0.92) == "UME" and choose_ume_or_umt(0.90, 0.92) == "UMT"
    assert math.isclose(float(mean.sum()), 1.0, rel_tol=1e-6)


def test_needs_inputs():
    model = TinyAV()
    model.configure_loss_terms([UMTLoss({"audio": nn.Linear(6, 8)})])
    batch = {"audio": torch.randn(4, 6), "visual": torch.randn(4, 5), "target": torch.randint(0, 4, (4,))}
    logits = model.fuse(model.forward_features(batch), batch["target"])
    with pytest.raises(ModalityContractError, match="inputs="):
        model.add_loss_terms(F.cross_entropy(logits, batch["target"]))
