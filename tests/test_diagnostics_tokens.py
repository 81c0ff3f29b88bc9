"""ModalityMonitor and ModalityDiagnostics on a transformer fusion over token features (N, T, D), with unlabelled
samples and a validation_step that fuses two views, in one process (against a computation written out here)
and under DDP with a DistributedSampler that pads (37 samples on 2 ranks)."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_balance import ModalityDiagnostics, ModalityMonitor, MultimodalMixin
from tests.helpers import SaveParams, trainer_kwargs

CLASSES = 3
IGNORED = slice(3, None, 5)  # samples 3, 8, 13, ... are unlabelled (never sample 0, the padding duplicate)


class TokenDataset(Dataset):
    """Audio: 4 tokens of width 5, visual: 3 tokens of width 6; the class shifts every token's mean."""

    def __init__(self, n: int = 37, seed: int = 0) -> None:
        means = torch.Generator().manual_seed(99)
        mean_a, mean_v = torch.randn(CLASSES, 5, generator=means), torch.randn(CLASSES, 6, generator=means) * 0.5
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        self.a = mean_a[self.labels][:, None, :] + torch.randn(n, 4, 5, generator=g)
        self.v = mean_v[self.labels][:, None, :] + torch.randn(n, 3, 6, generator=g)
        self.y = self.labels.clone()
        self.y[IGNORED] = -100

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"audio": self.a[i], "visual": self.v[i], "target": self.y[i]}


class TokenFusion(nn.Module):
    """Concatenates the two modalities' tokens along T, one transformer layer, mean over tokens, linear."""

    def __init__(self, d: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(d, classes)

    def forward(self, za: torch.Tensor, zv: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(torch.cat([za, zv], dim=1)).mean(1))


class TokenAV(MultimodalMixin, pl.LightningModule):
    def __init__(self, views: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio_encoder = nn.Linear(5, 8)
        self.visual_encoder = nn.Linear(6, 8)
        self.fusion = TokenFusion()
        self.views = views
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)

    def view(self, batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        scale = 1.0 if k == 0 else 0.5  # the second view: the same sample at half the contrast
        return {"audio": self.audio_encoder(batch["audio"] * scale), "visual": self.visual_encoder(batch["visual"] * scale)}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        for k in range(self.views):  # two views of each sample, two fuse calls
            self.fuse(self.view(batch, k), batch["target"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Dump(SaveParams):
    def on_validation_end(self, trainer, pl_module):
        diag = next(cb for cb in trainer.callbacks if isinstance(cb, ModalityDiagnostics))
        plain = next(cb for cb in trainer.callbacks if type(cb) is ModalityMonitor)
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"diag": diag.diagnostics_history, "monitor": diag.history, "plain": plain.history}, f)


def validate(tmp_path, devices=1, batch_size=8, n=37):
    out = tmp_path / f"dev{devices}"
    out.mkdir()
    callbacks = [ModalityDiagnostics(plot=False, verbose=False, vif=False), ModalityMonitor(prefix="balance/plain"),
                 Dump(str(out))]
    kwargs = trainer_kwargs(out, callbacks=callbacks, devices=devices)
    if devices > 1:
        kwargs["strategy"] = "ddp_spawn"
    trainer = pl.Trainer(**kwargs)
    trainer.validate(TokenAV(), DataLoader(TokenDataset(n=n), batch_size=batch_size), verbose=False)
    with open(out / "rank0.json") as f:
        return json.load(f), out


def reference(n=37):
    """Every subset's per-row correctness, computed here with the model's own modules called directly."""
    ds, net = TokenDataset(n=n), TokenAV().eval()
    labelled = ds.y != -100
    rows, vectors = {}, {"audio": [], "visual": []}
    with torch.no_grad():
        for k in range(2):
            scale = 1.0 if k == 0 else 0.5
            za, zv = net.audio_encoder(ds.a * scale)[labelled], net.visual_encoder(ds.v * scale)[labelled]
            for name, (pa, pv) in {"": (0, 0), "a": (1, 0), "v": (0, 1), "av": (1, 1)}.items():
                pred = net.fusion(za * pa, zv * pv).argmax(-1)
                rows.setdefault(name, []).append((pred == ds.y[labelled]).double())
            vectors["audio"].append(za.mean(1))
            vectors["visual"].append(zv.mean(1))
    return ({k: torch.cat(v) for k, v in rows.items()}, {m: torch.cat(v) for m, v in vectors.items()},
            int(labelled.sum()))


def test_token_features_two_views_and_unlabelled_samples(tmp_path):
    result, _ = validate(tmp_path)
    (row,), (monitor,), (plain,) = result["diag"], result["monitor"], result["plain"]
    c, vectors, labelled = reference()
    acc = {k: float(v.mean()) for k, v in c.items()}
    # every fuse call (both views) of every labelled sample counts; unlabelled samples count nowhere
    assert row["samples"] == labelled == 37 - 7
    assert row["acc_fused"] == pytest.approx(acc["av"], abs=1e-12)
    assert monitor["val_acc_fused"] == plain["val_acc_fused"] == pytest.approx(acc["av"], abs=1e-6)
    assert plain["val_acc_without/audio"] == pytest.approx(acc["v"], abs=1e-6)
    assert row["acc_without/visual"] == pytest.approx(acc["a"], abs=1e-12)
    # Shapley values of two players, by hand
    assert row["contribution/audio"] == pytest.approx(0.5 * (acc["a"] - acc[""]) + 0.5 * (acc["av"] - acc["v"]), abs=1e-12)
    assert row["contribution/visual"] == pytest.approx(0.5 * (acc["v"] - acc[""]) + 0.5 * (acc["av"] - acc["a"]), abs=1e-12)
    # ranks of the pooled (N, D = 8) vectors, not of (N, T * D) flattened tokens
    for m, z in vectors.items():
        s = torch.linalg.svdvals((z - z.mean(0)).double())
        p = s / s.sum()
        assert row[f"erank/{m}"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
        assert row[f"erank_norm/{m}"] == pytest.approx(row[f"erank/{m}"] / 8, rel=1e-9)
        assert row[f"nrank/{m}"] <= 8
    assert math.isfinite(row["probe/audio"]) and row["probe_se/audio"] > 0


@pytest.mark.timeout(300)
def test_ddp_over_a_padding_sampler_gives_the_numbers_of_one_process(tmp_path):
    single, _ = validate(tmp_path, devices=1, batch_size=8)
    ddp, out = validate(tmp_path, devices=2, batch_size=4)  # Lightning's DistributedSampler: rank 1 repeats sample 0
    with open(out / "rank1.json") as f:
        rank1 = json.load(f)
    assert ddp == rank1 or all(ddp["diag"][0][k] == rank1["diag"][0][k] for k in ddp["diag"][0] if "seconds" not in k)
    for part in ("diag", "monitor", "plain"):
        (s,), (d,) = single[part], ddp[part]
        assert s.keys() == d.keys()
        for key, value in s.items():
            if not key.startswith("seconds/"):
                assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (part, key)
    # the test can see the padding: counting sample 0's two rows twice would change the fused accuracy
    c, _, _ = reference()
    padded = (c["av"].sum() + c["av"][0] + c["av"][30]) / (c["av"].numel() + 2)  # rows 0 and 30: sample 0's views
    assert abs(float(padded) - single["plain"][0]["val_acc_fused"]) > 1e-3
