"""ReconBoost: the functional core by hand, the staged training against the official loop restated (train.py and
dynamic_net.py: fresh SGD per phase, the dead GA term and the live one), DDP, resume inside an epoch, absence,
M = 3 with token features, bad input."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_balance import MultimodalMixin, ReconBoostFusion
from lightning_balance._errors import ModalityContractError
from lightning_balance.functional.reconboost import alignment_loss, boosting_loss, reconboost_schedule
from tests.helpers import SaveParams, flat_params, loader, resumable_loader, trainer_kwargs


def test_schedule_and_losses_by_hand():
    # E1 = 2, E2 = 1: epochs 0,1 train modality 0; epoch 2 corrects; epochs 3,4 train modality 1; ...
    assert [reconboost_schedule(e, 2, 1, 2) for e in range(7)] == [
        (0, 1, 0, True), (0, 1, 0, False), (0, 2, 0, True), (1, 1, 1, True), (1, 1, 1, False), (1, 2, 1, True),
        (2, 1, 0, True)]
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    others = torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([1])
    q = torch.softmax(others, -1)[0, 1]
    expected = -(5.0 - 1.0 * q) * torch.log_softmax(logits, -1)[0, 1] / 3
    torch.testing.assert_close(boosting_loss(logits, others, y, 5.0, 1.0)[0], expected)
    torch.testing.assert_close(boosting_loss(logits, None, y, 5.0, 1.0)[0], -(5.0 - 1.0) *
                               torch.log_softmax(logits, -1)[0, 1] / 3)
    p, r = torch.softmax(logits, -1), torch.softmax(others, -1)
    torch.testing.assert_close(alignment_loss(logits, others)[0], F.mse_loss(p, r))
    assert not alignment_loss(logits.requires_grad_(), others, gradient=False).requires_grad


class Head(nn.Module):
    def __init__(self, d: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class BoostNet(MultimodalMixin, pl.LightningModule):
    def __init__(self, seed: int = 0, alignment_gradient: bool = False, e1: int = 1, e2: int = 1,
                 pretrained: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio_encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.visual_encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.fusion = ReconBoostFusion(Head(), alignment_gradient=alignment_gradient, epochs_per_stage=e1,
                                       correct_epochs=e2, pretrained=pretrained)
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)
        self.automatic_optimization = False

    def features(self, batch):
        return {"audio": self.audio_encoder(batch["audio"]), "visual": self.visual_encoder(batch["visual"])}

    def training_step(self, batch, batch_idx):
        return self.fusion.training_step(self, self.features(batch), batch["target"], present=batch.get("present"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def official_loop(model, epochs, e1, e2, alignment_gradient, missing=None, pretrained=False):
    """train.py restated (no pretraining, two modalities, fixed alternation audio, visual, ...): phase 1 with a fresh
    SGD over the learner (its encoder and the shared head), the boosting loss against the other added learners
    (c0, a constant, when there are none: q = 1), plus α·MSE of the softmaxes against the previous learner from
    stage 1 on (both detached officially); the learner joins the ensemble; phase 2 with a fresh SGD over the added
    encoders, the head and η: CE(η Σ f_m)."""
    head, eta = model.fusion.head, model.fusion.boost_rate
    enc = {"audio": model.audio_encoder, "visual": model.visual_encoder}
    data = list(loader(64, 16, missing=missing))
    added: list[str] = ["audio", "visual"] if pretrained else []
    epoch = 0
    stage = 0
    while epoch < epochs:
        name = "audio" if stage % 2 == 0 else "visual"
        prev = "visual" if name == "audio" else "audio"
        opt = torch.optim.SGD([*enc[name].parameters(), *head.parameters()], lr=0.05, momentum=0.9,
                              weight_decay=5e-4)
        for _ in range(e1):
            if epoch >= epochs:
                return
            for batch in data:
                x = {"audio": batch["audio"], "visual": batch["visual"]}
                y = batch["target"]
                keep = torch.ones_like(y, dtype=torch.bool) if missing is None else batch["present"][name]
                pres = {m: (torch.ones_like(y, dtype=torch.bool) if missing is None else batch["present"][m])
                        for m in enc}
                with torch.no_grad():  # with absent modalities: an absent learner contributes nothing
                    others = [m for m in added if m != name]
                    out_join = eta * sum(head(enc[m](x[m])) * pres[m][:, None] for m in others) if others else None
                    any_other = sum(pres[m].long() for m in others) > 0 if others else None
                out_obj = head(enc[name](x[name]))
                target = F.one_hot(y, 4).float()
                soft = out_join.softmax(1) if out_join is not None else torch.ones(len(y), 1)
                if any_other is not None:  # q = 1 where no other learner is present (as with none added)
                    soft = torch.where(any_other[:, None], soft, torch.ones_like(soft))
                boosting = -5.0 * (target * out_obj.log_softmax(1)).mean(-1) + \
                    1.0 * (target * soft * out_obj.log_softmax(1)).mean(-1)
                loss = boosting[keep].mean()
                if stage > 0:
                    pre = head(enc[prev](x[prev])).detach().softmax(1)
                    cur = out_obj.softmax(1) if alignment_gradient else out_obj.detach().softmax(1)
                    # MSELoss over the batch; with absent modalities, zero where the previous one is absent
                    ga = ((cur - pre) ** 2).mean(1) * pres[prev]
                    loss = loss + 0.5 * ga[keep].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            epoch += 1
        if name not in added:
            added.append(name)
        params = [p for m in added for p in enc[m].parameters()] + list(head.parameters()) + [eta]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(e2):
            if epoch >= epochs:
                return
            for batch in data:
                pres = {m: (torch.ones_like(batch["target"], dtype=torch.bool) if missing is None
                            else batch["present"][m]) for m in enc}
                out = eta * sum(head(enc[m](batch[m])) * pres[m][:, None] for m in added)
                keep = sum(pres[m].long() for m in added) > 0  # samples with some added learner present
                loss = F.cross_entropy(out[keep], batch["target"][keep])
                opt.zero_grad()
                loss.backward()
                opt.step()
            epoch += 1
        stage += 1


@pytest.mark.parametrize("alignment_gradient", [False, True])
def test_matches_the_official_loop(tmp_path, alignment_gradient):
    model = BoostNet(alignment_gradient=alignment_gradient, e1=2, e2=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=8)).fit(model, loader())
    reference = BoostNet(alignment_gradient=alignment_gradient, e1=2, e2=1)
    official_loop(reference, epochs=8, e1=2, e2=1, alignment_gradient=alignment_gradient)
    assert model.fusion.boost_rate.item() != 1.0  # η was trained
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_the_live_alignment_term_changes_training(tmp_path):
    runs = []
    for live in (False, True):
        model = BoostNet(alignment_gradient=live)
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4)).fit(model, loader())
        runs.append(flat_params(model))
    assert not torch.allclose(runs[0], runs[1])


def test_the_ensemble_grows_and_predicts_with_the_added_learners(tmp_path):
    model = BoostNet(e1=1, e2=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader())
    assert model.fusion.added == [0]  # after stage 0 only the audio learner is in the ensemble
    batch = next(iter(loader()))
    feats = model.features(batch)
    eta = model.fusion.boost_rate
    torch.testing.assert_close(model.fuse_subset(feats, ["audio", "visual"]), eta * model.fusion.head(feats["audio"]))
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3)).fit(model, loader())
    assert model.fusion.added is None  # both
    torch.testing.assert_close(model.fuse_subset(feats, ["visual"]), eta * model.fusion.head(feats["visual"]))


@pytest.mark.parametrize("alignment_gradient", [False, True])
def test_absent_samples_leave_the_learner_they_lack(tmp_path, alignment_gradient):
    """Three stages (the ensemble of others and the alignment term in play), NaN standing in absent inputs."""
    class NaNAbsent(BoostNet):
        def features(self, batch):
            feats = super().features(batch)
            return {m: torch.where(batch["present"][m][:, None], z, torch.full_like(z, float("nan")))
                    for m, z in feats.items()}

    model = NaNAbsent(e1=1, e2=1, alignment_gradient=alignment_gradient)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=6)).fit(model, loader(missing=(0.3, 0.2)))
    reference = BoostNet(e1=1, e2=1, alignment_gradient=alignment_gradient)
    official_loop(reference, epochs=6, e1=1, e2=1, alignment_gradient=alignment_gradient, missing=(0.3, 0.2))
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_pretrained_learners_are_in_the_ensemble_from_the_start(tmp_path):
    model = BoostNet(e1=1, e2=1, pretrained=True, alignment_gradient=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4)).fit(model, loader())
    reference = BoostNet(e1=1, e2=1, pretrained=True, alignment_gradient=True)
    official_loop(reference, epochs=4, e1=1, e2=1, alignment_gradient=True, pretrained=True)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_unlabelled_samples_count_nowhere_and_the_ensemble_is_checkpointed(tmp_path):
    class Unlabelled(BoostNet):
        def training_step(self, batch, batch_idx):
            y = batch["target"].clone()
            y[::4] = -100  # the contract's ignore_index
            return self.fusion.training_step(self, self.features(batch), y)

    class Removed(BoostNet):
        def training_step(self, batch, batch_idx):
            keep = torch.arange(len(batch["target"])) % 4 != 0
            batch = {k: v[keep] for k, v in batch.items()}
            return self.fusion.training_step(self, self.features(batch), batch["target"])

    a, b = Unlabelled(alignment_gradient=True), Removed(alignment_gradient=True)
    for model in (a, b):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3)).fit(model, loader())
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=1e-5, atol=1e-6)
    fresh = BoostNet()
    fresh.load_state_dict(BoostNet().state_dict())
    assert fresh.fusion.added == []
    state = a.state_dict()
    fresh.load_state_dict(state)
    assert fresh.fusion.added is None and a.fusion.added is None  # both learners added, restored from the state
    partial = BoostNet()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(partial, loader())
    restored = BoostNet()
    restored.load_state_dict(partial.state_dict())
    assert restored.fusion.added == partial.fusion.added == [0]


def test_ddp_equals_one_process_and_ranks_agree(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParams(str(ddp_dir))], max_epochs=4, devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False)).fit(BoostNet(alignment_gradient=True),
                                                                                         loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = BoostNet(alignment_gradient=True)
    pl.Trainer(**trainer_kwargs(tmp_path / "one", max_epochs=4)).fit(single, loader())
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.parametrize("step", [6, 8])
def test_resume_inside_an_epoch_and_at_a_phase_start(tmp_path, step):
    """Four steps per epoch, E1 = E2 = 1: step 6 is inside epoch 1 (the first correction); step 8 ends it, so the
    resumed fit starts a phase (a fresh optimizer state) at its first batch."""
    straight = BoostNet(alignment_gradient=True)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=4)).fit(straight, resumable_loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[ckpt], max_epochs=4, enable_checkpointing=True)).fit(
        BoostNet(alignment_gradient=True), resumable_loader())
    resumed = BoostNet(seed=123, alignment_gradient=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=4)).fit(
            resumed, resumable_loader(), ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
    assert resumed.fusion.added == straight.fusion.added
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)


class Tokens3(MultimodalMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.v = nn.Linear(6, 8), nn.Linear(5, 8)
        self.t = nn.Conv1d(2, 8, kernel_size=3, padding=1)
        self.fusion = ReconBoostFusion(Head(), epochs_per_stage=1, correct_epochs=0)
        self.configure_modalities({"a": self.a, "v": self.v, "t": self.t}, fusion=self.fusion)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        seq = torch.stack([batch["audio"][:, :5], batch["visual"]], 1)
        feats = {"a": torch.tanh(self.a(batch["audio"])), "v": torch.tanh(self.v(batch["visual"])),
                 "t": torch.tanh(self.t(seq)).transpose(1, 2)}
        return self.fusion.training_step(self, feats, batch["target"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_three_modalities_with_tokens_and_adamw(tmp_path):
    model = Tokens3()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("a.") for n in moved) and any(n.startswith("v.") for n in moved)
    assert not any(n.startswith("t.") for n in moved)  # the third learner's stage has not come yet
    assert model.fusion.added == [0, 1]


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="epochs_per_stage"):
        ReconBoostFusion(Head(), epochs_per_stage=0)
    with pytest.raises(ValueError, match="weight1"):
        ReconBoostFusion(Head(), weight1=-1)

    class Automatic(BoostNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = True

    with pytest.raises(ModalityContractError, match="automatic_optimization = False"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(Automatic(), loader())


def test_fp16_overflow_mid_run_skips_the_step(tmp_path):
    from tests.helpers import OverflowAt, fp16_plugin

    overflow = OverflowAt(flat_params)
    model = BoostNet(alignment_gradient=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, plugins=[fp16_plugin(2.0 ** 8)], callbacks=[overflow])).fit(
        model, loader())
    assert overflow.scale_after == 2.0 ** 52 and torch.equal(overflow.after, overflow.before)  # the step changed nothing
    assert torch.isfinite(flat_params(model)).all() and (flat_params(model) - overflow.after).abs().max() > 1e-4
