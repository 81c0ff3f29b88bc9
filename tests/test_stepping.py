"""Invariants of the gradient machinery for every gradient callback (benchmark-protocol.md §5): resume from a
checkpoint taken INSIDE an epoch, fp16 with FORCED overflow steps, stacking in both list orders (and one
collective per optimizer step when stacked), several `fuse` calls in one step, and windows counted in steps."""

from __future__ import annotations

import itertools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_balance import AGM, OGMGE, PMR, InfoReg, MMPareto
from lightning_balance.functional.inforeg import prime_window_indicator
from tests.helpers import (SaveParams, SkipFirst, TinyAV, flat_params, fp16_plugin, loader, resumable_loader, states_equal,
                           trainer_kwargs)

# name -> factory of a fresh callback; every one edits TinyAV(aux_losses=True)'s gradients from its first epochs
FACTORIES = {
    "ogm_ge": lambda **kw: OGMGE(alpha=0.5, seed=3, **kw),
    "inforeg": lambda **kw: InfoReg(**kw),
    "agm": lambda **kw: AGM(alpha=1.0, **kw),
    "pmr": lambda **kw: PMR(alpha=1.0, fraction=0.25, momentum=0.5, **kw),
    "pmr_steps": lambda **kw: PMR(prototypes="steps", rule="continuous", entropy_weight=0.5, entropy_epochs=1, **kw),
    "mmpareto": lambda **kw: MMPareto(**kw),
}


def _model(**kw):
    return TinyAV(aux_losses=True, **kw)


def _all_finite(state):
    if isinstance(state, torch.Tensor):
        return bool(torch.isfinite(state.float()).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    if isinstance(state, float):
        return math.isfinite(state)
    return True


# ------------------------------------------------------------------------------------------------ mid-epoch resume
@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("step", [2, 4, 6])  # inside epoch 0, its last batch, inside epoch 1 (4 steps per epoch)
def test_resume_from_a_checkpoint_inside_an_epoch(tmp_path, name, step):
    straight_cb = FACTORIES[name]()
    straight = _model()
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[straight_cb], max_epochs=3)).fit(straight, resumable_loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[FACTORIES[name](), ckpt], max_epochs=3,
                                enable_checkpointing=True)).fit(_model(), resumable_loader())
    resumed_cb = FACTORIES[name]()
    resumed = _model(seed=123)  # different initial weights: everything must come from the checkpoint
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "c", callbacks=[resumed_cb], max_epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(resumed, resumable_loader(), ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict())


# ------------------------------------------------------------------------------------------------ fp16 overflow
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fp16_overflow_steps_are_skipped_without_changing_state(tmp_path, name):
    """init scale 2^40 overflows the fp16 backward on the first three steps (2^40 -> 2^32 -> 2^24 -> 2^16)."""
    cb = FACTORIES[name]()
    model = _model()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2, plugins=[fp16_plugin(2.0**40)]))
    trainer.fit(model, loader())  # no exception, also under nonfinite="raise"
    assert cb.num_skipped == 3
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16
    assert _all_finite(cb.state_dict())
    assert torch.isfinite(flat_params(model)).all()
    # the same run in which those three steps are skipped, starting at the scale they end with
    reference_cb = FACTORIES[name]()
    reference = SkipFirst(skip=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[reference_cb], max_epochs=2,
                                    plugins=[fp16_plugin(2.0**16)])).fit(reference, loader())
    assert reference_cb.num_skipped == 0
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=0)
    assert states_equal(cb.state_dict(), reference_cb.state_dict())


# ------------------------------------------------------------------------------------------------ stacking
STACKED = ["ogm_ge", "inforeg", "agm", "pmr", "mmpareto"]


@pytest.mark.parametrize("first, second", list(itertools.combinations(STACKED, 2)))
def test_stacked_methods_give_the_same_result_in_both_list_orders(tmp_path, first, second):
    runs = {}
    for order in ((first, second), (second, first)):
        callbacks = [FACTORIES[n]() for n in order]
        model = _model()
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(model, loader())
        runs[order] = (flat_params(model), {type(cb).__name__: cb.state_dict() for cb in callbacks})
    (a_params, a_states), (b_params, b_states) = runs.values()
    torch.testing.assert_close(a_params, b_params, rtol=0, atol=0)
    assert states_equal(a_states, b_states)
    for alone in (first, second):  # both methods acted in the stack
        model = _model()
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[FACTORIES[alone]()], max_epochs=2)).fit(model, loader())
        assert (flat_params(model) - a_params).abs().max() > 1e-4, f"{alone} alone equals the stack"


class _CountCollectives(SaveParams):
    """Counts the all-reduces the balancing machinery makes per optimizer step, in the spawned worker."""

    def setup(self, trainer, pl_module, stage):
        import lightning_balance.callbacks.base as base

        self.calls = 0
        original = base.all_reduce_sum

        def counting(tensor, strategy):
            self.calls += 1
            return original(tensor, strategy)

        base.all_reduce_sum = counting

    def on_train_end(self, trainer, pl_module):
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if cb is not self}
        torch.save({"params": flat_params(pl_module), "states": states, "calls": self.calls,
                    "steps": trainer.global_step}, f"{self.directory}/rank{trainer.global_rank}.pt")


@pytest.mark.timeout(300)
def test_stacked_step_methods_under_ddp_make_one_collective_per_step_and_equal_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    names = ["mmpareto", "ogm_ge", "inforeg"]
    trainer = pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[*(FACTORIES[n]() for n in names),
                                                              _CountCollectives(str(ddp_dir))],
                                          devices=2, strategy="ddp_spawn", use_distributed_sampler=False))
    trainer.fit(_model(), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["calls"] == rank0["steps"] == 8  # one all-reduce per optimizer step for the three methods
    single_cbs = [FACTORIES[n]() for n in names]
    single = _model()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=single_cbs, max_epochs=2)).fit(single, loader(batch_size=16))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ two fuse calls
class _TwoViews(TinyAV):
    """A training step with two `fuse` calls: the batch and the batch with its features scaled (a second view)."""

    def training_step(self, batch, batch_idx):
        y = batch["target"]
        first = self.fuse(self.forward_features(batch), y)
        second_batch = {"audio": batch["audio"] * 0.5, "visual": batch["visual"] * 2.0, "target": y}
        second = self.fuse(self.forward_features(second_batch), y)
        return F.cross_entropy(first, y) + F.cross_entropy(second, y)


def _views(batch):
    y = batch["target"]
    return [(batch["audio"], batch["visual"], y), (batch["audio"] * 0.5, batch["visual"] * 2.0, y)]


def test_agm_modulates_every_fuse_call_of_the_step(tmp_path):
    """Restated: AGM's scores over the samples of both calls, one kappa per modality, hooks on both calls."""
    alpha = 1.5
    reference = _TwoViews(seed=1)
    opt = torch.optim.SGD(reference.parameters(), lr=reference.lr, momentum=reference.momentum)
    run = torch.zeros(2)
    for t, batch in enumerate(loader(), start=1):
        outs, scores = [], torch.zeros(2)
        for a, v, y in _views(batch):
            za, zv = reference.audio_encoder(a), reference.visual_encoder(v)
            f_av = reference.head(torch.cat([za, zv], 1))
            f_a0 = reference.head(torch.cat([za, torch.zeros_like(zv)], 1))
            f_0v = reference.head(torch.cat([torch.zeros_like(za), zv], 1))
            m = [0.5 * (f_av - f_0v + f_a0), 0.5 * (f_av - f_a0 + f_0v)]
            with torch.no_grad():
                scores += torch.stack([-torch.log(torch.softmax(r, 1).gather(1, y[:, None]).clamp_min(1e-8)).sum()
                                       for r in m])
            outs.append((m, y))
        losses = scores / 32  # mean over the 2 x 16 samples of the step
        r = torch.exp(losses.flip(0) - losses)
        r_bar = torch.exp(run.flip(0) - run)
        kappa = torch.exp(alpha * (r_bar - r).clamp(max=10))
        run = run * (t - 1) / t + losses / t
        loss = 0
        for (m_a, m_v), y in outs:
            m_a.register_hook(lambda g, k=float(kappa[0]): g * k)
            m_v.register_hook(lambda g, k=float(kappa[1]): g * k)
            loss = loss + F.cross_entropy(m_a + m_v, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = _TwoViews(seed=1)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AGM(alpha=alpha, clip=None)], max_epochs=1)).fit(model, loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_pmr_adds_its_term_to_every_fuse_call_of_the_step(tmp_path):
    """Restated: prototypes from the first batch; scores over both calls; the PCE of the slower modality added for
    each call (a mean over that call's samples, like the user's own two cross-entropies)."""
    alpha = 2.0
    reference = _TwoViews(seed=2)
    opt = torch.optim.SGD(reference.parameters(), lr=reference.lr, momentum=reference.momentum)
    first = next(iter(loader()))
    with torch.no_grad():
        z = reference.forward_features(first)
        protos = {m: torch.stack([z[m][first["target"] == k].mean(0) for k in range(4)]) for m in z}
    for batch in loader():
        calls, s = [], torch.zeros(2)
        for a, v, y in _views(batch):
            za, zv = reference.audio_encoder(a), reference.visual_encoder(v)
            sims = [-torch.cdist(za, protos["audio"]), -torch.cdist(zv, protos["visual"])]
            with torch.no_grad():
                s += torch.stack([torch.softmax(q, 1).gather(1, y[:, None]).sum() for q in sims])
            calls.append((za, zv, sims, y))
        weights = [float(s[0] < s[1]) * alpha, float(s[1] < s[0]) * alpha]  # PCE on the modality behind
        loss = 0
        for za, zv, sims, y in calls:
            loss = loss + F.cross_entropy(reference.head(torch.cat([za, zv], 1)), y)
            loss = loss + sum(w * F.cross_entropy(q, y) for w, q in zip(weights, sims))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = _TwoViews(seed=2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[PMR(alpha=alpha, fraction=0.25)], max_epochs=1)).fit(model, loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ step windows
def test_windows_in_steps_and_the_warning_when_a_method_never_acts(tmp_path):
    one_long_epoch = loader(n=128)  # 8 batches: max_steps ends the fit inside the first epoch
    late = OGMGE(start_epoch=1)
    with pytest.warns(UserWarning, match="OGMGE never edited a gradient.*1 epoch\\(s\\), 6 optimizer step.*start_step"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[late], max_steps=6)).fit(_model(), one_long_epoch)
    assert late.num_edits == 0
    by_steps = OGMGE(start_step=2, end_step=4)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[by_steps], max_steps=6)).fit(_model(), one_long_epoch)
    assert by_steps.num_edits == 3  # steps 2, 3, 4
    pmr = PMR(prototypes="steps", epoch_length=2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[pmr], max_steps=6)).fit(_model(), one_long_epoch)
    assert pmr.prototype_epoch == 2 and pmr.num_edits == 4  # prototypes from steps 0-1, used on steps 2-5
    once = InfoReg()
    with pytest.warns(UserWarning, match="InfoReg ran a single epoch \\(6 optimizer steps\\).*set epoch_length"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[once], max_steps=6)).fit(_model(), one_long_epoch)

    class Logged(pl.Callback):  # what reaches the loggers at each step
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if "inforeg" in k})

    inforeg, logged = InfoReg(epoch_length=2), Logged()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[inforeg, logged], max_steps=6,
                                    log_every_n_steps=1)).fit(_model(), one_long_epoch)
    assert not [w for w in caught if "single epoch" in str(w.message)]  # the blocks re-evaluate the window
    assert len(inforeg.history) == 2 and inforeg._trace_epoch == 2  # blocks 0 and 1 closed, block 2 running
    # each step carries its own block's window and the trace of the block closed before it, not an epoch mean
    assert [r["balance/inforeg/window_k/audio"] for r in logged.rows[::2]] == pytest.approx([1.0] + [
        prime_window_indicator([h[0] for h in inforeg.history[:b]], inforeg.window) for b in (1, 2)])
    assert logged.rows[4]["balance/inforeg/window_k/audio"] != pytest.approx(1.0)  # block 2 saw two traces
    assert "balance/inforeg/trace/audio" not in logged.rows[0]
    assert logged.rows[2]["balance/inforeg/trace/audio"] == pytest.approx(inforeg.history[0][0])
    assert logged.rows[5]["balance/inforeg/trace/audio"] == pytest.approx(inforeg.history[1][0])
    with pytest.raises(ValueError, match="epoch_length must be None or an int >= 1"):
        OGMGE(epoch_length=0)
    with pytest.raises(ValueError, match="end_step must be None or an int >= start_step"):
        OGMGE(start_step=5, end_step=2)


def test_ogm_and_inforeg_warn_with_an_adaptive_optimizer(tmp_path):
    class AdamW(TinyAV):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    for cb in (OGMGE(), InfoReg(unimodal_losses=False), AGM()):
        with pytest.warns(UserWarning, match=f"{type(cb).__name__} was designed and published with SGD.*AdamW"):
            pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(AdamW(), loader())
    sgd = OGMGE()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[sgd], max_epochs=1)).fit(TinyAV(), loader())
    assert sgd.num_edits > 0 and not [w for w in caught if "designed and published with SGD" in str(w.message)]


def test_ogm_ge_default_parameter_rule_per_encoder():
    from torch import nn

    from lightning_balance import MultimodalMixin

    class Mixed(MultimodalMixin, pl.LightningModule):  # a Conv1d audio encoder and an MLP visual encoder
        def __init__(self):
            super().__init__()
            self.audio = nn.Sequential(nn.Conv1d(1, 8, 5), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(),
                                       nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 8))
            self.visual = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
            self.head = nn.Linear(16, 3)
            self.configure_modalities({"audio": self.audio, "visual": self.visual}, head=self.head)

    model = Mixed()
    auto = OGMGE()
    assert auto.parameter_rule(model, "audio") == "conv" and auto.parameter_rule(model, "visual") == "weights"
    assert [p.shape for p in auto.select_parameters(model, "audio")] == [torch.Size([8, 1, 5]), torch.Size([8, 8, 3])]
    assert [p.shape for p in auto.select_parameters(model, "visual")] == [torch.Size([8, 5])]
    chosen = OGMGE(params={"audio": "weights"})
    assert [p.ndim for p in chosen.select_parameters(model, "audio")] == [3, 3, 2]  # the kernels and the linear
    assert chosen.parameter_rule(model, "visual") == "weights"  # unnamed modalities: "auto"


def test_agm_coefficient_saturates_instead_of_overflowing():
    from lightning_balance.functional import agm_coefficients

    with pytest.warns(UserWarning, match="alpha \\* clamp = 100 exceeds 80"):
        AGM(alpha=10.0)
    kappa, _, _ = agm_coefficients(torch.tensor([5.0, 0.1]), torch.tensor([0.1, 5.0]), alpha=10.0, clamp=10.0)
    assert torch.isfinite(kappa).all() and kappa.max() == pytest.approx(math.exp(80), rel=1e-4)
    kappa, _, _ = agm_coefficients(torch.tensor([5.0, 0.1]), torch.tensor([0.1, 5.0]), alpha=1.0, clamp=None)
    assert torch.isfinite(kappa).all()


def test_ignore_index_samples_are_left_out_of_the_scores(tmp_path):
    """OGM-GE's scores with a quarter of the targets set to -100 equal the scores of the labelled samples alone."""
    captured = {}

    class Capture(OGMGE):
        def compute(self, stats):
            captured.setdefault("stats", {k: v.clone() for k, v in stats.items()})
            return super().compute(stats)

    class Unlabelled(TinyAV):
        def training_step(self, batch, batch_idx):
            y = batch["target"].clone()
            y[::4] = -100
            logits = self.fuse(self.forward_features(batch), y)
            captured.setdefault("batch", (self.forward_features(batch), y, logits))
            return F.cross_entropy(logits, y)

    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Capture(seed=0)], max_steps=1)).fit(Unlabelled(), loader())
    feats, y, _ = captured["batch"]
    keep = y != -100
    model = TinyAV()
    w, b = model.head.weight, model.head.bias
    expected = []
    for z, cols in ((feats["audio"], slice(0, 8)), (feats["visual"], slice(8, 16))):
        p = torch.softmax(z[keep] @ w[:, cols].T + b / 2, 1)
        expected.append(p.gather(1, y[keep][:, None]).sum())
    torch.testing.assert_close(captured["stats"]["scores"], torch.stack(expected).detach(), rtol=1e-5, atol=1e-6)
    assert captured["stats"]["count"].tolist() == [12, 12] and captured["stats"]["total"].item() == 12


class _PartlyUnlabelled(TinyAV):
    """Every fourth target is ignore_index (-100), and one batch has no label at all."""

    def training_step(self, batch, batch_idx):
        batch = dict(batch)
        y = batch["target"].clone()
        y[::4] = -100
        if batch_idx == 1:
            y[:] = -100
        batch["target"] = y
        logits = self.fuse(self.forward_features(batch), y)
        loss = F.cross_entropy(logits, y) if (y != -100).any() else logits.sum() * 0
        return self.add_unimodal_losses(loss)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_ignore_index_targets_run_and_stay_finite(tmp_path, name):
    cb = FACTORIES[name]()
    model = _PartlyUnlabelled(aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2)).fit(model, loader())
    assert torch.isfinite(flat_params(model)).all() and _all_finite(cb.state_dict())
    assert cb.num_edits > 0


def test_a_step_without_labelled_samples_changes_nothing(tmp_path):
    """AGM's running means and iteration count skip a batch whose targets are all ignore_index (its clip rule
    still runs on that step's gradient, with kappa = 1)."""

    class OneUnlabelled(TinyAV):
        def training_step(self, batch, batch_idx):
            y = batch["target"] if batch_idx != 2 else torch.full_like(batch["target"], -100)
            logits = self.fuse(self.forward_features(batch), y)
            return F.cross_entropy(logits, y) if batch_idx != 2 else logits.sum() * 0

    cb = AGM()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(OneUnlabelled(), loader())
    assert cb.iterations == 3 and cb.num_edits == 4


def test_ogm_ge_auto_rule_on_a_transformer_with_positional_parameters_and_a_vit_like_encoder():
    from torch import nn

    from lightning_balance import MultimodalMixin

    class Tokens(nn.Module):  # a transformer encoder with 3-D learned positions and a CLS token
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.pos = nn.Parameter(torch.zeros(1, 5, 16))
            self.cls = nn.Parameter(torch.zeros(1, 1, 16))
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

    class Patches(nn.Module):  # a ViT-like encoder: a small Conv2d patch embedding, then linear layers
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    class Model(MultimodalMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.audio, self.visual, self.head = Tokens(), Patches(), nn.Linear(32, 3)
            self.configure_modalities({"audio": self.audio, "visual": self.visual}, head=self.head)

    model, cb = Model(), OGMGE()
    assert cb.parameter_rule(model, "audio") == "weights" and cb.parameter_rule(model, "visual") == "weights"
    edited = {id(p) for p in cb.select_parameters(model, "audio")}
    assert id(model.audio.pos) in edited and id(model.audio.embed.weight) in edited
    assert id(model.audio.layer.self_attn.in_proj_weight) in edited
    assert {id(p) for p in OGMGE(params="conv").select_parameters(model, "visual")} == {id(model.visual.patch.weight)}


class _WithHoldout(pl.LightningDataModule):
    """TinyAV's data plus a held-out part for Gradient-Blending's estimates."""

    def train_dataloader(self):
        return loader()

    def holdout_dataloader(self):
        return loader(n=32, seed=5)


@pytest.mark.parametrize("other", STACKED)
def test_gradient_blending_stacks_in_both_list_orders(tmp_path, other):
    from lightning_balance import GradientBlending

    def gblend():
        return GradientBlending(every_n_epochs=1, estimate_epochs=1, max_batches=2)

    runs = []
    for order in ("first", "last"):
        callbacks = [gblend(), FACTORIES[other]()] if order == "first" else [FACTORIES[other](), gblend()]
        model = _model()
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(model, datamodule=_WithHoldout())
        runs.append((flat_params(model), {type(cb).__name__: cb.state_dict() for cb in callbacks}, model.loss_weights))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert states_equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]
    assert runs[0][2] != {"fused": 1.0, "audio": 1.0, "visual": 1.0}  # the blend acted


def test_pmr_builds_prototypes_when_its_window_opens_inside_an_epoch(tmp_path):
    cb = PMR(start_step=2, momentum=0.0)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2)).fit(_model(), loader())
    assert cb.num_edits == 6  # steps 2 and 3 of epoch 0 (prototypes built at step 2), then all of epoch 1


@pytest.mark.parametrize("which", ["pmr", "gblend"])
def test_own_passes_over_the_training_data_leave_a_persistent_worker_loader_alone(tmp_path, which):
    """PMR's prototype pass and Gradient-Blending's estimate iterate the training data while the Trainer holds the
    epoch's iterator: with persistent workers that iterator must not be consumed (every epoch has all its steps)."""
    from torch.utils.data import DataLoader

    from lightning_balance import GradientBlending
    from tests.helpers import DictDataset, InterleavedSampler

    steps = {}

    class Count(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps[trainer.current_epoch] = steps.get(trainer.current_epoch, 0) + 1

    class Persistent(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(DictDataset(n=64), batch_size=16, sampler=InterleavedSampler(64), num_workers=1,
                              persistent_workers=True)

        def holdout_dataloader(self):
            return loader(n=32, seed=5)

    cb = PMR(fraction=0.5) if which == "pmr" else GradientBlending(every_n_epochs=1, estimate_epochs=1, max_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, Count()], max_epochs=2)).fit(_model(), datamodule=Persistent())
    assert steps == {0: 4, 1: 4}
