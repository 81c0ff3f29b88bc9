"""ModalityMonitor: values, keys through any logger (CSV, W&B offline), and errors."""

import csv
import glob
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from lightning_balance import OGMGE, ModalityContractError, ModalityMonitor
from tests.helpers import TinyAV, loader, trainer_kwargs

EXPECTED = {
    "balance/monitor/val_acc_fused",
    "balance/monitor/val_acc/audio",
    "balance/monitor/val_acc/visual",
    "balance/monitor/val_acc_without/audio",
    "balance/monitor/val_acc_without/visual",
    "balance/monitor/val_score_ratio/audio",
    "balance/monitor/val_score_ratio/visual",
    "balance/ogm/coeff/audio",
    "balance/ogm/ratio/visual",
    "balance/ogm/confidence/audio",
}


def fit(tmp_path, logger=False, model=None, monitor=None):
    monitor = monitor or ModalityMonitor()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params="weights", seed=0), monitor],
                                          logger=logger, log_every_n_steps=1))
    model = model or TinyAV()
    trainer.fit(model, loader(), loader(n=32, seed=1))
    return model, monitor, trainer


def test_values_match_a_direct_computation(tmp_path):
    model, monitor, _ = fit(tmp_path)
    assert len(monitor.history) == 2 and monitor.history[-1]["epoch"] == 1.0
    ds = loader(n=32, seed=1).dataset
    with torch.no_grad():  # written out for TinyAV's concat head: split logits W_m z_m + b/2, audio first
        za, zv = model.audio_encoder(ds.a), model.visual_encoder(ds.v)
        w, b = model.head.weight, model.head.bias
        uni = {"audio": za @ w[:, :8].T + b / 2, "visual": zv @ w[:, 8:].T + b / 2}
        fused = torch.cat([za, zv], 1) @ w.T + b
        without_audio = torch.cat([torch.zeros_like(za), zv], 1) @ w.T + b
        s = {m: F.softmax(uni[m], -1).gather(1, ds.y[:, None]).sum() for m in uni}
    last = monitor.history[-1]

    def acc(logits):
        return (logits.argmax(-1) == ds.y).float().mean().item()

    assert last["val_acc/audio"] == pytest.approx(acc(uni["audio"]))
    assert last["val_acc/visual"] == pytest.approx(acc(uni["visual"]))
    assert last["val_acc_fused"] == pytest.approx(acc(fused))
    assert last["val_acc_without/audio"] == pytest.approx(acc(without_audio))
    assert last["val_score_ratio/audio"] == pytest.approx((s["audio"] / s["visual"]).item(), rel=1e-5)


def test_keys_reach_the_csv_logger(tmp_path):
    fit(tmp_path, logger=CSVLogger(str(tmp_path), name="csv"))
    (path,) = glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        columns = set(next(csv.reader(f)))
    assert EXPECTED <= columns


def test_keys_reach_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning_balance_test")
    try:
        fit(tmp_path, logger=logger)
        summary_keys = set(dict(logger.experiment.summary).keys())
    finally:
        wandb.finish()
    assert EXPECTED <= summary_keys
    assert glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*"))


def test_test_stage_and_missing_record(tmp_path):
    model, monitor, trainer = fit(tmp_path)
    trainer.test(model, loader(n=32, seed=2))
    assert set(monitor.test_results) >= {"test_acc_fused", "test_acc/audio", "test_acc_without/visual"}

    class NoFuse(TinyAV):
        def validation_step(self, batch, batch_idx):
            feats = self.forward_features(batch)
            self.head(torch.cat([feats["audio"], feats["visual"]], -1))

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityMonitor()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="validation_step` must obtain its logits with `self.fuse"):
        trainer.fit(NoFuse(), loader(), loader(n=32, seed=1))


def test_log_metrics_false_logs_nothing(tmp_path):
    # Lightning assigns `callback.log = pl_module.log` to every callback: the switch must not be `log`
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params="weights", log_metrics=False)], max_epochs=1))
    trainer.fit(TinyAV(), loader())
    assert not [k for k in trainer.callback_metrics if k.startswith("balance/")]


def test_step_metrics_are_logged_on_the_logger_steps(tmp_path):
    class LogsLoss(TinyAV):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params="weights", seed=0)], logger=logger,
                                          log_every_n_steps=3, max_epochs=3))
    trainer.fit(LogsLoss(), loader())
    (path,) = glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "5", "8", "11"]
    assert all(r["train_loss"] and r["balance/ogm/coeff/audio"] for r in rows)


def partly_labelled(n=32, seed=1):
    ds = loader(n=n, seed=seed).dataset
    ds.y[1::5] = -100  # samples 1, 6, 11, ... have no label
    return ds


def test_unlabelled_samples_count_nowhere(tmp_path):
    monitor = ModalityMonitor()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[monitor], max_epochs=1))
    model = TinyAV()
    trainer.fit(model, loader(), torch.utils.data.DataLoader(partly_labelled(), batch_size=8))
    ds = partly_labelled()
    keep = ds.y != -100
    y = ds.y[keep]
    with torch.no_grad():
        za, zv = model.audio_encoder(ds.a[keep]), model.visual_encoder(ds.v[keep])
        w, b = model.head.weight, model.head.bias
        uni = {"audio": za @ w[:, :8].T + b / 2, "visual": zv @ w[:, 8:].T + b / 2}  # the split head by hand
        fused = model.head(torch.cat([za, zv], 1))
        without_visual = model.head(torch.cat([za, torch.zeros_like(zv)], 1))
        s = {m: F.softmax(o, -1)[torch.arange(len(y)), y].sum() for m, o in uni.items()}
    (row,) = monitor.history

    def acc(logits):
        return (logits.argmax(-1) == y).float().mean().item()

    assert row["val_acc_fused"] == pytest.approx(acc(fused))
    assert row["val_acc/visual"] == pytest.approx(acc(uni["visual"]))
    assert row["val_acc_without/visual"] == pytest.approx(acc(without_visual))
    assert row["val_score_ratio/visual"] == pytest.approx((s["visual"] / s["audio"]).item(), rel=1e-5)


def test_non_finite_values_warn_once_per_epoch(tmp_path):
    class NaNVisual(TinyAV):
        def validation_step(self, batch, batch_idx):
            feats = self.forward_features(batch)
            feats["visual"] = feats["visual"].clone()
            feats["visual"][:2] = float("nan")  # every batch: 2 samples
            self.fuse(feats, batch["target"])

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ModalityMonitor()], max_epochs=2))
    with pytest.warns(UserWarning) as caught:
        trainer.fit(NaNVisual(), loader(), loader(n=32, seed=1))  # 2 validation batches per epoch
    found = [str(w.message) for w in caught if "ModalityMonitor: non-finite values" in str(w.message)]
    assert len(found) == 2, found
    assert found[0].startswith("ModalityMonitor: non-finite values (NaN/inf) in validation epoch 0: the logits of 4 "
                               "samples, the features of 'visual' of 4 samples.")
    assert "validation epoch 1:" in found[1]
