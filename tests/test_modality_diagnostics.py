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


def validate(tmp_path, n, devices=1, batch_size=8, missing=None, **diag_kwargs):
    out = tmp_path / f"dev{devices}"
    out.mkdir()
    diag = ModalityDiagnostics(plot=False, verbose=False, **diag_kwargs)
    kwargs = trainer_kwargs(out, callbacks=[diag, DumpDiagnostics(str(out))], devices=devices)
    if devices > 1:
        kwargs["strategy"] = "ddp_spawn"
    trainer = pl.Trainer(**kwargs)
    data = DataLoader(DictDataset(n=n, seed=1, missing=missing), batch_size=batch_size)  # DDP: DistributedSampler
    trainer.validate(model(), data, verbose=False)
    with open(out / "rank0.json") as f:
        return json.load(f), out


class PartlyLabelled(DictDataset):
    """DictDataset whose samples 2, 9, 16, ... have the target ignore_index (-100)."""

    def __init__(self, n: int = 40, seed: int = 1) -> None:
        super().__init__(n=n, seed=seed)
        self.y[2::7] = -100


def test_values_match_an_independent_computation(tmp_path):
    sklearn = pytest.importorskip("sklearn.linear_model", reason="scikit-learn (dev extra) gives the probe's reference")
    diag = ModalityDiagnostics(plot=False, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag]))
    trainer.validate(model(), DataLoader(PartlyLabelled(), batch_size=8), verbose=False)
    (row,), (monitor,) = diag.diagnostics_history, diag.history
    # the reference, with the model's modules called directly, on the labelled samples only
    ds, net = PartlyLabelled(), model().eval()
    keep = ds.y != -100
    y, n = ds.y[keep], int(keep.sum())
    with torch.no_grad():
        za, zv = net.audio_encoder(ds.a[keep]), net.visual_encoder(ds.v[keep])
        w, b = net.head.weight, net.head.bias

        def correct(pa, pv):  # the head on the concatenation, absent modalities zeroed
            return (net.head(torch.cat([za * pa, zv * pv], 1)).argmax(-1) == y).double()

        c = {"": correct(0, 0), "a": correct(1, 0), "v": correct(0, 1), "av": correct(1, 1)}
        uni_a = ((za @ w[:, :8].T + b / 2).argmax(-1) == y).double()  # the split head: W_a z_a + b / M
        uni_v = ((zv @ w[:, 8:].T + b / 2).argmax(-1) == y).double()
    acc = {k: float(v.mean()) for k, v in c.items()}
    x_audio = (c["a"] - c[""] + c["av"] - c["v"]) / 2  # per-sample Shapley terms of two players
    x_visual = (c["v"] - c[""] + c["av"] - c["a"]) / 2
    assert row["samples"] == n == 34
    expected = {"acc_fused": acc["av"], "acc_without/audio": acc["v"], "acc_without/visual": acc["a"],
                "acc/audio": float(uni_a.mean()), "acc/visual": float(uni_v.mean()),
                "contribution/audio": float(x_audio.mean()), "contribution/visual": float(x_visual.mean())}
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-12), key
    assert monitor["val_acc_fused"] == pytest.approx(acc["av"], abs=1e-6)
    assert monitor["val_acc/audio"] == pytest.approx(float(uni_a.mean()), abs=1e-6)
    # bootstrap standard errors vs their analytic values (a mean of n outcomes: std / sqrt(n)); B = 1000 replicates
    # estimate an SE to ~2%, so 10% is a safe margin
    assert row["acc_fused_se"] == pytest.approx(float(c["av"].std(unbiased=False)) / n**0.5, rel=0.1)
    assert row["contribution_se/audio"] == pytest.approx(float(x_audio.std(unbiased=False)) / n**0.5, rel=0.1)
    assert row["contribution_se/visual"] == pytest.approx(float(x_visual.std(unbiased=False)) / n**0.5, rel=0.1)
    # geometry by the formulas, with torch's own rank
    vectors = {"audio": za.double(), "visual": zv.double()}
    vectors["fused"] = torch.cat([za, zv], 1).double()
    for key, z in vectors.items():
        zc = z - z.mean(0)
        s = torch.linalg.svdvals(zc)
        p = s / s.sum()
        assert row[f"erank/{key}"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6), key
        assert row[f"nrank/{key}"] == int(torch.linalg.matrix_rank(zc)), key
        vif = []
        for j in range(z.shape[1]):  # 1 / (1 - R^2) of a least-squares fit on the other features
            others = torch.cat([torch.ones(n, 1, dtype=z.dtype), z[:, [k for k in range(z.shape[1]) if k != j]]], 1)
            residual = z[:, j] - others @ torch.linalg.lstsq(others, z[:, j:j + 1]).solution[:, 0]
            vif.append(float(zc[:, j].square().sum() / residual.square().sum()))
        # the library adds a ridge r = 1e-6 to the correlation matrix: it lowers a factor by a relative
        # r / lambda_min at most, and lambda_min >= 1 / (d * max VIF)
        assert row[f"vif_max/{key}"] == pytest.approx(max(vif), rel=1e-6 * z.shape[1] * max(vif) + 1e-6), key
        if key != "fused":
            fc = vectors["fused"] - vectors["fused"].mean(0)
            cka = (zc.T @ fc).square().sum() / ((fc.T @ fc).norm() * (zc.T @ zc).norm())
            assert row[f"cka/{key}"] == pytest.approx(float(cka), rel=1e-6), key
    # probe: scikit-learn's logistic regression with the same objective (mean cross-entropy + 1e-4 ||W||^2 on
    # features standardised by the training fold: C = 1 / (2 n_train 1e-4)), 2 folds by sample index; both
    # solvers converge to the same optimum, so at most one of the 34 held-out predictions may differ (a near-tie)
    for m, z in (("audio", za), ("visual", zv)):
        hits = 0
        for fold in range(2):
            train, test = torch.arange(n) % 2 != fold, torch.arange(n) % 2 == fold
            mu, sd = z[train].double().mean(0), z[train].double().std(0)
            clf = sklearn.LogisticRegression(C=1 / (2 * int(train.sum()) * 1e-4), max_iter=10000, tol=1e-12)
            clf.fit(((z[train].double() - mu) / sd).numpy(), y[train].numpy())
            hits += int((torch.from_numpy(clf.predict(((z[test].double() - mu) / sd).numpy())) == y[test]).sum())
        assert row[f"probe/{m}"] == pytest.approx(hits / n, abs=1 / n + 1e-9), m
        p = row[f"probe/{m}"]
        assert row[f"probe_se/{m}"] == pytest.approx((p * (1 - p) / n) ** 0.5, rel=1e-9), m


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,missing", [(40, None), (37, None), (40, (0.3, 0.3))])
def test_ddp_gives_the_numbers_of_one_process(tmp_path, n, missing):
    """37: DistributedSampler pads rank 1 with a repeated sample; (0.3, 0.3): absent modalities in validation
    (the monitor counts a modality where present, the diagnosis and the sweeps use the complete samples)."""
    # the masks and the noise follow the sample positions: DDP equals one process
    sweep = dict(robustness_rates=(0.0, 0.3), noise_rates=(0.0, 0.5), missing=missing)
    single, _ = validate(tmp_path, n=n, devices=1, **sweep)
    ddp, out = validate(tmp_path, n=n, devices=2, batch_size=4, **sweep)
    with open(out / "rank1.json") as f:
        rank1 = json.load(f)
    (s,), (d,), (d1,) = single["diag"], ddp["diag"], rank1["diag"]
    same = [k for k in d if not k.startswith("seconds/")]  # NaN (VIF of fewer samples than features) is NaN on both
    assert all(d[k] == d1[k] or (math.isnan(d[k]) and math.isnan(d1[k])) for k in same), "ranks disagree"
    complete = n if missing is None else int(DictDataset(n=n, seed=1, missing=missing).present.all(1).sum())
    assert complete < n or missing is None
    assert d["samples"] == complete and "robust_auc/all" in d and "robust_noise_auc/audio" in d
    for key, value in s.items():
        if not key.startswith("seconds/"):
            # the semantic loss is an L-BFGS optimum's cross-entropy on ~20 complete samples: the float32 rows
            # summed in another order move it by ~1e-5
            rel = 1e-4 if key.startswith("semantic_") else 1e-5
            assert d[key] == pytest.approx(value, rel=rel, abs=1e-6, nan_ok=True), key
    # the monitor's accuracies too: DistributedSampler's padding duplicates (n = 37) are not counted
    (sm,), (dm,) = single["monitor"], ddp["monitor"]
    assert sm.keys() == dm.keys()
    for key, value in sm.items():
        assert dm[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


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


def test_semantic_loss_is_the_out_of_fold_probe_cross_entropy():
    """The collapse paper's Fig. 4 quantity: restated here with its own two-fold loop, a probe per fold and the
    cross-entropy written out (log-sum-exp minus the target's logit)."""
    from lightning_balance.functional import fit_linear_probe

    g = torch.Generator().manual_seed(3)
    n, classes = 120, 3
    y = torch.randint(0, classes, (n,), generator=g)
    informative = torch.nn.functional.one_hot(y, classes).float() * 2 + torch.randn(n, classes, generator=g)
    noise = torch.randn(n, 4, generator=g)
    feats = {"a": informative, "b": noise}

    def fuse_subset(f, present):
        return sum((f[m][:, :classes] if m in present else torch.zeros(n, classes)) for m in ("a", "b"))

    values = collapse_diagnostics(feats, y, fuse_subset, classes, bootstrap=0)
    for m, z in feats.items():
        losses = torch.zeros(n, dtype=torch.float64)
        fold = torch.arange(n) % 2
        for f in (0, 1):
            w, b, mu, sd = fit_linear_probe(z[fold != f], y[fold != f], classes, weight_decay=1e-2)
            logits = ((z[fold == f].double() - mu) / sd) @ w.T + b
            losses[fold == f] = torch.logsumexp(logits, 1) - logits.gather(1, y[fold == f, None]).squeeze(1)
        assert values[f"semantic_loss/{m}"] == pytest.approx(float(losses.mean()), rel=1e-9)
        assert values[f"semantic_loss_se/{m}"] == pytest.approx(float(losses.std() / math.sqrt(n)), rel=1e-9)
    assert values["semantic_loss/a"] < 0.6 < math.log(classes) < values["semantic_loss/b"]


def test_semantic_loss_counts_the_views_of_one_sample_once():
    """Every sample twice (two identical views, grouped by sample id): the same loss and standard error as the
    samples once, not an SE too small by sqrt(2) as if the 2N rows were independent."""
    g = torch.Generator().manual_seed(4)
    n, classes = 160, 3
    y = torch.randint(0, classes, (n,), generator=g)
    feats = {"a": torch.nn.functional.one_hot(y, classes).float() + torch.randn(n, classes, generator=g),
             "b": torch.randn(n, 4, generator=g)}

    def fuse_subset(f, present):
        return sum((f[m][:, :classes] if m in present else torch.zeros(len(f[m]), classes)) for m in ("a", "b"))

    once = collapse_diagnostics(feats, y, fuse_subset, classes, bootstrap=0, vif=False)
    twice_feats = {m: z.repeat_interleave(2, 0) for m, z in feats.items()}
    ids = torch.arange(n).repeat_interleave(2)
    grouped = collapse_diagnostics(twice_feats, y.repeat_interleave(2), fuse_subset, classes, bootstrap=0, vif=False,
                                   groups=ids)
    naive = collapse_diagnostics(twice_feats, y.repeat_interleave(2), fuse_subset, classes, bootstrap=0, vif=False)
    for m in feats:  # the duplicated rows move the standardisation's n - 1 only: equal to 1e-2
        assert grouped[f"semantic_loss/{m}"] == pytest.approx(once[f"semantic_loss/{m}"], rel=1e-2)
        assert grouped[f"semantic_loss_se/{m}"] == pytest.approx(once[f"semantic_loss_se/{m}"], rel=2e-2)
        assert naive[f"semantic_loss_se/{m}"] < 0.8 * grouped[f"semantic_loss_se/{m}"]


def test_semantic_verdict_needs_the_difference_above_its_tolerance():
    from lightning_balance.functional import imbalance_verdict

    values = {"acc_fused": 0.9, "contribution/a": 0.2, "contribution/v": 0.7, "acc_without/a": 0.7,
              "acc_without/v": 0.2, "probe/a": 0.45, "probe/v": 0.88, "semantic_loss/a": 1.13,
              "semantic_loss_se/a": 0.001, "semantic_loss/v": 0.40, "semantic_loss_se/v": 0.01}
    reference = {"a": (1.1, 0.001), "v": (0.9, 0.01)}
    text = "\n".join(imbalance_verdict(values, ["a", "v"], alone_semantic_loss=reference))
    # a: 0.03 nats higher, its interval far from 0, but under the 0.05 default
    assert "(0.030 ± 0.003: no clear difference (within the tolerance 0.05 nats))" in text
    assert "(-0.500 ± 0.028: lower than with its own loss)" in text
    strict = "\n".join(imbalance_verdict(values, ["a", "v"], alone_semantic_loss=reference, semantic_tolerance=0.01))
    assert "(0.030 ± 0.003: higher than with its own loss" in strict
    noisy = dict(values, **{"semantic_loss_se/a": 0.2})
    assert "no clear difference (its 95% interval includes 0)" in "\n".join(
        imbalance_verdict(noisy, ["a", "v"], alone_semantic_loss=reference))
    lower = dict(values, **{"semantic_loss/v": 0.87})  # 0.03 nats lower, clearly, but within the tolerance
    assert "(-0.030 ± 0.028: no clear difference (within the tolerance 0.05 nats))" in "\n".join(
        imbalance_verdict(lower, ["a", "v"], alone_semantic_loss=reference))
    # the callback passes its own tolerance to the verdict
    report = ModalityDiagnostics(semantic_tolerance=0.01, alone_semantic_loss={"a": [1.1, 0.001]}).format_report(
        dict(values, samples=100, **{"seconds/total": 0.1}), ["a", "v"], 3)
    assert "(0.030 ± 0.003: higher than with its own loss" in report
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="semantic_tolerance"):
            ModalityDiagnostics(semantic_tolerance=bad)


def test_verdict_compares_the_semantic_loss_with_the_unimodal_baseline():
    from lightning_balance.functional import imbalance_verdict

    values = {"acc_fused": 0.9, "contribution/a": 0.2, "contribution/v": 0.7, "acc_without/a": 0.7,
              "acc_without/v": 0.2, "probe/a": 0.45, "probe/v": 0.88, "semantic_loss/a": 1.6,
              "semantic_loss_se/a": 0.05, "semantic_loss/v": 0.40, "semantic_loss_se/v": 0.05}
    text = "\n".join(imbalance_verdict(values, ["a", "v"], alone_semantic_loss={"a": (1.1, 0.05), "v": 0.42}))
    assert "a encoder: semantic loss by linear evaluation (the probe's cross-entropy) 1.600 ± 0.098 vs 1.100 ± 0.098" in text
    assert "0.500 ± 0.139: higher than with its own loss" in text
    assert "v encoder: semantic loss by linear evaluation (the probe's cross-entropy) 0.400 ± 0.098 vs 0.420" in text
    assert "no clear difference" in text


def test_logged_keys_report_plot_and_every_n_epochs(tmp_path):
    diag = ModalityDiagnostics(every_n_epochs=2, alone_probe={"audio": 0.9}, plot=True, verbose=True,
                               alone_semantic_loss={"visual": [0.5, 0.01]})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=3,
                                          logger=CSVLogger(str(tmp_path)), log_every_n_steps=1))
    trainer.fit(model(), DataLoader(DictDataset(n=32), batch_size=8), DataLoader(DictDataset(n=32, seed=1), batch_size=8))
    assert [row["epoch"] for row in diag.diagnostics_history] == [1.0, 2.0]  # every 2nd epoch, and the last
    assert len(diag.history) == 3
    (path,) = glob.glob(f"{tmp_path}/lightning_logs/*/metrics.csv")
    with open(path) as f:
        header = next(csv.reader(f))
    for key in ("contribution/audio", "probe/visual", "erank/fused", "cka/audio", "vif_max/visual",
                "under_learned/audio", "seconds/probe", "contribution_imbalance", "contribution_se/audio",
                "probe_se/visual", "acc_fused_se", "acc_without_se/audio", "drop_se/visual", "contribution_lead_se",
                "under_learned_se/audio", "semantic_loss/audio", "semantic_loss_se/visual", "semantic_gap/visual",
                "semantic_gap_se/visual"):
        assert f"balance/diagnostics/{key}" in header, key
    assert os.path.exists(diag.plot_path) and os.path.getsize(diag.plot_path) > 1000
    import matplotlib.pyplot as plt

    height, width = plt.imread(diag.plot_path).shape[:2]
    assert width / height > 3.6  # three panels (16.5 x 3.8 in), the semantic loss's too; two would be 11 x 3.8
    report = diag.report()
    assert "audio encoder: linear probe" in report and "trained alone" in report and "| fused" in report
    assert "visual encoder: semantic loss by linear evaluation" in report and "with its own loss" in report
    last = diag.diagnostics_history[-1]
    assert last["semantic_gap/visual"] == pytest.approx(last["semantic_loss/visual"] - 0.5)
    assert "±" in report and "1.96 standard errors" in report  # the table shows the intervals
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
    ({"alone_probe": {"audio": [0.6, 0.01, 0.2]}}, "alone_probe"),
    ({"bootstrap": 1}, "bootstrap"),
    ({"seed": 0.5}, "seed"),
    ({"alone_semantic_loss": {"audio": -0.1}}, "alone_semantic_loss"),
    ({"alone_semantic_loss": {"audio": [1.2, -0.1]}}, "alone_semantic_loss"),
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


def test_alone_probe_takes_a_standard_error():
    diag = ModalityDiagnostics(alone_probe={"audio": [0.62, 0.02], "visual": 0.9})
    assert diag.alone_probe == {"audio": (0.62, 0.02), "visual": 0.9}


class NaNFeatures(TinyAV):
    """Validation features of 'audio' are NaN for the first sample of every batch."""

    def validation_step(self, batch, batch_idx):
        feats = self.forward_features(batch)
        feats["audio"] = feats["audio"].clone()
        feats["audio"][0] = math.nan
        self.fuse(feats, batch["target"])


def test_non_finite_features_warn_and_the_fit_goes_on(tmp_path):
    diag = ModalityDiagnostics(plot=False, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=2))
    with pytest.warns(UserWarning) as caught:
        trainer.fit(NaNFeatures(), DataLoader(DictDataset(n=32), batch_size=8),
                    DataLoader(DictDataset(n=32, seed=1), batch_size=8))
    assert trainer.state.finished and len(diag.diagnostics_history) == 2
    messages = [str(w.message) for w in caught]
    monitor = [m for m in messages if "ModalityDiagnostics: non-finite values" in m]
    assert len(monitor) == 2 and "the features of 'audio' of 4 samples" in monitor[0]  # once per epoch
    assert any("features of 'audio' are not finite (NaN/inf) in 4 of 32 samples" in m for m in messages)
    row = diag.diagnostics_history[-1]
    assert math.isnan(row["erank/audio"]) and math.isnan(row["probe/audio"]) and math.isnan(row["cka/visual"])
    assert math.isfinite(row["probe/visual"]) and math.isfinite(row["contribution/audio"])


def test_fewer_samples_than_the_probe_needs_warn_and_the_rest_is_measured(tmp_path):
    diag = ModalityDiagnostics(plot=False, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag]))
    with pytest.warns(UserWarning) as caught:
        trainer.validate(model(), DataLoader(DictDataset(n=3, seed=1), batch_size=8), verbose=False)
    messages = [str(w.message) for w in caught]
    assert any("need at least 4 labelled samples, got 3" in m for m in messages)
    (row,) = diag.diagnostics_history
    assert row["samples"] == 3 and math.isnan(row["probe/audio"]) and math.isfinite(row["contribution/visual"])
    # 8 features from 3 samples: no VIF either, and a warning that says what to do
    assert math.isnan(row["vif_mean/audio"]) and any("variance_inflation('audio')" in m and "vif=False" in m
                                                      for m in messages)


class EmptyAndUnlabelledBatches(TinyAV):
    """Batch 1 reaches fuse with 0 samples; every target of batch 2 is ignore_index."""

    def validation_step(self, batch, batch_idx):
        feats, targets = self.forward_features(batch), batch["target"]
        if batch_idx == 1:
            feats, targets = {m: z[:0] for m, z in feats.items()}, targets[:0]
        if batch_idx == 2:
            targets = torch.full_like(targets, -100)
        self.fuse(feats, targets)


def test_empty_and_unlabelled_batches_are_skipped(tmp_path):
    diag = ModalityDiagnostics(plot=False, verbose=False, bootstrap=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag]))
    net = EmptyAndUnlabelledBatches(seed=0)
    trainer.validate(net, DataLoader(DictDataset(n=40, seed=1), batch_size=8), verbose=False)
    (row,), (monitor,) = diag.diagnostics_history, diag.history
    ds = DictDataset(n=40, seed=1)
    kept = torch.cat([torch.arange(0, 8), torch.arange(24, 40)])  # batches 0, 3 and 4
    with torch.no_grad():
        za, zv = net.audio_encoder(ds.a[kept]), net.visual_encoder(ds.v[kept])
        fused = (net.head(torch.cat([za, zv], 1)).argmax(-1) == ds.y[kept]).double().mean()
        without = (net.head(torch.cat([za, zv * 0], 1)).argmax(-1) == ds.y[kept]).double().mean()
    assert row["samples"] == 24 and "acc_fused_se" not in row  # bootstrap=0: no standard errors
    assert row["acc_fused"] == pytest.approx(float(fused), abs=1e-12)
    assert monitor["val_acc_fused"] == pytest.approx(float(fused), abs=1e-6)
    assert monitor["val_acc_without/visual"] == pytest.approx(float(without), abs=1e-6)


def test_a_validation_set_without_labels_logs_nothing_and_warns(tmp_path):
    class Unlabelled(TinyAV):
        def validation_step(self, batch, batch_idx):
            self.fuse(self.forward_features(batch), torch.full_like(batch["target"], -100))

    diag = ModalityDiagnostics(plot=False, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag]))
    with pytest.warns(UserWarning, match="no labelled"):
        trainer.validate(Unlabelled(), DataLoader(DictDataset(n=16), batch_size=8), verbose=False)
    assert diag.history == [] and diag.diagnostics_history == []


@pytest.mark.timeout(180)
def test_ddp_fit_with_the_plot_on_does_not_hang(tmp_path):
    """The plot's folder comes from trainer.log_dir, a broadcast: every rank must ask for it, not only rank 0."""
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (dev extra)")
    out = tmp_path / "ddp"
    out.mkdir()
    diag = ModalityDiagnostics(verbose=False, plot=True)
    trainer = pl.Trainer(**trainer_kwargs(out, callbacks=[diag, DumpDiagnostics(str(out))], devices=2,
                                          strategy="ddp_spawn", max_epochs=2))
    trainer.fit(model(), DataLoader(DictDataset(n=32), batch_size=8), DataLoader(DictDataset(n=24, seed=1), batch_size=8))
    assert (out / "balance" / "diagnostics.png").exists()
    with open(out / "rank0.json") as f:
        assert len(json.load(f)["diag"]) == 2
