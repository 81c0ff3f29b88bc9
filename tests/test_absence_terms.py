"""Absent modalities in the loss terms, Gradient-Blending's branch losses, the monitor and the diagnosis: each
value against a present-only value computed here by hand."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import ContrastiveLoss, ModalityDiagnostics, ModalityMonitor, ReconstructionLoss, UMTLoss
from tests.helpers import DictDataset, TinyAV, trainer_kwargs

PRESENT = {"audio": torch.tensor([True, False, True, True]), "visual": torch.tensor([True, True, False, True])}


def test_contrastive_pairs_are_the_samples_that_have_both_modalities():
    torch.manual_seed(0)
    vectors = {"audio": torch.randn(4, 3), "visual": torch.randn(4, 3)}
    term = ContrastiveLoss(init_temperature=0.5)  # no feature_dims: no projection
    value = term(vectors, PRESENT)
    both = [0, 3]  # rows 1 and 2 lack a modality: no positive, and no negative for the others
    a = F.normalize(vectors["audio"][both], dim=-1)
    v = F.normalize(vectors["visual"][both], dim=-1)
    logits = (a @ v.T) / 0.5
    want = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2)))
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    # a batch where no sample has both: zero, still attached to the graph
    none = {"audio": torch.tensor([True, False, True, False]), "visual": torch.tensor([False, True, False, True])}
    zero = term({m: x.requires_grad_() for m, x in vectors.items()}, none)
    assert zero.item() == 0.0 and zero.requires_grad


def test_reconstruction_and_distillation_skip_absent_samples():
    torch.manual_seed(0)
    vectors = {"audio": torch.randn(4, 3), "visual": torch.randn(4, 2)}
    inputs = {"audio": torch.randn(4, 5), "visual": torch.full((4, 6), float("nan"))}  # NaN: never a target
    inputs["visual"][PRESENT["visual"]] = torch.randn(3, 6)
    term = ReconstructionLoss({"audio": 3, "visual": 2}, {"audio": 5, "visual": 6}, hidden=0)
    total, per = term(vectors, inputs, PRESENT)
    for m in ("audio", "visual"):
        rows = PRESENT[m]
        err = (term.decoders[m](vectors[m][rows]) - inputs[m][rows]).pow(2).mean(1)
        assert per[m].item() == pytest.approx(float(err.sum() / 4), rel=1e-5)  # a batch mean, absent rows 0
    assert math.isfinite(total.item())

    teachers = {"audio": nn.Linear(5, 3), "visual": nn.Linear(6, 2)}
    umt = UMTLoss(teachers)
    _, per = umt(vectors, inputs, PRESENT)
    for m in ("audio", "visual"):
        rows = PRESENT[m]
        with torch.no_grad():
            err = (vectors[m][rows] - teachers[m](inputs[m][rows])).pow(2).mean(1)
        assert per[m].item() == pytest.approx(float(err.sum() / 4), rel=1e-5)


def test_gradient_blending_branch_losses_count_present_samples():
    from lightning_balance.callbacks.gblend import _head_loss

    torch.manual_seed(0)
    model = TinyAV()
    ds = DictDataset(n=4)
    batch = {"audio": ds.a, "visual": ds.v, "target": ds.y, "present": PRESENT}
    loss, count = _head_loss(model, batch, "audio", -100)
    feats = model.forward_features(batch)
    rows = PRESENT["audio"]
    logits = feats["audio"][rows] @ model.head.weight[:, :8].T + model.head.bias / 2
    assert count.item() == 3
    assert loss.item() == pytest.approx(F.cross_entropy(logits, ds.y[rows], reduction="sum").item(), rel=1e-5)
    loss, count = _head_loss(model, batch, "fused", -100)
    za = feats["audio"] * PRESENT["audio"][:, None]
    zv = feats["visual"] * PRESENT["visual"][:, None]
    fused = torch.cat([za, zv], 1) @ model.head.weight.T + model.head.bias
    assert count.item() == 4
    assert loss.item() == pytest.approx(F.cross_entropy(fused, ds.y, reduction="sum").item(), rel=1e-5)


def test_the_monitor_counts_a_modality_where_it_is_present(tmp_path):
    ds = DictDataset(n=48, missing=(0.3, 0.3), seed=2)
    model = TinyAV(seed=1)
    monitor = ModalityMonitor()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[monitor], max_epochs=1, limit_train_batches=0)).validate(
        model, DataLoader(ds, batch_size=16), verbose=False)
    row = monitor.history[-1] if monitor.history else None
    assert row is not None
    with torch.no_grad():
        feats = model.forward_features({"audio": ds.a, "visual": ds.v})
        za = feats["audio"] * ds.present[:, :1]
        zv = feats["visual"] * ds.present[:, 1:]
        w, b = model.head.weight, model.head.bias
        fused = (torch.cat([za, zv], 1) @ w.T + b).argmax(1)
        uni = {"audio": za @ w[:, :8].T + b / 2, "visual": zv @ w[:, 8:].T + b / 2}
        without_audio = (torch.cat([torch.zeros_like(za), zv], 1) @ w.T + b).argmax(1)
    y = ds.y
    assert row["val_acc_fused"] == pytest.approx(float((fused == y).float().mean()), abs=1e-6)
    for i, m in enumerate(("audio", "visual")):
        rows = ds.present[:, i]
        want = float((uni[m].argmax(1)[rows] == y[rows]).float().mean())
        assert row[f"val_acc/{m}"] == pytest.approx(want, abs=1e-6)
    assert row["val_acc_without/audio"] == pytest.approx(float((without_audio == y).float().mean()), abs=1e-6)
    # the score ratio: present-only sums on the footing of the 48 samples
    s = [float(torch.softmax(uni[m], 1)[ds.present[:, i]].gather(1, y[ds.present[:, i]][:, None]).sum())
         * 48 / int(ds.present[:, i].sum()) for i, m in enumerate(("audio", "visual"))]
    assert row["val_score_ratio/audio"] == pytest.approx(s[0] / s[1], rel=1e-5)


def test_the_diagnosis_is_of_complete_samples_and_says_so(tmp_path):
    ds = DictDataset(n=64, missing=(0.3, 0.3), seed=2)
    complete = ds.present.all(1)
    diag = ModalityDiagnostics(verbose=False, probe=False, vif=False, bootstrap=50)
    with pytest.warns(UserWarning, match="collapse diagnosis .* are of the complete samples only"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=1)).validate(
            TinyAV(seed=1), DataLoader(ds, batch_size=16), verbose=False)
    assert diag.diagnostics_history[-1]["samples"] == int(complete.sum())


def test_the_missing_rate_sweep_against_masks_drawn_from_the_sample_positions(tmp_path):
    from lightning_balance.functional import position_uniform

    ds = DictDataset(n=48, seed=3)
    model = TinyAV(seed=1)
    rates = (0.0, 0.25, 0.5)
    diag = ModalityDiagnostics(verbose=False, probe=False, vif=False, bootstrap=0, robustness_rates=rates, plot=True,
                               plot_dir=str(tmp_path / "plots"))
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=1)).validate(
        model, DataLoader(ds, batch_size=16), verbose=False)
    values = diag.diagnostics_history[-1]
    with torch.no_grad():
        za = model.audio_encoder(ds.a)
        zv = model.visual_encoder(ds.v)
        w, b = model.head.weight, model.head.bias
    pos = torch.arange(48)
    ua, uv = position_uniform(pos, 1, 0), position_uniform(pos, 2, 0)  # the documented draws, seed 0
    for rate in rates:
        for which, keep_a, keep_v in (("audio", ua >= rate, torch.ones(48, dtype=torch.bool)),
                                      ("visual", torch.ones(48, dtype=torch.bool), uv >= rate)):
            pred = (torch.cat([za * keep_a[:, None], zv * keep_v[:, None]], 1) @ w.T + b).argmax(1)
            assert values[f"robust/{which}/{rate:g}"] == pytest.approx(float((pred == ds.y).float().mean()), abs=1e-6)
        keep_a, keep_v = ua >= rate, uv >= rate
        lost = ~(keep_a | keep_v)
        keep_a, keep_v = keep_a | (lost & (ua >= uv)), keep_v | (lost & (uv > ua))
        pred = (torch.cat([za * keep_a[:, None], zv * keep_v[:, None]], 1) @ w.T + b).argmax(1)
        assert values[f"robust/all/{rate:g}"] == pytest.approx(float((pred == ds.y).float().mean()), abs=1e-6)
    curve = [values[f"robust/audio/{r:g}"] for r in rates]
    assert values["robust_auc/audio"] == pytest.approx((0.25 * (curve[0] + curve[1]) / 2 + 0.25 * (curve[1] + curve[2]) / 2) / 0.5)
    assert values["robust/audio/0"] == pytest.approx(values["acc_fused"])
    assert "every modality missing independently" in diag.report()
    assert (tmp_path / "plots" / "robustness.png").exists()
    with pytest.raises(ValueError, match="robustness_rates must be increasing"):
        ModalityDiagnostics(robustness_rates=(0.5, 0.1))


def test_the_feature_noise_sweep_against_noise_drawn_from_the_sample_positions(tmp_path):
    from lightning_balance.functional import position_uniform

    ds = DictDataset(n=48, seed=3)
    model = TinyAV(seed=1)
    rates = (0.0, 0.5, 2.0)
    diag = ModalityDiagnostics(verbose=False, probe=False, vif=False, bootstrap=0, noise_rates=rates, plot=True,
                               plot_dir=str(tmp_path / "plots"), seed=5)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=1)).validate(
        model, DataLoader(ds, batch_size=16), verbose=False)
    values = diag.diagnostics_history[-1]
    with torch.no_grad():
        z = {"audio": model.audio_encoder(ds.a), "visual": model.visual_encoder(ds.v)}
        w, b = model.head.weight, model.head.bias
    # element k of sample i: uniform of (i * 8 + k) on stream 1000 + modality index; std = rate × RMS of z_i
    index = (torch.arange(48)[:, None] * 8 + torch.arange(8)).reshape(-1)
    curves = {}
    for i, m in enumerate(("audio", "visual")):
        u = position_uniform(index, 1000 + i, 5).reshape(48, 8).float()
        rms = z[m].pow(2).mean(1, keepdim=True).sqrt()
        curves[m] = []
        for rate in rates:
            noisy = {**z, m: z[m] + 3**0.5 * rate * rms * (2 * u - 1)}
            assert (noisy[m] - z[m]).std() == pytest.approx(rate * float(rms.pow(2).mean().sqrt()), rel=0.2)
            pred = (torch.cat([noisy["audio"], noisy["visual"]], 1) @ w.T + b).argmax(1)
            curves[m].append(float((pred == ds.y).float().mean()))
            assert values[f"robust_noise/{m}/{rate:g}"] == pytest.approx(curves[m][-1], abs=1e-6), (m, rate)
        assert values[f"robust_noise_auc/{m}"] == pytest.approx(
            (0.5 * (curves[m][0] + curves[m][1]) / 2 + 1.5 * (curves[m][1] + curves[m][2]) / 2) / 2.0)
    assert values["robust_noise/audio/0"] == pytest.approx(values["acc_fused"])
    assert curves["audio"][-1] < curves["audio"][0]  # the noise hurts the strong modality's samples
    assert "noise on audio" in diag.report() and (tmp_path / "plots" / "robustness.png").exists()
    with pytest.raises(ValueError, match="noise_rates must be increasing"):
        ModalityDiagnostics(noise_rates=(0.5, 0.1))


def test_a_validation_set_without_a_complete_sample_says_so(tmp_path):
    ds = DictDataset(n=32, seed=3, missing=(0.5, 0.5))
    ds.present[:, 0] = torch.arange(32) % 2 == 0  # every sample lacks exactly one modality
    ds.present[:, 1] = ~ds.present[:, 0]
    diag = ModalityDiagnostics(verbose=False, probe=False, vif=False, bootstrap=0, robustness_rates=(0.0, 0.5))
    with pytest.warns(UserWarning, match="no validation sample has every modality"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=1)).validate(
            TinyAV(seed=1), DataLoader(ds, batch_size=16), verbose=False)
    assert diag.diagnostics_history == []
    with pytest.raises(ValueError, match="robustness_rates must be a sequence"):
        ModalityDiagnostics(robustness_rates=0.3)
