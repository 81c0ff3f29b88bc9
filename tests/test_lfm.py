"""LFM loss term: the matching loss on hand-computed distributions and against the official ``Alignment`` restated
with ``F.kl_div``; the fitted polynomial written out; the Hessian-vector product against finite differences; the
parameters after several steps against the official loops restated here (the fitted schedule with and without
accumulation, the learnable schedule over three epochs); DDP against one process; resume inside an epoch; absent
modalities; M = 3; the task-loss factor; bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_balance import LFMLoss, ModalityContractError
from lightning_balance.functional import (lfm_alignment, lfm_alpha_step, lfm_divergence, lfm_fitted_alpha,
                                          lfm_hypergradient)
from tests.helpers import (DictDataset, MultiMLP, SaveParams, TinyAV, flat_params, loader, resumable_loader,
                           trainer_kwargs)

# the official getAlpha_Learnable_Fitted's coefficients, copied from the paper's code
COEF = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]


def official_alignment(o_a, o_v):
    """The official ``Alignment`` (Crema_epoch.py), restated."""
    p, q = F.softmax(o_a, dim=-1), F.softmax(o_v, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def fitted(epoch):
    return sum(c * epoch ** i for i, c in enumerate(COEF))


def split_logits(model, za, zv):
    w, b = model.head.weight, model.head.bias
    return za @ w[:, :8].T + b / 2, zv @ w[:, 8:].T + b / 2


# ---------------------------------------------------------------------------- functional core
def test_divergences_by_hand():
    # p = (.5, .5), q = (.75, .25), m = (.625, .375)
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    official = 0.5 * (.625 * math.log(.625 / .5) + .375 * math.log(.375 / .5)
                      + .625 * math.log(.625 / .75) + .375 * math.log(.375 / .25))
    js = 0.5 * (.5 * math.log(.5 / .625) + .5 * math.log(.5 / .375) + .75 * math.log(.75 / .625)
                + .25 * math.log(.25 / .375))
    assert lfm_divergence(a, b).item() == pytest.approx(official, rel=1e-6)
    assert lfm_divergence(a, b, "js").item() == pytest.approx(js, rel=1e-6)
    assert official != pytest.approx(js, rel=1e-3)  # the official form is not the textbook JS
    assert lfm_divergence(b, b).item() == pytest.approx(0.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g)
    torch.testing.assert_close(lfm_alignment([x, y]), official_alignment(x, y))
    torch.testing.assert_close(lfm_alignment([x, y]), lfm_alignment([y, x]))


def test_underflowing_probabilities_give_finite_gradients():
    a = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0, 200.0]], requires_grad=True)
    for divergence in ("official", "js"):
        value = lfm_divergence(a, b, divergence).sum()
        (ga, gb) = torch.autograd.grad(value, [a, b])
        assert torch.isfinite(value) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert lfm_divergence(a, b).item() == pytest.approx(0.5 * 200 - math.log(2), rel=1e-3)


def test_three_modalities_average_the_pairs_and_absent_pairs_count_where_both_are_present():
    g = torch.Generator().manual_seed(1)
    x, y, z = (torch.randn(6, 4, generator=g) for _ in range(3))
    expected = (official_alignment(x, y) + official_alignment(x, z) + official_alignment(y, z)) / 3
    torch.testing.assert_close(lfm_alignment([x, y, z]), expected)
    present = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    rows = lambda i, j: (present[:, i] & present[:, j]).nonzero().flatten()  # noqa: E731
    pairs = [official_alignment(u[rows(i, j)], v[rows(i, j)]) * len(rows(i, j)) / 6 for (i, u), (j, v) in
             (((0, x), (1, y)), ((0, x), (2, z)), ((1, y), (2, z)))]
    torch.testing.assert_close(lfm_alignment([x, y, z], present), sum(pairs) / 3)


def test_the_fitted_schedule_is_the_official_polynomial():
    for epoch in (0, 1, 17, 40, 123, 199):
        cls, align = lfm_fitted_alpha(epoch)
        assert cls == pytest.approx(fitted(epoch), rel=1e-12) and align == pytest.approx(1 - fitted(epoch))
    assert lfm_fitted_alpha(0)[0] == pytest.approx(0.204623704)
    assert lfm_fitted_alpha(250)[0] == pytest.approx(fitted(199))  # past the fitted range: its last epoch
    assert lfm_fitted_alpha(10, horizon=40)[0] == pytest.approx(fitted(50))  # 200 epochs stretched over 40
    with pytest.raises(ValueError, match="horizon"):
        lfm_fitted_alpha(1, horizon=0)


def test_the_learnable_step_halves_the_rate_every_20th_epoch_and_clips():
    assert lfm_alpha_step(0.95, 1e-4, 2.0, epoch=0) == pytest.approx((1 - (0.95 - 2e-4), 0.95 - 2e-4, 1e-4))
    assert lfm_alpha_step(0.5, 1e-4, 2.0, epoch=20)[1:] == pytest.approx((0.5 - 1e-4, 5e-5))
    assert lfm_alpha_step(0.5, 1e-4, 2.0, epoch=21)[2] == pytest.approx(1e-4)
    assert lfm_alpha_step(0.5, 1.0, -10.0, epoch=3)[1] == 0.95 and lfm_alpha_step(0.5, 1.0, 10.0, epoch=3)[1] == 0.05


def test_the_hessian_vector_product_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    w1 = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    params = [w1, w2]

    def losses(a, b):
        h = torch.tanh(x @ a.T)
        logits = h @ b.T
        cls = F.cross_entropy(logits, y)
        return cls, 0.3 * cls + 0.7 * (logits ** 2).mean()

    cls, total = losses(w1, w2)
    v = torch.autograd.grad(cls, params, retain_graph=True)
    h = lfm_hypergradient(total, cls, params, index=0)
    eps = 1e-5

    def grad_total(sign):
        a = (w1 + sign * eps * v[0]).detach().requires_grad_()
        b = (w2 + sign * eps * v[1]).detach().requires_grad_()
        return torch.autograd.grad(losses(a, b)[1], [a])[0]

    fd = (grad_total(1) - grad_total(-1)) / (2 * eps)
    assert h.item() == pytest.approx(fd.mean().item(), rel=1e-5)
    assert lfm_hypergradient(*losses(w1, w2)[::-1], params, index=1).item() != pytest.approx(h.item())


# ---------------------------------------------------------------------------- the shell
class LFMAV(TinyAV):
    def __init__(self, seed=0, **term):
        super().__init__(seed=seed)
        self.configure_loss_terms([LFMLoss(**term)])

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


class HoldoutData(pl.LightningDataModule):
    def __init__(self, batch_size=16, make=loader, missing=None):
        super().__init__()
        self.batch_size, self.make, self.missing = batch_size, make, missing

    def train_dataloader(self):
        return self.make(batch_size=self.batch_size, missing=self.missing)

    def holdout_dataloader(self):
        return DataLoader(DictDataset(n=16, seed=7), batch_size=16, shuffle=False)


def official_fitted(model, epochs, batch_size=16, accumulate=1, horizon=None, scale_task=True):
    """The official Crema_epoch.py loop for TinyAV's concat head: loss = 2 (α_cls CE + α_align Alignment(o_a, o_v)),
    the unimodal logits the head's halves with b/2, α from the polynomial at the epoch; SGD(0.1, momentum 0.9)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        t = epoch if horizon is None else epoch * 200 / horizon
        a_cls = fitted(t)
        a_align = 1 - a_cls
        for i, batch in enumerate(loader(batch_size=batch_size)):
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            ce = F.cross_entropy(model.head(torch.cat([za, zv], 1)), batch["target"])
            align = official_alignment(*split_logits(model, za, zv))
            loss = 2 * (a_cls * ce + a_align * align) if scale_task else ce + a_align / a_cls * align
            (loss / accumulate).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()


@pytest.mark.parametrize("accumulate,horizon,scale_task", [(1, None, True), (2, 2, True), (1, 2, False)])
def test_fitted_schedule_follows_the_official_loop_over_several_steps(tmp_path, accumulate, horizon, scale_task):
    model = LFMAV(horizon=horizon, scale_task=scale_task)
    pl.Trainer(**trainer_kwargs(tmp_path, accumulate_grad_batches=accumulate)).fit(
        model, loader(batch_size=16 // accumulate))
    reference = LFMAV()
    official_fitted(reference, 2, 16 // accumulate, accumulate, horizon, scale_task)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    plain = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(plain, loader())
    assert (flat_params(plain) - flat_params(model)).abs().max() > 1e-3


def official_learnable(model, epochs, lr_alpha, halve_every):
    """Crema_epoch_learnable.py restated: before each epoch getAlpha_Learnable on the first half of the 16 held-out
    samples (HVP of L_total with the classification gradient, the mean of its first tensor), then the epoch."""
    holdout = next(iter(DataLoader(DictDataset(n=16, seed=7), batch_size=16)))
    alpha = [0.05, 0.95]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for epoch in range(epochs):
        za, zv = model.audio_encoder(holdout["audio"][:8]), model.visual_encoder(holdout["visual"][:8])
        loss_cls = F.cross_entropy(model.head(torch.cat([za, zv], 1)), holdout["target"][:8])
        loss_align = official_alignment(*split_logits(model, za, zv))
        total = alpha[0] * loss_cls + alpha[1] * loss_align
        theta = torch.autograd.grad(total, list(model.parameters()), create_graph=True)
        cls = torch.autograd.grad(loss_cls, list(model.parameters()), retain_graph=True, create_graph=True)
        hvp = torch.autograd.grad(theta, list(model.parameters()), grad_outputs=cls, retain_graph=True)
        grad = hvp[0].mean().item()
        grads.append(grad)
        if epoch % halve_every == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        alpha[1] = max(0.05, min(0.95, alpha[1] - lr_alpha * grad))
        alpha[0] = 1.0 - alpha[1]
        for batch in loader():
            opt.zero_grad()
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            ce = F.cross_entropy(model.head(torch.cat([za, zv], 1)), batch["target"])
            loss = 2 * (alpha[0] * ce + alpha[1] * official_alignment(*split_logits(model, za, zv)))
            loss.backward()
            opt.step()
    return alpha, lr_alpha, grads


def test_learnable_schedule_follows_the_official_loop_over_three_epochs(tmp_path):
    model = LFMAV(schedule="learnable", lr_alpha=5.0, halve_every=2)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3)).fit(model, datamodule=HoldoutData())
    reference = LFMAV()
    alpha, lr_alpha, grads = official_learnable(reference, 3, 5.0, 2)
    term = model.balance_losses["lfm"]
    cls, align, lr, epoch = term.alpha_state.tolist()
    assert (cls, align, lr, epoch) == pytest.approx((alpha[0], alpha[1], lr_alpha, 2.0), rel=1e-5)
    assert abs(align - 0.95) > 1e-3 and lr == pytest.approx(2.5)  # it moved, and the rate was halved at epoch 2
    assert term.last_hypergradient == pytest.approx(grads[-1], rel=1e-4)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


class SaveAlpha(SaveParams):
    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(pl_module.balance_losses["lfm"].alpha_state, f"{self.directory}/alpha{trainer.global_rank}.pt")


@pytest.mark.timeout(300)
def test_ddp_equals_one_process_and_ranks_take_one_alpha(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveAlpha(str(ddp_dir))], devices=2, strategy="ddp_spawn",
                                use_distributed_sampler=False)).fit(
        LFMAV(schedule="learnable", lr_alpha=0.5), datamodule=HoldoutData(batch_size=8, missing=(0.2, 0.2)))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(torch.load(ddp_dir / "alpha0.pt"), torch.load(ddp_dir / "alpha1.pt"))
    single = LFMAV(schedule="learnable", lr_alpha=0.5)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(single, datamodule=HoldoutData(missing=(0.2, 0.2)))
    torch.testing.assert_close(torch.load(ddp_dir / "alpha0.pt"), single.balance_losses["lfm"].alpha_state)
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_resume_inside_an_epoch_keeps_the_learned_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = HoldoutData(make=resumable_loader)
    straight = LFMAV(schedule="learnable", lr_alpha=0.5)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=3)).fit(straight, datamodule=data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[ckpt], max_epochs=3, enable_checkpointing=True)).fit(
        LFMAV(schedule="learnable", lr_alpha=0.5), datamodule=HoldoutData(make=resumable_loader))
    resumed = LFMAV(seed=123, schedule="learnable", lr_alpha=0.9)  # other weights and rate: all from the checkpoint
    pl.Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=3)).fit(
        resumed, datamodule=HoldoutData(make=resumable_loader), ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.balance_losses["lfm"].alpha_state, straight.balance_losses["lfm"].alpha_state)


def test_absent_modalities_are_matched_only_where_both_are_present(tmp_path):
    seen = []

    class Watch(LFMAV):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            record = self.balance_record
            o_a, o_v = split_logits(self, record.features["audio"], record.features["visual"])
            both = batch["present"]["audio"] & batch["present"]["visual"]
            expected = (2 * (1 - fitted(self.current_epoch)) * official_alignment(o_a[both], o_v[both])
                        * int(both.sum()) / len(both))  # summed over the samples with both, divided by N
            seen.append((self.balance_losses["lfm"].from_record(self, record)[0].item(), expected.item()))
            return loss

    model = Watch()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, loader(missing=(0.3, 0.3)))
    assert len(seen) == 4 and all(a == pytest.approx(b, rel=1e-5) for a, b in seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_three_modalities_and_the_logged_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (32,), generator=g)
    items = [{"a": torch.randn(4, generator=g) + y[i], "b": torch.randn(4, generator=g), "c": torch.randn(3, generator=g),
              "target": y[i]} for i in range(32)]
    logged = {}

    class Three(MultiMLP):
        def __init__(self):
            super().__init__({"a": 4, "b": 4, "c": 3}, classes=3)
            self.configure_loss_terms([LFMLoss()])

        def training_step(self, batch, batch_idx):
            logits = self.fuse({m: self.encoders[m](batch[m]) for m in self.modalities}, batch["target"])
            total = self.add_loss_terms(F.cross_entropy(logits, batch["target"]))
            uni = self.compute_unimodal_logits(self.balance_record.features)
            d = sum(official_alignment(uni[i], uni[j]) for i, j in (("a", "b"), ("a", "c"), ("b", "c"))) / 3
            a_cls = fitted(self.current_epoch)
            torch.testing.assert_close(total, 2 * a_cls * F.cross_entropy(logits, batch["target"]) + 2 * (1 - a_cls) * d)
            return total

        def on_train_batch_end(self, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, log_every_n_steps=1)).fit(Three(), DataLoader(items, batch_size=16))
    assert logged["balance/lfm/alpha_cls"] == pytest.approx(fitted(1), rel=1e-5)
    assert logged["balance/lfm/divergence"] > 0


def test_clear_errors(tmp_path):
    for bad in (dict(schedule="heuristic"), dict(horizon=0), dict(divergence="kl"), dict(alpha_align_init=1.0),
                dict(lr_alpha=-1.0), dict(holdout_samples=0), dict(scale_task="yes")):
        with pytest.raises(ValueError):
            LFMLoss(**bad)
    with pytest.raises(ModalityContractError, match="holdout_dataloader"):
        pl.Trainer(**trainer_kwargs(tmp_path)).fit(LFMAV(schedule="learnable"), loader())
    with pytest.raises(ModalityContractError, match="not a parameter"):
        pl.Trainer(**trainer_kwargs(tmp_path)).fit(LFMAV(schedule="learnable", hyper_parameter="nope"),
                                                   datamodule=HoldoutData())


def test_the_learned_state_survives_a_dtype_cast_and_loads_from_a_state_dict():
    term = LFMLoss(schedule="learnable")
    term._alpha = [0.1, 0.9, 5e-5, 257.0]
    term.to(torch.bfloat16)  # bf16-true casts every floating buffer; the state is not one
    assert term.alpha_state.tolist() == [0.1, 0.9, 5e-5, 257.0]
    other = LFMLoss(schedule="learnable")
    other.load_state_dict(term.state_dict())
    assert other.alpha_state.tolist() == [0.1, 0.9, 5e-5, 257.0]
