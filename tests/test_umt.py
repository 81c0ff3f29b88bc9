"""UMT and UME: distillation value by hand, frozen eval-mode teachers, the teacher-training helper,
the ensemble, the choice rule, bad input; parameters after several steps against the restated recipes
(UMT's distillation, UME's unimodal training and averaged probabilities); token encoders; ignore_index."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import CosineHead, ModalityContractError, MultimodalMixin, UMTLoss, UnimodalEnsemble
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
    assert math.isclose(float(mean.sum().detach()), 1.0, rel_tol=1e-6)


def test_needs_inputs():
    model = TinyAV()
    model.configure_loss_terms([UMTLoss({"audio": nn.Linear(6, 8)})])
    batch = {"audio": torch.randn(4, 6), "visual": torch.randn(4, 5), "target": torch.randint(0, 4, (4,))}
    logits = model.fuse(model.forward_features(batch), batch["target"])
    with pytest.raises(ModalityContractError, match="inputs="):
        model.add_loss_terms(F.cross_entropy(logits, batch["target"]))


# ---------------------------------------------------------------- fidelity: trained against the restated recipes
def _teacher(d, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 8))


def test_umt_parameters_match_the_restated_objective(tmp_path):
    teachers = {"audio": _teacher(6, 1), "visual": _teacher(5, 2)}
    model = Terms()
    model.configure_loss_terms([UMTLoss(teachers, weight=10.0)])
    reference = copy.deepcopy(model)
    frozen = copy.deepcopy(teachers)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model, loader())

    # UMT: CE(fused) + lambda * sum_m mean over batch and dims of (z_m - teacher_m(x_m))^2, teachers frozen
    opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for batch in [b for _ in range(2) for b in loader()]:
        z = {"audio": reference.audio_encoder(batch["audio"]), "visual": reference.visual_encoder(batch["visual"])}
        ce = F.cross_entropy(reference.head(torch.cat([z["audio"], z["visual"]], 1)), batch["target"])
        with torch.no_grad():
            targets = {m: frozen[m](batch[m]) for m in z}
        distil = sum(((z[m] - targets[m]) ** 2).mean() for m in z)
        opt.zero_grad()
        (ce + 10.0 * distil).backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    assert torch.equal(flat_params(model.balance_losses["umt"].teachers), flat_params(nn.ModuleList(frozen.values())))


class InitialWeights(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_start(self, trainer, pl_module):
        self.states.append(copy.deepcopy(pl_module.state_dict()))


def test_ume_matches_the_restated_recipe(tmp_path):
    # UME: train each modality alone (encoder + linear head, cross-entropy, SGD), then average the unimodal
    # models' probabilities
    student = Terms()
    recorder = InitialWeights()
    _, models = fit_unimodal_teachers(student, Data(), num_classes=4, max_epochs=2, default_root_dir=str(tmp_path),
                                      accelerator="cpu", callbacks=[recorder])
    references = {}
    for m, state in zip(("audio", "visual"), recorder.states):
        d = {"audio": 6, "visual": 5}[m]
        encoder = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 8))
        head = nn.Linear(8, 4)
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
        params = [*encoder.parameters(), *head.parameters()]
        opt = torch.optim.SGD(params, lr=0.02, momentum=0.9)
        for batch in [b for _ in range(2) for b in Data().train_dataloader()]:
            loss = F.cross_entropy(head(encoder(batch[m])), batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(flat_params(models[m]), torch.cat([p.detach().reshape(-1) for p in params]),
                                   rtol=1e-5, atol=1e-6)
        references[m] = (encoder, head)
    batch = next(iter(loader()))
    with torch.no_grad():
        probs = [torch.softmax(head(encoder(batch[m])), -1) for m, (encoder, head) in references.items()]
        want = torch.log((probs[0] + probs[1]) / 2)
        got = UnimodalEnsemble(models)({"audio": batch["audio"], "visual": batch["visual"]})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TokenData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TokenDataset(), batch_size=8)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 3, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        self.y[::4] = -1  # unlabelled, with the model's own ignore_index (cross-entropy would refuse -1)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"audio": self.x[i], "visual": self.x[i, :, :5], "target": self.y[i]}


class TokenStudent(MultimodalMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.audio_encoder, self.visual_encoder = nn.Linear(6, 8), nn.Linear(5, 8)
        self.head = CosineHead([8, 8], 4)
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.head,
                                  ignore_index=-1)


def test_teachers_from_token_encoders_and_ignore_index(tmp_path):
    teachers, models = fit_unimodal_teachers(TokenStudent(), TokenData(), num_classes=4, max_epochs=1,
                                             default_root_dir=str(tmp_path), accelerator="cpu")
    assert models["audio"].head.in_features == 8  # the token width D, tokens averaged
    assert models["audio"](torch.randn(2, 3, 6)).shape == (2, 4)
    assert teachers["visual"](torch.randn(2, 3, 5)).shape == (2, 3, 8)  # UMT distils the tokens themselves
