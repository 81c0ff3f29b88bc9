"""Tests of lightning_balance.data: AV-Digits, the synthetic collapse generator and the datamodules."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_balance.data import (
    PRESETS,
    AVDigitsDataModule,
    MultimodalTensorDataset,
    SyntheticCollapseDataModule,
    make_av_digits,
    make_synthetic_collapse,
)
from lightning_balance.data import av_digits as av_module

SPLITS = ("train", "val", "test")
REPO_ROOT = Path(__file__).resolve().parents[1]


class _FreshGeneration:
    """Context asserting that mnist1d generation really ran inside it (not served from the cache).

    Tests use a seed of their own instead of clearing the per-seed cache, so that the seed-0
    arrays other tests need stay cached. The digits cache is cheap and is cleared.
    """

    def __enter__(self):
        av_module._digits_arrays.cache_clear()
        self.misses = av_module._mnist1d_arrays.cache_info().misses
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            assert av_module._mnist1d_arrays.cache_info().misses == self.misses + 1


def _standardise_like(train: np.ndarray, x: np.ndarray) -> np.ndarray:
    std = train.std(0)
    return (x - train.mean(0)) / np.where(std < 1e-6, 1.0, std)


# --------------------------------------------------------------------------------------------
# AV-Digits
# --------------------------------------------------------------------------------------------


def test_av_digits_shapes_and_dtypes():
    data = make_av_digits()
    assert set(data) == set(SPLITS)
    sizes = {}
    for split in SPLITS:
        assert set(data[split]) == {"audio", "visual", "target"}
        n = data[split]["target"].shape[0]
        sizes[split] = n
        assert data[split]["audio"].shape == (n, 40) and data[split]["audio"].dtype == torch.float32
        assert data[split]["visual"].shape == (n, 64) and data[split]["visual"].dtype == torch.float32
        assert data[split]["target"].dtype == torch.int64
        assert set(data[split]["target"].unique().tolist()) == set(range(10))
        for key in ("audio", "visual"):
            assert torch.isfinite(data[split][key]).all()
    # mnist1d: 4000 train signals (split into train/val with val_fraction 0.15) and 1000 test.
    assert sizes["test"] == 1000
    assert sizes["train"] + sizes["val"] == 4000
    assert abs(sizes["val"] - 600) <= 10
    # Standardised on train: per-feature mean 0 and (non-constant features) std 1.
    for key in ("audio", "visual"):
        x = data["train"][key].double()
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-5)
        std = x.std(0, unbiased=False)
        assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-4))  # constant pixels stay constant


def test_av_digits_determinism():
    a, b, c = make_av_digits(seed=0), make_av_digits(seed=0), make_av_digits(seed=1)
    for split in SPLITS:
        for key in ("audio", "visual", "target"):
            assert torch.equal(a[split][key], b[split][key])
    for key in ("audio", "visual", "target"):
        assert not torch.equal(a["train"][key], c["train"][key])


def test_av_digits_pairing_is_label_matched_and_splits_are_disjoint(monkeypatch):
    from sklearn.datasets import load_digits

    # Capture the mnist1d arrays the builder receives (seed 3 is not cached yet, so it generates).
    captured = {}
    real_import = av_module._import_mnist1d

    def recording_import():
        make_dataset, get_dataset_args = real_import()

        def recording_make_dataset(args):
            captured["data"] = make_dataset(args)
            return captured["data"]

        return recording_make_dataset, get_dataset_args

    monkeypatch.setattr(av_module, "_import_mnist1d", recording_import)
    with _FreshGeneration():
        data = make_av_digits(seed=3, remove_components=0, return_indices=True)
    mnist = captured["data"]
    signals = np.concatenate([mnist["x"], mnist["x_test"]])
    signal_labels = np.concatenate([mnist["y"], mnist["y_test"]])
    digits = load_digits()

    image_sets, signal_sets = {}, {}
    for split in SPLITS:
        vi = data[split]["visual_index"].numpy()
        ai = data[split]["audio_index"].numpy()
        target = data[split]["target"].numpy()
        assert data[split]["visual_index"].dtype == torch.int64
        assert data[split]["audio_index"].dtype == torch.int64
        np.testing.assert_array_equal(digits.target[vi], target)  # paired image has the class
        np.testing.assert_array_equal(signal_labels[ai], target)  # and so does the signal
        assert len(np.unique(ai)) == len(ai)  # every signal used exactly once
        image_sets[split], signal_sets[split] = set(vi.tolist()), set(ai.tolist())
    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not image_sets[s1] & image_sets[s2], (s1, s2)
        assert not signal_sets[s1] & signal_sets[s2], (s1, s2)
    assert signal_sets["test"] == set(range(4000, 5000))
    assert signal_sets["train"] | signal_sets["val"] == set(range(4000))
    # Digits test split holds ~20% of the images, and every class in each split.
    test_images = len(image_sets["test"])
    assert test_images <= 365 and len(set(digits.target[list(image_sets["test"])])) == 10

    # Features are exactly the standardised source rows (remove_components=0: no PCA).
    train_vi, train_ai = data["train"]["visual_index"].numpy(), data["train"]["audio_index"].numpy()
    images = digits.data / 16.0
    for split in SPLITS:
        vi, ai = data[split]["visual_index"].numpy(), data[split]["audio_index"].numpy()
        np.testing.assert_allclose(
            data[split]["visual"].numpy(), _standardise_like(images[train_vi], images[vi]), atol=1e-5
        )
        np.testing.assert_allclose(
            data[split]["audio"].numpy(), _standardise_like(signals[train_ai], signals[ai]), atol=1e-5
        )


def test_av_digits_leaves_global_rng_state_untouched():
    random.seed(1234)
    np.random.seed(5678)
    py_state, np_state = random.getstate(), np.random.get_state()
    with _FreshGeneration():  # mnist1d generation reseeds the global RNGs internally
        make_av_digits(seed=2)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    # And the next draws are those the seeds predict.
    draws = (random.random(), np.random.rand())
    random.seed(1234)
    np.random.seed(5678)
    assert draws == (random.random(), np.random.rand())


def test_av_digits_pca_removal():
    raw = make_av_digits(seed=0, remove_components=0)
    removed = make_av_digits(seed=0, remove_components=10)
    # Same pairing and audio; different visual features.
    assert torch.equal(raw["train"]["target"], removed["train"]["target"])
    assert torch.equal(raw["train"]["audio"], removed["train"]["audio"])
    assert not torch.allclose(raw["train"]["visual"], removed["train"]["visual"])

    # Projecting out the top-10 train principal directions lowers the rank of the centred train
    # visual features by exactly 10 (per-feature standardisation does not change the rank).
    def centred_rank(x: torch.Tensor) -> int:
        x = x.double().numpy()
        x = x - x.mean(0)
        sv = np.linalg.svd(x, compute_uv=False)
        return int((sv > 1e-4 * sv[0]).sum())

    rank_raw = centred_rank(raw["train"]["visual"])
    assert rank_raw > 50
    assert centred_rank(removed["train"]["visual"]) == rank_raw - 10


def test_av_digits_works_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with _FreshGeneration():
        data = make_av_digits(seed=4)
    assert data["test"]["audio"].shape == (1000, 40)


def test_av_digits_missing_dependency_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r'pip install "lightning_balance\[data\]"'):
        make_av_digits(seed=99)  # a seed not generated before, so mnist1d must be imported
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    av_module._digits_arrays.cache_clear()
    with pytest.raises(ImportError, match=r"lightning_balance\[data\]"):
        make_av_digits(seed=0)


def test_importing_data_package_is_lazy():
    code = (
        "import sys, lightning_balance.data\n"
        "bad = [m for m in ('sklearn', 'mnist1d') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"remove_components": 64}, ["remove_components", "64", "[0, 63]"]),
        ({"remove_components": -1}, ["remove_components", "-1"]),
        ({"val_fraction": 0.0}, ["val_fraction", "(0, 1)"]),
        ({"val_fraction": 1.5}, ["val_fraction", "1.5"]),
        ({"seed": -3}, ["seed", "-3"]),
    ],
)
def test_av_digits_argument_validation(kwargs, words):
    with pytest.raises(ValueError) as info:
        make_av_digits(**kwargs)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ValueError) as info:
        AVDigitsDataModule(**kwargs)
    assert words[0] in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"), ({"seed": -1}, "seed")],
)
def test_datamodule_argument_validation(kwargs, name):
    for cls in (AVDigitsDataModule, SyntheticCollapseDataModule):
        with pytest.raises(ValueError, match=name):
            cls(**kwargs)
    with pytest.raises(TypeError, match="batch_size"):
        AVDigitsDataModule(batch_size=2.5)


# --------------------------------------------------------------------------------------------
# Datamodules
# --------------------------------------------------------------------------------------------


def _check_loaders(dm, batch_size: int) -> None:
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, dict)
    assert set(batch) == set(dm.modalities) | {"target", "index"}
    seen = [int(i) for b in dm.train_dataloader() for i in b["index"]]  # drop_last may leave a few out
    assert len(set(seen)) == len(seen) and set(seen) <= set(range(len(dm.datasets["train"])))
    assert sorted(int(i) for b in dm.val_dataloader() for i in b["index"]) == list(range(len(dm.datasets["val"])))
    for name in dm.modalities:
        assert batch[name].shape == (batch_size, dm.feature_dims[name])
        assert batch[name].dtype == torch.float32
    assert batch["target"].shape == (batch_size,) and batch["target"].dtype == torch.int64
    # val/test: every sample exactly once, in order, even with drop_last=True for training.
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        keys = list(dm.splits[split])
        joined = {k: torch.cat([b[k] for b in loader]) for k in keys}
        for k in keys:
            assert torch.equal(joined[k], dm.splits[split][k]), (split, k)
    # train: with drop_last every batch is full; one epoch is a permutation of the train split.
    n_train = len(dm.splits["train"]["target"])
    batches = list(dm.train_dataloader())
    assert all(len(b["target"]) == batch_size for b in batches)
    assert len(batches) == n_train // batch_size


def test_av_digits_datamodule_batches_and_coverage():
    dm = AVDigitsDataModule(batch_size=128, drop_last=True)
    assert dm.modalities == ("audio", "visual")
    assert dm.num_classes == 10 and dm.feature_dims == {"audio": 40, "visual": 64}
    _check_loaders(dm, 128)
    assert torch.equal(dm.splits["train"]["visual"], make_av_digits(seed=0)["train"]["visual"])


def test_synthetic_datamodule_batches_and_coverage():
    dm = SyntheticCollapseDataModule(batch_size=50, preset="many", num_samples=1000, drop_last=True)
    assert dm.modalities == tuple(f"m{i}" for i in range(8))
    assert dm.num_classes == 10 and dm.feature_dims == {f"m{i}": 32 for i in range(8)}
    _check_loaders(dm, 50)


def test_train_shuffle_is_seeded_per_epoch():
    def first_epoch_targets(dm, epoch=None):
        loader = dm.train_dataloader()
        if epoch is not None:
            loader.sampler.set_epoch(epoch)
        return torch.cat([b["target"] for b in loader])

    kwargs = {"preset": "dominant", "num_samples": 600, "batch_size": 32}
    a, b = SyntheticCollapseDataModule(seed=0, **kwargs), SyntheticCollapseDataModule(seed=0, **kwargs)
    for dm in (a, b):
        dm.setup()
    t_a, t_b = first_epoch_targets(a), first_epoch_targets(b)
    assert torch.equal(t_a, t_b)
    assert sorted(t_a.tolist()) == sorted(a.splits["train"]["target"].tolist())
    assert not torch.equal(t_a, a.splits["train"]["target"])  # actually shuffled
    # The order depends on the epoch, and only on (seed, epoch).
    assert not torch.equal(first_epoch_targets(a, epoch=0), first_epoch_targets(a, epoch=1))
    assert torch.equal(first_epoch_targets(a, epoch=5), first_epoch_targets(b, epoch=5))
    # Iterating outside Lightning (no set_epoch) still gives a new order on every pass.
    loader = b.train_dataloader()
    assert not torch.equal(torch.cat([x["target"] for x in loader]), torch.cat([x["target"] for x in loader]))


def test_multimodal_tensor_dataset():
    ds = MultimodalTensorDataset({"a": torch.arange(6).view(3, 2), "target": torch.tensor([0, 1, 2])})
    assert len(ds) == 3
    item = ds[1]
    assert torch.equal(item["a"], torch.tensor([2, 3])) and int(item["target"]) == 1
    with pytest.raises(ValueError, match="same length"):
        MultimodalTensorDataset({"a": torch.zeros(3, 2), "target": torch.zeros(4)})
    with pytest.raises(ValueError):
        MultimodalTensorDataset({})


# --------------------------------------------------------------------------------------------
# Synthetic collapse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_modalities", range(2, 9))
def test_synthetic_shapes(num_modalities):
    signal = [4 + m for m in range(num_modalities)]
    data = make_synthetic_collapse(
        num_samples=400, num_modalities=num_modalities, snr=2.0, signal_dims=signal, noise_dims=3
    )
    names = [f"m{m}" for m in range(num_modalities)]
    sizes = {"train": 280, "val": 60, "test": 60}
    for split in SPLITS:
        assert list(data[split]) == names + ["target"]
        for m, name in enumerate(names):
            assert data[split][name].shape == (sizes[split], signal[m] + 3)
            assert data[split][name].dtype == torch.float32
        assert data[split]["target"].shape == (sizes[split],) and data[split]["target"].dtype == torch.int64
        assert data[split]["target"].min() >= 0 and data[split]["target"].max() < 10


@pytest.mark.parametrize("name", ["snr", "classes_seen", "signal_dims", "noise_dims", "names"])
def test_synthetic_wrong_list_length(name):
    bad = {"snr": [1.0, 2.0, 3.0], "classes_seen": [10], "signal_dims": [4, 4, 4], "noise_dims": [1], "names": ["a"]}
    with pytest.raises(ValueError, match=name):
        make_synthetic_collapse(num_samples=100, num_modalities=2, **{name: bad[name]})
    with pytest.raises(ValueError, match=name):
        SyntheticCollapseDataModule(num_modalities=2, **{name: bad[name]})


def test_synthetic_other_validation():
    with pytest.raises(ValueError, match="classes_seen"):
        make_synthetic_collapse(classes_seen=[11, 10])
    with pytest.raises(ValueError, match="snr"):
        make_synthetic_collapse(num_modalities=3)  # the default snr has two values
    with pytest.raises(ValueError, match="test_fraction"):
        make_synthetic_collapse(val_fraction=0.5, test_fraction=0.6)
    with pytest.raises(ValueError, match="preset"):
        SyntheticCollapseDataModule(preset="nope")


def test_synthetic_determinism():
    kwargs = {"num_samples": 500, "snr": [3.0, 1.0], "classes_seen": [5, 10]}
    a, b = make_synthetic_collapse(seed=7, **kwargs), make_synthetic_collapse(seed=7, **kwargs)
    c = make_synthetic_collapse(seed=8, **kwargs)
    for split in SPLITS:
        for key in a[split]:
            assert torch.equal(a[split][key], b[split][key])
    assert not torch.equal(a["train"]["m0"], c["train"]["m0"])
    assert not torch.equal(a["train"]["target"], c["train"]["target"])


def test_synthetic_classes_seen_merges_class_pairs():
    data = make_synthetic_collapse(
        num_samples=20000, snr=[4.0, 4.0], classes_seen=[5, 10], noise_dims=0, val_fraction=0.01, test_fraction=0.01
    )
    x0, x1, y = data["train"]["m0"].double(), data["train"]["m1"].double(), data["train"]["target"]
    means0 = torch.stack([x0[y == c].mean(0) for c in range(10)])
    means1 = torch.stack([x1[y == c].mean(0) for c in range(10)])
    for k in range(5):
        # Modality 0 cannot tell 2k from 2k+1 (same mean up to sampling noise, ~0.1) ...
        assert torch.dist(means0[2 * k], means0[2 * k + 1]) < 0.5
        # ... modality 1 can (distinct unit means scaled by snr 4).
        assert torch.dist(means1[2 * k], means1[2 * k + 1]) > 2.0
    # Modality 0 still separates the groups.
    assert torch.dist(means0[0], means0[2]) > 2.0


def _nearest_mean_accuracy(data, name: str) -> float:
    x, y = data["train"][name], data["train"]["target"]
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(data["test"][name], means).argmin(1)
    return (pred == data["test"]["target"]).float().mean().item()


def test_synthetic_snr_controls_separation():
    data = make_synthetic_collapse(num_samples=6000, snr=[4.0, 0.5], classes_seen=10, seed=1)
    strong, weak = _nearest_mean_accuracy(data, "m0"), _nearest_mean_accuracy(data, "m1")
    assert strong > 0.9
    assert weak < 0.4
    assert strong > weak + 0.4


def test_synthetic_presets_and_overrides():
    assert set(PRESETS) == {"dominant", "balanced", "underlearned", "many"}
    for kwargs in PRESETS.values():
        data = make_synthetic_collapse(num_samples=300, **kwargs)
        assert len([k for k in data["train"] if k != "target"]) == kwargs["num_modalities"]
    # Dominant: the easy modality sees only 5 groups, so it caps near 50%; the weak one is needed.
    dominant = make_synthetic_collapse(num_samples=6000, **PRESETS["dominant"])
    assert 0.4 < _nearest_mean_accuracy(dominant, "m0") < 0.6
    # Balanced negative control: both modalities equally informative.
    balanced = make_synthetic_collapse(num_samples=6000, **PRESETS["balanced"])
    assert abs(_nearest_mean_accuracy(balanced, "m0") - _nearest_mean_accuracy(balanced, "m1")) < 0.1
    # Under-learned (calibrated by examples/collapse_study.py): both see every class, m1 weaker and much wider
    under = SyntheticCollapseDataModule(preset="underlearned")
    assert under.feature_dims == {"m0": 32, "m1": 256} and under.generator_kwargs["classes_seen"] == [10, 10]
    underlearned = make_synthetic_collapse(num_samples=6000, **PRESETS["underlearned"])
    assert _nearest_mean_accuracy(underlearned, "m0") > _nearest_mean_accuracy(underlearned, "m1") > 0.3
    # Explicit arguments override the preset; None falls back to the preset / generator default.
    dm = SyntheticCollapseDataModule(preset="dominant", snr=[2.0, 2.0], names=["audio", "video"], noise_dims=[0, 8])
    assert dm.generator_kwargs["snr"] == [2.0, 2.0] and dm.generator_kwargs["classes_seen"] == [5, 10]
    assert dm.modalities == ("audio", "video") and dm.feature_dims == {"audio": 16, "video": 24}
    dm = SyntheticCollapseDataModule(num_modalities=4, snr=1.0)
    assert dm.feature_dims == {f"m{i}": 32 for i in range(4)}


def test_mask_modalities_is_independent_never_total_and_zero_fills():
    from lightning_balance.data import mask_modalities

    n = 4000
    tensors = {"a": torch.ones(n, 3), "b": torch.ones(n, 2, 2), "target": torch.zeros(n, dtype=torch.long)}
    out = mask_modalities(tensors, ("a", "b"), {"a": 0.3, "b": 0.5}, seed=0)
    present = out["present"]
    assert present.shape == (n, 2) and present.dtype == torch.bool and bool(present.any(1).all())
    # independent drops, then the 0.3 * 0.5 = 15% that lost both keep one of them at random (half each)
    assert float((~present[:, 0]).float().mean()) == pytest.approx(0.3 - 0.15 / 2, abs=0.03)
    assert float((~present[:, 1]).float().mean()) == pytest.approx(0.5 - 0.15 / 2, abs=0.03)
    assert bool((out["a"][~present[:, 0]] == 0).all()) and bool((out["b"][~present[:, 1]] == 0).all())
    assert bool((out["a"][present[:, 0]] == 1).all())
    again = mask_modalities(tensors, ("a", "b"), {"a": 0.3, "b": 0.5}, seed=0)
    assert torch.equal(again["present"], present)
    # a second mask on top keeps what was absent absent, and a sample keeps one modality it had
    twice = mask_modalities(out, ("a", "b"), 0.5, seed=1)
    assert bool((twice["present"] <= present).all()) and bool(twice["present"].any(1).all())
    with pytest.raises(ValueError, match="missing rates must be in \\[0, 1\\)"):
        mask_modalities(tensors, ("a", "b"), 1.0, seed=0)


def test_datamodules_serve_the_presence_mask():
    dm = AVDigitsDataModule(batch_size=32, missing_rate={"audio": 0.3}, missing_splits=("train", "test"))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["present"].shape == (32, 2) and not bool(batch["present"][:, 0].all()) and bool(batch["present"][:, 1].all())
    assert "present" not in next(iter(dm.val_dataloader()))
    assert "present" in next(iter(dm.test_dataloader()))
    with pytest.raises(ValueError, match="missing_rate must be in \\[0, 1\\)"):
        AVDigitsDataModule(missing_rate=1.5)
    with pytest.raises(ValueError, match="missing_splits names unknown splits \\['holdout'\\]"):
        AVDigitsDataModule(missing_rate=0.2, missing_splits=("holdout",))
    with pytest.raises(ValueError, match="names unknown modalities \\['depth'\\]"):
        AVDigitsDataModule(missing_rate={"depth": 0.2}).setup()


def test_each_split_may_have_its_own_missing_rate():
    dm = AVDigitsDataModule(batch_size=32, missing_splits={"train": 0.3, "test": {"audio": 0.5}})
    dm.setup()
    train, test = dm.splits["train"]["present"], dm.splits["test"]["present"]
    assert "present" not in dm.splits["val"]
    # train: each modality dropped at 0.3, then half of the 0.09 that lost both keep audio, half visual
    assert float((~train).float().mean(0)[0]) == pytest.approx(0.3 - 0.09 / 2, abs=0.04)
    assert float((~train).float().mean(0)[1]) == pytest.approx(0.3 - 0.09 / 2, abs=0.04)
    assert float((~test[:, 0]).float().mean()) == pytest.approx(0.5, abs=0.06) and bool(test[:, 1].all())
    with pytest.raises(ValueError, match="leave missing_rate at 0"):
        AVDigitsDataModule(missing_rate=0.2, missing_splits={"train": 0.3})
    with pytest.raises(ValueError, match="missing_splits\\['test'\\] must be in \\[0, 1\\)"):
        AVDigitsDataModule(missing_splits={"test": 1.2})
