"""Gradient-Blending against the paper's online recipe, restated here in plain torch; the branch
optimizers for any torch optimizer (per-group options, the current learning rate, a scheduler)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_balance import GradientBlending
from lightning_balance.callbacks.gblend import _rebuild_optimizer
from tests.helpers import DictDataset, TinyAV, flat_params, loader, trainer_kwargs

HEADS = ("fused", "audio", "visual")


class Data(pl.LightningDataModule):
    """Two in-order training batches of 16 (interleaved across ranks under DDP) and 64 held-out samples."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return loader(n=32, batch_size=self.batch_size)

    def holdout_dataloader(self):
        return DataLoader(DictDataset(n=64, seed=1), batch_size=32)


class Configured(TinyAV):
    """TinyAV trained with the unimodal losses and the optimizer (and scheduler) named by ``optimizer``."""

    def __init__(self, optimizer: str = "sgd", **kwargs) -> None:
        super().__init__(aux_losses=True, **kwargs)
        self.optimizer = optimizer

    def configure_optimizers(self):
        return RECIPES[self.optimizer]["configure"](self.parameters())


def _adamw_with_scheduler(params):
    optimizer = torch.optim.AdamW(params, lr=0.02, weight_decay=0.1)
    return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)}


# the Lightning configuration, and the same optimizer written out by hand for the recipe: (params, lr at epoch)
RECIPES = {
    "sgd": {"configure": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "make": lambda ps, epoch: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "trainer": {}},
    "adamw_steplr": {"configure": _adamw_with_scheduler,
                     "make": lambda ps, epoch: torch.optim.AdamW(ps, lr=0.02 * 0.5**epoch, weight_decay=0.1),
                     "trainer": {}, "scheduler": True},
    "sgd_clipped": {"configure": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                    "make": lambda ps, epoch: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                    "trainer": {"gradient_clip_val": 0.05}, "clip": ("norm", 0.05)},
    "sgd_clipped_by_value": {"configure": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                             "make": lambda ps, epoch: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                             "trainer": {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"},
                             "clip": ("value", 0.01)},
}


# ---------------------------------------------------------------------------- the recipe, in plain torch
def head_logits(model, batch, head):
    """Fused logits of the concat head, or modality m's share of them: W_m z_m + b / 2."""
    za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
    weight, bias = model.head.weight, model.head.bias
    if head == "fused":
        return F.linear(torch.cat([za, zv], dim=1), weight, bias)
    if head == "audio":
        return F.linear(za, weight[:, :8], bias / 2)
    return F.linear(zv, weight[:, 8:], bias / 2)


def mean_loss(model, batches, head):
    model.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(head_logits(model, b, head), b["target"], reduction="sum") for b in batches)
        count = sum(len(b["target"]) for b in batches)
    model.train()
    return float(total) / count


def clip(model, how):
    if how is not None:
        grads = [p for p in model.parameters() if p.grad is not None]
        if how[0] == "norm":
            torch.nn.utils.clip_grad_norm_(grads, how[1])
        else:
            torch.nn.utils.clip_grad_value_(grads, how[1])


def recipe_weights(model, train, holdout, epochs, make_optimizer, how_to_clip):
    """Online G-Blend: each head's branch trained alone on a copy, w_k ∝ ΔG_k / ΔO_k², normalised."""
    raw, deltas = [], []
    for head in HEADS:
        branch = copy.deepcopy(model)
        train_0, holdout_0 = mean_loss(branch, train, head), mean_loss(branch, holdout, head)
        optimizer = make_optimizer(branch.parameters())
        for _ in range(epochs):
            for batch in train:
                optimizer.zero_grad()
                F.cross_entropy(head_logits(branch, batch, head), batch["target"]).backward()
                clip(branch, how_to_clip)
                optimizer.step()
        train_1, holdout_1 = mean_loss(branch, train, head), mean_loss(branch, holdout, head)
        delta_o = (holdout_1 - train_1) - (holdout_0 - train_0)
        delta_g = holdout_0 - holdout_1
        raw.append(max(max(delta_g, 0.0) / max(delta_o**2, 1e-8), 1e-8))
        deltas.append((delta_g, delta_o))
    return {h: r / sum(raw) for h, r in zip(HEADS, raw)}, deltas


def recipe_run(model, train, holdout, *, max_epochs, every, epochs, recipe):
    """The joint model trained on Σ_k w_k L_k, the weights re-estimated every ``every`` epochs."""
    make, how_to_clip = recipe["make"], recipe.get("clip")
    optimizer = make(model.parameters(), 0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if recipe.get("scheduler") else None
    weights, history = dict.fromkeys(HEADS, 1.0), []
    for epoch in range(max_epochs):
        if epoch % every == 0:
            weights, deltas = recipe_weights(model, train, holdout, epochs, lambda ps, e=epoch: make(ps, e), how_to_clip)
            history.append((weights, deltas))
        for batch in train:
            optimizer.zero_grad()
            sum(weights[h] * F.cross_entropy(head_logits(model, batch, h), batch["target"]) for h in HEADS).backward()
            clip(model, how_to_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return history


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_matches_the_papers_recipe(tmp_path, name):
    """Weights, ΔG, ΔO of two estimates and the parameters after 3 epochs (6 optimizer steps, past the
    second estimate) equal the recipe's. ``adamw_steplr``: the branches use the learning rate in force
    (halved every epoch by the user's scheduler), not the initial one, and do not step the scheduler."""
    recipe = RECIPES[name]
    data = Data()
    reference = Configured(name)
    history = recipe_run(reference, list(data.train_dataloader()), list(data.holdout_dataloader()),
                         max_epochs=3, every=2, epochs=3, recipe=recipe)
    cb = GradientBlending(every_n_epochs=2, estimate_epochs=3)
    model = Configured(name)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3, **recipe["trainer"])).fit(model, datamodule=data)

    assert [h["epoch"] for h in cb.history] == [0, 2]
    for got, (weights, deltas) in zip(cb.history, history, strict=True):
        assert min(weights.values()) > 1e-4 and max(weights.values()) - min(weights.values()) > 0.1  # a real blend
        for h, (delta_g, delta_o) in zip(HEADS, deltas):
            # ΔO is a difference of differences of float32 losses: relative errors of 1e-4 on the weights
            assert got[f"weight/{h}"] == pytest.approx(weights[h], rel=1e-3)
            assert got[f"delta_g/{h}"] == pytest.approx(delta_g, rel=1e-3, abs=1e-5)
            assert got[f"delta_o/{h}"] == pytest.approx(delta_o, rel=1e-3, abs=1e-5)
    assert history[0][0] != pytest.approx(history[1][0], rel=1e-2)  # the second estimate saw a trained model
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-4, atol=1e-5)
    assert (flat_params(model) - flat_params(Configured(name))).abs().max() > 1e-2  # it trained


# ---------------------------------------------------------------------------- any torch optimizer
OPTIMIZERS = {  # class, constructor options, options of the second param group
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, {"weight_decay": 0.0}),
    "Adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.9), "amsgrad": True}, {"eps": 1e-6}),
    "AdamW": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, {"weight_decay": 0.0}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}, {"alpha": 0.9}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}, {"initial_accumulator_value": 0.1}),
    "Adamax": (torch.optim.Adamax, {"lr": 0.01}, {"betas": (0.5, 0.9)}),
    "NAdam": (torch.optim.NAdam, {"lr": 0.01, "momentum_decay": 0.01}, {"weight_decay": 0.1}),
    "RAdam": (torch.optim.RAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}, {"eps": 1e-6}),
    "Adadelta": (torch.optim.Adadelta, {"lr": 0.5, "rho": 0.8}, {"weight_decay": 0.1}),
    "ASGD": (torch.optim.ASGD, {"lr": 0.05, "t0": 1.0}, {"lambd": 1e-3}),
    "Rprop": (torch.optim.Rprop, {"lr": 0.01, "etas": (0.4, 1.1)}, {"step_sizes": (1e-5, 1.0)}),
    "Adafactor": (torch.optim.Adafactor, {"lr": 0.01, "beta2_decay": -0.7}, {"weight_decay": 0.1}),
}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _steps(net, optimizer, n=3, closure=False):
    torch.manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

        def loss_fn():
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        if closure:
            optimizer.step(loss_fn)
        else:
            loss_fn()
            optimizer.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_branch_optimizer_is_a_fresh_copy_at_the_current_learning_rate(name):
    """The rebuilt optimizer trains like one written by hand: same class, the constructor's options, each
    group's own options and its current learning rate, and no state."""
    cls, options, second = OPTIMIZERS[name]
    net = _net()
    user = cls([{"params": net[0].parameters()}, {"params": net[2].parameters(), **second}], **options)
    scheduler = torch.optim.lr_scheduler.StepLR(user, step_size=1, gamma=0.5)
    _steps(net, user)  # some state, then the scheduler halves the learning rate of both groups
    scheduler.step()
    copied = copy.deepcopy(net)
    rebuilt = _rebuild_optimizer(user, {id(p): q for p, q in zip(net.parameters(), copied.parameters())})
    assert type(rebuilt) is cls and len(rebuilt.param_groups) == 2
    assert all(float(state.get("step", 0)) == 0 for state in rebuilt.state.values())  # (Adagrad fills it at init)

    by_hand_net = copy.deepcopy(net)
    lr = options["lr"] * 0.5
    by_hand = cls([{"params": by_hand_net[0].parameters(), "lr": lr},
                   {"params": by_hand_net[2].parameters(), **second, "lr": lr}], **{**options, "lr": lr})
    _steps(copied, rebuilt)
    _steps(by_hand_net, by_hand)
    torch.testing.assert_close(flat_params(copied), flat_params(by_hand_net), rtol=0, atol=0)
    assert not torch.equal(flat_params(copied), flat_params(net))


def test_lbfgs_branch_optimizer():
    net = _net()
    user = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4, history_size=5)
    _steps(net, user, closure=True)
    copied, by_hand_net = copy.deepcopy(net), copy.deepcopy(net)
    rebuilt = _rebuild_optimizer(user, {id(p): q for p, q in zip(net.parameters(), copied.parameters())})
    by_hand = torch.optim.LBFGS(by_hand_net.parameters(), lr=0.5, max_iter=4, history_size=5)
    _steps(copied, rebuilt, closure=True)
    _steps(by_hand_net, by_hand, closure=True)
    torch.testing.assert_close(flat_params(copied), flat_params(by_hand_net), rtol=0, atol=0)


class WithOptimizer(TinyAV):
    def __init__(self, name: str) -> None:
        super().__init__(aux_losses=True)
        self.name = name

    def configure_optimizers(self):
        if self.name == "LBFGS":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)
        cls, options, second = OPTIMIZERS[self.name]
        groups = [{"params": self.audio_encoder.parameters()},
                  {"params": [*self.visual_encoder.parameters(), *self.head.parameters()], **second}]
        optimizer = cls(groups, **options)
        return [optimizer], [torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LBFGS"])
def test_estimates_with_the_users_optimizer(tmp_path, name):
    """A fit with the optimizer (two param groups, an LR scheduler; LBFGS with its closure) estimates."""
    cb = GradientBlending(every_n_epochs=1, estimate_epochs=1, max_batches=1)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2)).fit(WithOptimizer(name), datamodule=Data())
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert sum(cb.weights.values()) == pytest.approx(1.0)
    assert all(0 < w < 1 for w in cb.weights.values())


# ---------------------------------------------------------------------------- absent modalities
class MaskedData(Data):
    """The same shapes with each modality absent in 30% of the samples (never both; absent inputs hold garbage)."""

    def train_dataloader(self):
        return loader(n=32, batch_size=self.batch_size, missing=(0.3, 0.3))

    def holdout_dataloader(self):
        return DataLoader(DictDataset(n=64, seed=1, missing=(0.3, 0.3)), batch_size=32)


def masked_terms(model, batch, head):
    """(per-sample CE, which samples count) of one head: absent features are zeros before the concat head;
    a unimodal head counts the samples that have its modality."""
    pa, pv = batch["present"]["audio"], batch["present"]["visual"]
    za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
    weight, bias = model.head.weight, model.head.bias
    if head == "fused":
        logits, counts = F.linear(torch.cat([za * pa[:, None], zv * pv[:, None]], dim=1), weight, bias), pa | pv
    elif head == "audio":
        logits, counts = F.linear(za, weight[:, :8], bias / 2), pa
    else:
        logits, counts = F.linear(zv, weight[:, 8:], bias / 2), pv
    return F.cross_entropy(logits, batch["target"], reduction="none"), counts


def masked_mean(model, batches, head):
    model.eval()
    with torch.no_grad():
        total = count = 0.0
        for b in batches:
            ce, counts = masked_terms(model, b, head)
            total += float(ce[counts].sum())
            count += float(counts.sum())
    model.train()
    return total / count


def test_matches_the_recipe_with_absent_modalities(tmp_path):
    """With 30% of each modality absent: a head's ΔG and ΔO are measured on the samples that have its
    modality, its branch trains on them alone, and the joint loss adds each unimodal term as a sum over the
    present samples divided by the batch size. Two estimates and the parameters after 3 epochs equal the
    recipe restated here."""
    data = MaskedData()
    train, holdout = list(data.train_dataloader()), list(data.holdout_dataloader())
    assert 0.15 < 1 - float(torch.cat([b["present"]["audio"] for b in train]).float().mean()) < 0.45
    reference = Configured("sgd")

    def weights_now():
        raw, deltas = [], []
        for head in HEADS:
            branch = copy.deepcopy(reference)
            t0, v0 = masked_mean(branch, train, head), masked_mean(branch, holdout, head)
            optimizer = torch.optim.SGD(branch.parameters(), lr=0.1, momentum=0.9)
            for _ in range(3):
                for batch in train:
                    optimizer.zero_grad()
                    ce, counts = masked_terms(branch, batch, head)
                    ce[counts].mean().backward()
                    optimizer.step()
            t1, v1 = masked_mean(branch, train, head), masked_mean(branch, holdout, head)
            delta_o, delta_g = (v1 - t1) - (v0 - t0), v0 - v1
            raw.append(max(max(delta_g, 0.0) / max(delta_o**2, 1e-8), 1e-8))
            deltas.append((delta_g, delta_o))
        return {h: r / sum(raw) for h, r in zip(HEADS, raw)}, deltas

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    history = []
    for epoch in range(3):
        if epoch % 2 == 0:
            history.append(weights_now())
        weights = history[-1][0]
        for batch in train:
            optimizer.zero_grad()
            loss = 0.0
            for h in HEADS:
                ce, counts = masked_terms(reference, batch, h)
                loss = loss + weights[h] * (ce * counts).sum() / len(ce)
            loss.backward()
            optimizer.step()

    cb = GradientBlending(every_n_epochs=2, estimate_epochs=3)
    model = Configured("sgd")
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(model, datamodule=data)
    assert [h["epoch"] for h in cb.history] == [0, 2]
    for got, (weights, deltas) in zip(cb.history, history, strict=True):
        assert max(weights.values()) - min(weights.values()) > 0.05  # a real blend
        for h, (delta_g, delta_o) in zip(HEADS, deltas):
            assert got[f"weight/{h}"] == pytest.approx(weights[h], rel=1e-3)
            assert got[f"delta_g/{h}"] == pytest.approx(delta_g, rel=1e-3, abs=1e-5)
            assert got[f"delta_o/{h}"] == pytest.approx(delta_o, rel=1e-3, abs=1e-5)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-4, atol=1e-5)
    # the complete-data recipe gives other numbers: the mask is not ignored
    unmasked, _ = recipe_weights(Configured("sgd"), train, holdout, 3,
                                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), None)
    assert unmasked != pytest.approx(history[0][0], rel=1e-2)
