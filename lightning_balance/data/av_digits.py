"""AV-Digits: an offline two-modality ("audio" + "visual") digit benchmark.

AV-Digits follows the construction idea of avMNIST (Vielzeuf et al., "CentralNet: a Multilayer
Approach for Multimodal Fusion", ECCV Workshops 2018; also used in MultiBench, Liang et al.,
NeurIPS 2021): two unrelated digit datasets, one per modality, paired by label, with the image
modality made harder by removing its leading principal components. Both sources are available
without network access:

* **visual**: scikit-learn's ``load_digits()`` (1,797 handwritten 8x8 digits from the UCI optical
  recognition set, shipped inside the scikit-learn wheel), flattened to 64 features and scaled
  from 0..16 to [0, 1].
* **audio**: 1-D digit signals of length 40 generated offline by the ``mnist1d`` package
  (Greydanus, "Scaling down Deep Learning", 2020) with ``make_dataset`` (never ``get_dataset``,
  which downloads): 4,000 train and 1,000 test signals.

See :func:`make_av_digits` for the exact construction.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch

from lightning_balance.data._dataset import (
    MultimodalTensorDataset,
    Splits,
    _check_bool,
    _check_int,
    _check_open_fraction,
    _SplitDataModule,
)

__all__ = ["AVDigitsDataModule", "MultimodalTensorDataset", "make_av_digits"]

_INSTALL_HINT = 'AV-Digits needs scikit-learn and mnist1d; install them with `pip install "lightning_balance[data]"`.'
_NUM_PIXELS = 64
_NUM_CLASSES = 10
_TEST_FRACTION = 0.2  # fraction of the digits images held out as the test split


def _import_load_digits() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return load_digits


def _import_mnist1d() -> tuple[Any, Any]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return make_dataset, get_dataset_args


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return the digits images scaled to [0, 1] (1797, 64) and their labels (read-only)."""
    digits = _import_load_digits()()
    images = np.asarray(digits.data, dtype=np.float64) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=None)
def _mnist1d_arrays(mnist1d_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate the mnist1d signals for one seed, leaving the global RNG states untouched.

    ``mnist1d.data.make_dataset`` reseeds Python's ``random`` and NumPy's legacy global RNG, so
    both states are saved before the call and restored after it. Results are cached per seed.

    Returns:
        ``(x_train (4000, 40), y_train, x_test (1000, 40), y_test)``, read-only arrays.
    """
    make_dataset, get_dataset_args = _import_mnist1d()
    args = get_dataset_args()
    args.seed = int(mnist1d_seed)
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (
        np.asarray(data["x"], dtype=np.float64),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float64),
        np.asarray(data["y_test"], dtype=np.int64),
    )
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _stratified_holdout(indices: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held_out), holding out ``round(fraction * n_c)`` of each class.

    Every class keeps at least one sample on each side, so label-matched pairing is always
    possible in every split. Both outputs are sorted.
    """
    kept, held = [], []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        if members.size < 2:
            raise ValueError(f"class {cls} has {members.size} sample(s); cannot split it into two parts.")
        members = rng.permutation(members)
        n_held = min(max(int(round(fraction * members.size)), 1), members.size - 1)
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Standardise every array with the per-feature mean/std of ``train`` (constant features: std 1)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    return [(array - mean) / std for array in (train, *others)]


def make_av_digits(
    seed: int = 0,
    remove_components: int = 10,
    val_fraction: float = 0.15,
    return_indices: bool = False,
) -> Splits:
    """Build the AV-Digits benchmark: label-paired 1-D "audio" signals and 8x8 "visual" digits.

    Construction (every random choice comes from ``numpy.random.default_rng(seed)``; the global
    ``random`` / ``numpy.random`` states are left as they were):

    1. **Visual source**: the 1,797 ``load_digits()`` images, 64 features scaled to [0, 1], are
       split per class into test (20 %) and train+val; ``val_fraction`` of each class of the
       train+val part becomes val.
    2. **Audio source**: ``mnist1d`` generates 4,000 train / 1,000 test signals of length 40 with
       a seed drawn from the rng; its test part is the test split, and ``val_fraction`` of each
       class of its train part becomes val.
    3. **PCA removal**: the principal directions of the *train* images (SVD of the centred train
       images) are computed and the top ``remove_components`` are projected out of every image:
       ``x - (x - mean) @ V_k @ V_k.T``. This makes the visual modality weaker, as the PCA
       energy removal made avMNIST's images harder.
    4. **Pairing**: as in avMNIST, each signal of a split is paired with an image of the same
       class drawn uniformly at random (with replacement) from the images of the same split.
       A split has as many samples as it has signals (about 3,400 / 600 / 1,000).
    5. **Standardisation**: each modality is standardised with the per-feature mean and std of
       the paired train split (features that are constant on train get std 1).

    Train, val and test are disjoint in both modalities: no image and no signal appears in two
    splits.

    Args:
        seed: Non-negative seed of every random choice (splits, mnist1d generation, pairing).
        remove_components: Number of leading principal components removed from the images,
            in [0, 63]. The default, 10, leaves images that are weaker than the 0.98-accurate
            raw ones yet still informative; larger values remove more visual signal.
        val_fraction: Fraction of each modality's training part (per class) used as val, in (0, 1).
        return_indices: Also return, per split, ``"visual_index"`` (row of ``load_digits().data``)
            and ``"audio_index"`` (row of the concatenation of mnist1d's ``x`` then ``x_test``,
            i.e. 0..3999 for its train part and 4000..4999 for its test part) as int64 tensors.

    Returns:
        ``{"train": split, "val": split, "test": split}`` where each split is
        ``{"audio": float32 (N, 40), "visual": float32 (N, 64), "target": int64 (N,)}`` (plus
        the two index tensors when ``return_indices`` is true).

    Raises:
        ValueError: If an argument is out of range (the message names it and the fix).
        TypeError: If an argument has the wrong type.
        ImportError: If scikit-learn or mnist1d is missing
            (install them with ``pip install "lightning_balance[data]"``).
    """
    seed = _check_int("seed", seed, low=0, hint="Pass a non-negative integer seed.")
    remove_components = _check_int(
        "remove_components",
        remove_components,
        low=0,
        high=_NUM_PIXELS - 1,
        hint="The images have 64 features; use 0 to keep them whole (default 10).",
    )
    val_fraction = _check_open_fraction("val_fraction", val_fraction, hint="Use e.g. 0.15.")
    return_indices = _check_bool("return_indices", return_indices)

    rng = np.random.default_rng(seed)

    # Visual source and its splits.
    images, image_labels = _digits_arrays()
    trainval_img, test_img = _stratified_holdout(np.arange(len(image_labels)), image_labels, _TEST_FRACTION, rng)
    train_img, val_img = _stratified_holdout(trainval_img, image_labels, val_fraction, rng)

    # Audio source and its splits (indices into concat(x, x_test)).
    mnist1d_seed = int(rng.integers(0, 2**31 - 1))
    x_train, y_train, x_test, y_test = _mnist1d_arrays(mnist1d_seed)
    signals = np.concatenate([x_train, x_test])
    signal_labels = np.concatenate([y_train, y_test])
    train_sig, val_sig = _stratified_holdout(np.arange(len(y_train)), signal_labels, val_fraction, rng)
    test_sig = np.arange(len(y_train), len(signal_labels))

    # PCA removal, fitted on the train images only.
    if remove_components > 0:
        train_images = images[train_img]
        mean = train_images.mean(axis=0)
        _, _, vt = np.linalg.svd(train_images - mean, full_matrices=False)
        top = vt[:remove_components].T  # (64, k), orthonormal columns
        images = images - (images - mean) @ top @ top.T

    # Label-matched random pairing within each split.
    split_members = {"train": (train_sig, train_img), "val": (val_sig, val_img), "test": (test_sig, test_img)}
    paired: dict[str, dict[str, np.ndarray]] = {}
    for split, (sig_idx, img_idx) in split_members.items():
        targets = signal_labels[sig_idx]
        visual_index = np.empty_like(sig_idx)
        for cls in np.unique(targets):
            slots = np.flatnonzero(targets == cls)
            candidates = img_idx[image_labels[img_idx] == cls]
            if candidates.size == 0:  # cannot happen: every class keeps >= 1 image per split
                raise RuntimeError(f"no {split} image of class {cls} to pair with")
            visual_index[slots] = rng.choice(candidates, size=slots.size, replace=True)
        paired[split] = {"audio_index": sig_idx, "visual_index": visual_index, "target": targets}

    audio = _standardise(*(signals[paired[s]["audio_index"]] for s in ("train", "val", "test")))
    visual = _standardise(*(images[paired[s]["visual_index"]] for s in ("train", "val", "test")))

    out: Splits = {}
    for i, split in enumerate(("train", "val", "test")):
        out[split] = {
            "audio": torch.from_numpy(audio[i].astype(np.float32)),
            "visual": torch.from_numpy(visual[i].astype(np.float32)),
            "target": torch.from_numpy(paired[split]["target"].astype(np.int64)),
        }
        if return_indices:
            out[split]["visual_index"] = torch.from_numpy(paired[split]["visual_index"].astype(np.int64))
            out[split]["audio_index"] = torch.from_numpy(paired[split]["audio_index"].astype(np.int64))
    return out


class AVDigitsDataModule(_SplitDataModule):
    """LightningDataModule serving AV-Digits (see :func:`make_av_digits`).

    Batches are dicts ``{"audio": (B, 40), "visual": (B, 64), "target": (B,)}``. The train loader
    shuffles with a :class:`torch.Generator` seeded from ``(seed, epoch)``; val and test loaders
    keep the order and never drop samples. No data is downloaded.

    Args:
        batch_size: Samples per batch (>= 1).
        seed: Seed of the data construction and of the train shuffle (>= 0).
        remove_components: Leading principal components removed from the images, in [0, 63].
        val_fraction: Fraction of each modality's training part used as val, in (0, 1).
        num_workers: DataLoader worker processes (>= 0).
        drop_last: Drop the last incomplete training batch.
        holdout_fraction: Share of the training split held out for methods that measure
            generalisation during training (``holdout_dataloader()``); 0 for none.
        missing_rate, missing_splits: per-sample absent modalities (MUSE-style independent masking; the
            batches then carry ``"present"``); see :class:`~lightning_balance.data._dataset._SplitDataModule`.
        valuation: serve the training split through a :class:`~lightning_balance.data.ValuationDataset`
            (for :class:`~lightning_balance.SampleValuation`).

    Attributes:
        modalities: ``("audio", "visual")``.
        num_classes: 10.
        feature_dims: ``{"audio": 40, "visual": 64}``.
    """

    modalities = ("audio", "visual")
    num_classes = _NUM_CLASSES

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        remove_components: int = 10,
        val_fraction: float = 0.15,
        num_workers: int = 0,
        drop_last: bool = False,
        holdout_fraction: float = 0.0,
        missing_rate: float | dict[str, float] = 0.0,
        missing_splits: tuple[str, ...] | dict[str, float | dict[str, float]] = ("train", "val", "test"),
        valuation: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, drop_last=drop_last,
                         holdout_fraction=holdout_fraction, missing_rate=missing_rate, missing_splits=missing_splits,
                         valuation=valuation)
        self.remove_components = _check_int(
            "remove_components",
            remove_components,
            low=0,
            high=_NUM_PIXELS - 1,
            hint="The images have 64 features; use 0 to keep them whole (default 10).",
        )
        self.val_fraction = _check_open_fraction("val_fraction", val_fraction, hint="Use e.g. 0.15.")
        self.feature_dims = {"audio": 40, "visual": _NUM_PIXELS}
        self.save_hyperparameters()

    def _make_splits(self) -> Splits:
        return make_av_digits(seed=self.seed, remove_components=self.remove_components, val_fraction=self.val_fraction)
