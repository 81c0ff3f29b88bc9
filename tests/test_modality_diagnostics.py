"""ModalityDiagnostics: values equal the functional core on the same samples, DDP equals one process,
the verdict reads the measurements, plots and logger keys, errors."""

import csv
import glob
import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_balance import ModalityDiagnostics
from lightning_balance.functional import collapse_diagnostics
from tests.helpers import DictDataset, SaveParams, TinyAV, trainer_kwargs


def model() -> TinyAV:
    torch.manual_seed(0)
    return TinyAV()


class DumpDiagnostics(SaveParams):
    """Writes each rank's diagnosis to ``rank<r>.json`` (and, as SaveParams, shuts the process group down on
    both ranks together)."""

    def on_validation_end(self, trainer, pl_module):
        diag = next(cb for cb in trainer.callbacks if isinstance(cb, ModalityDiagnostics))
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"diag": diag.diagnostics_history, "monitor": diag.history}, f)


def validate(tmp_path, n, devices=1, batch_size=8, **diag_kwargs):
    out = tmp_path / f"dev{devices}"
    out.mkdir()
    diag = ModalityDiagnostics(plot=False, verbose=False, **diag_kwargs)
    kwargs = trainer_kwargs(out, callbacks=[diag, DumpDiagnostics(str(out))], devices=devices)
    if devices > 1:
        kwargs["strategy"] = "ddp_spawn"
    trainer = pl.Trainer(**kwargs)
    data = DataLoader(DictDataset(n=n, seed=1), batch_size=batch_size)  # DDP: Lightning's DistributedSampler
    trainer.validate(model(), data, verbose=False)
    with open(out / "rank0.json") as f:
        return json.load(f), out


def test_values_equal_the_functional_core(tmp_path):
    result, _ = validate(tmp_path, n=40)
    (row,) = result["diag"]
    ds = DictDataset(n=40, seed=1)
    net = model().eval()
    with torch.no_grad():
        feats = net.forward_features({"audio": ds.a, "visual": ds.v})
        expected = collapse_diagnostics(feats, ds.y, net.fuse_subset, 4, unimodal_logits=net.compute_unimodal_logits(feats))
    for key, value in expected.items():
        if not key.startswith("seconds/"):
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert row["samples"] == 40
    # the Shapley values are efficient: they sum to v(all) - v(none)
    assert row["contribution/audio"] + row["contribution/visual"] <= row["acc_fused"] + 1e-9


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [40, 37])  # 37: DistributedSampler pads rank 1 with a repeated sample
def test_ddp_gives_the_numbers_of_one_process(tmp_path, n):
    single, _ = validate(tmp_path, n=n, devices=1)
    ddp, out = validate(tmp_path, n=n, devices=2, batch_size=4)
    with open(out / "rank1.json") as f:
        rank1 = json.load(f)
    (s,), (d,), (d1,) = single["diag"], ddp["diag"], rank1["diag"]
    assert d == d1 or all(d[k] == d1[k] for k in d if not k.startswith("seconds/")), "ranks disagree"
    assert d["samples"] == n
    for key, value in s.items():
        if not key.startswith("seconds/"):
            assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_pure_noise_modality_gets_no_contribution_and_a_chance_probe():
    g = torch.Generator().manual_seed(0)
    n, classes = 600, 4
    y = torch.randint(0, classes, (n,), generator=g)
    feats = {"signal": torch.nn.functional.one_hot(y, classes).float() + 0.3 * torch.randn(n, classes, generator=g),
             "noise": torch.randn(n, 6, generator=g)}
    weight = torch.cat([torch.eye(classes) * 4, torch.zeros(6, classes)])

    def fuse_subset(f, present):  # a head that learned to ignore the noise modality
        z = torch.cat([f[m] if m in present else torch.zeros_like(f[m]) for m in ("signal", "noise")], 1)
        return z @ weight

    values = collapse_diagnostics(feats, y, fuse_subset, classes)
    assert values["contribution/noise"] == pytest.approx(0.0, abs=1e-12)
    assert values["contribution/signal"] > 0.6
    assert values["probe/noise"] == pytest.approx(1 / classes, abs=0.06)
    assert values["probe/signal"] > 0.9
    assert math.isinf(values["contribution_ratio"]) and values["contribution_imbalance"] == pytest.approx(1.0)
    assert values["acc_without/noise"] == values["acc_fused"]


def test_verdict_names_the_dominant_ignored_and_under_learned_modality():
    from lightning_balance.functional import imbalance_verdict

    values = {"acc_fused": 0.9, "contribution/a": 0.0, "contribution/v": 0.7, "contribution_ratio": math.inf,
              "acc_without/a": 0.9, "acc_without/v": 0.2, "probe/a": 0.45, "probe/v": 0.88}
    lines = imbalance_verdict(values, ["a", "v"], alone_probe={"a": 0.62, "v": 0.89})
    text = "\n".join(lines)
    assert lines[0].startswith("v dominates") and "ratio unbounded" in lines[0]
    assert "a is IGNORED" in text
    assert "a encoder: linear probe 0.450 after joint training vs 0.620 trained alone -> UNDER-LEARNED" in text
    assert "v encoder: linear probe 0.880 after joint training vs 0.890 trained alone -> learned as well" in text


def test_logged_keys_report_plot_and_every_n_epochs(tmp_path):
    diag = ModalityDiagnostics(every_n_epochs=2, alone_probe={"audio": 0.9}, plot=True, verbose=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=3,
                                          logger=CSVLogger(str(tmp_path)), log_every_n_steps=1))
    trainer.fit(model(), DataLoader(DictDataset(n=32), batch_size=8), DataLoader(DictDataset(n=32, seed=1), batch_size=8))
    assert [row["epoch"] for row in diag.diagnostics_history] == [1.0, 2.0]  # every 2nd epoch, and the last
    assert len(diag.history) == 3
    (path,) = glob.glob(f"{tmp_path}/lightning_logs/*/metrics.csv")
    with open(path) as f:
        header = next(csv.reader(f))
    for key in ("contribution/audio", "probe/visual", "erank/fused", "cka/audio", "vif_max/visual",
                "under_learned/audio", "seconds/probe", "contribution_imbalance"):
        assert f"balance/diagnostics/{key}" in header, key
    assert os.path.exists(diag.plot_path) and os.path.getsize(diag.plot_path) > 1000
    report = diag.report()
    assert "audio encoder: linear probe" in report and "trained alone" in report and "| fused" in report
    state = diag.state_dict()
    fresh = ModalityDiagnostics()
    fresh.load_state_dict(state)
    assert fresh.diagnostics_history == diag.diagnostics_history
    trainer.test(trainer.lightning_module, DataLoader(DictDataset(n=32, seed=2), batch_size=8), verbose=False)
    assert diag.test_diagnostics is not None and diag.reports[-1][0] == "test"


def test_max_samples_keeps_the_first_samples(tmp_path):
    result, _ = validate(tmp_path, n=40, max_samples=24)
    assert result["diag"][0]["samples"] == 24


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"probe_folds": 1}, "probe_folds"),
    ({"max_samples": 2}, "max_samples"),
    ({"tolerance": 2}, "tolerance"),
    ({"sample_order": "random"}, "sample_order"),
    ({"alone_probe": {"audio": 62}}, "alone_probe"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModalityDiagnostics(**kwargs)


def test_unknown_reference_modality_is_named(tmp_path):
    diag = ModalityDiagnostics(alone_probe={"sound": 0.6}, plot=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag]))
    with pytest.raises(Exception, match="sound"):
        trainer.validate(model(), DataLoader(DictDataset(n=16), batch_size=8), verbose=False)
    with pytest.raises(RuntimeError, match="No diagnosis yet"):
        diag.report()


def test_plot_reaches_wandb_as_an_image(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logged = []
    original = WandbLogger.log_image

    def spy(self, key, images, step=None, **kwargs):
        logged.append((key, list(images)))
        return original(self, key, images, step=step, **kwargs)

    monkeypatch.setattr(WandbLogger, "log_image", spy)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning_balance_test")
    diag = ModalityDiagnostics(plot=True, verbose=False, plot_dir=str(tmp_path / "plots"))
    try:
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=1, logger=logger))
        trainer.fit(model(), DataLoader(DictDataset(n=32), batch_size=8),
                    DataLoader(DictDataset(n=32, seed=1), batch_size=8))
        summary_keys = set(dict(logger.experiment.summary).keys())
    finally:
        wandb.finish()
    assert logged == [("balance/diagnostics/plot", [str(tmp_path / "plots" / "diagnostics.png")])]
    assert "balance/diagnostics/contribution/audio" in summary_keys
