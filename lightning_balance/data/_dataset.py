"""Shared dataset and datamodule plumbing for the benchmark datamodules.

Both benchmark datamodules (:class:`~lightning_balance.data.AVDigitsDataModule` and
:class:`~lightning_balance.data.SyntheticCollapseDataModule`) build three splits of paired
modality tensors in memory and serve them with the same loader conventions. That shared part
lives here so that no loader code is duplicated:

* :class:`MultimodalTensorDataset` wraps a dict of equal-length tensors; the default collate
  function turns its items into dict batches such as
  ``{"audio": (B, 40), "visual": (B, 64), "target": (B,)}``.
* :class:`_SplitDataModule` owns the argument checks, ``setup()`` and the three dataloaders.
"""

from __future__ import annotations

import abc

import numbers
from collections.abc import Iterator, Mapping, Sized
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

__all__ = ["MultimodalTensorDataset", "mask_modalities"]

Splits = dict[str, dict[str, torch.Tensor]]
SPLIT_NAMES = ("train", "val", "test")


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """Return ``value`` as an ``int`` or raise an error naming the argument and the fix."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}). {hint}".rstrip())
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bounds = f">= {low}"
        elif low is None:
            bounds = f"<= {high}"
        else:
            bounds = f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}. {hint}".rstrip())
    return value


def _check_open_fraction(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` as a float strictly between 0 and 1 or raise an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1), got {value!r} ({type(value).__name__}). {hint}".rstrip())
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (exclusive), got {value}. {hint}".rstrip())
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return bool(value)


def mask_modalities(tensors: Mapping[str, torch.Tensor], modalities: tuple[str, ...] | list[str],
                    rate: float | Mapping[str, float], seed: int) -> dict[str, torch.Tensor]:
    """Independent per-sample masking of whole modalities, as MUSE-style missing-modality benchmarks do.

    Each sample loses modality ``m`` with probability ``rate`` (or ``rate[m]``), independently; a sample that
    would lose every modality keeps one, chosen uniformly at random. The absent inputs are set to zero (a
    finite value: an encoder runs on them, and the contract replaces its output) and the mask is returned
    under ``"present"`` as an ``(N, M)`` bool tensor in ``modalities`` order, ready for
    ``fuse(..., present=batch["present"])``. An existing ``"present"`` is intersected (a modality already
    absent stays absent). Deterministic in ``seed``.
    """
    rates = {m: float(rate.get(m, 0.0)) if isinstance(rate, Mapping) else float(rate) for m in modalities}
    bad = {m: r for m, r in rates.items() if not 0.0 <= r < 1.0}
    if bad:
        raise ValueError(f"missing rates must be in [0, 1), got {bad}.")
    n = int(next(iter(tensors.values())).shape[0])
    g = torch.Generator().manual_seed(int(seed))
    absent = torch.rand(n, len(modalities), generator=g) < torch.tensor([rates[m] for m in modalities])
    present = ~absent
    if "present" in tensors:
        present = present & tensors["present"].bool()
    lost = ~present.any(1)
    keep = torch.randint(0, len(modalities), (n,), generator=g)
    if "present" in tensors:  # keep one that the sample had
        had = tensors["present"].bool()
        scores = torch.rand(n, len(modalities), generator=g) + had.float()
        keep = scores.argmax(1)
    present[lost, keep[lost]] = True
    out = dict(tensors)
    for i, m in enumerate(modalities):
        x = tensors[m]
        out[m] = torch.where(present[:, i].reshape(-1, *([1] * (x.ndim - 1))), x, torch.zeros_like(x))
    out["present"] = present
    return out


class MultimodalTensorDataset(Dataset):
    """Dataset over a dict of equal-length tensors (one entry per modality, plus ``"target"``).

    Item ``i`` is the dict of the ``i``-th rows, so PyTorch's default collate function produces
    dict batches with the same keys, e.g. ``{"audio": (B, 40), "visual": (B, 64), "target": (B,)}``.

    Args:
        tensors: Mapping from a key (modality name, ``"target"``, ...) to a tensor. All tensors
            must have the same size along dimension 0.

    Raises:
        ValueError: If ``tensors`` is empty or the tensors differ in length.
        TypeError: If a value is not a :class:`torch.Tensor`.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("MultimodalTensorDataset needs at least one tensor, got an empty mapping.")
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"tensors[{key!r}] must be a torch.Tensor, got {type(value).__name__}.")
            if value.dim() == 0:
                raise ValueError(f"tensors[{key!r}] is a 0-d tensor; every tensor needs a sample dimension.")
        lengths = {key: int(value.shape[0]) for key, value in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All tensors must have the same length along dim 0, got {lengths}.")
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


class _EpochSeededRandomSampler(RandomSampler):
    """Random permutation sampler whose order for pass ``e`` depends only on ``(seed, e)``.

    The epoch is set by Lightning (the fit loop calls ``set_epoch`` on the train sampler before
    every epoch); when the sampler is iterated outside Lightning it counts its own passes. This
    makes the shuffle reproducible across a stop/resume at an epoch boundary, unlike a single
    generator whose state advances epoch after epoch. Under DDP, Lightning replaces a
    :class:`~torch.utils.data.RandomSampler` (this class included) by its ``DistributedSampler``.
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(cast(Sized, data_source), generator=torch.Generator())
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        self.generator = torch.Generator().manual_seed(int(state))
        self.epoch += 1
        yield from super().__iter__()


class _SplitDataModule(pl.LightningDataModule, abc.ABC):
    """Base class: serves in-memory train/val/test splits of paired modality tensors.

    Subclasses implement :meth:`_make_splits` (returning ``{"train": {...}, "val": {...},
    "test": {...}}`` dicts of equal-length tensors) and set ``modalities``, ``num_classes`` and
    ``feature_dims``. The train loader shuffles with a :class:`torch.Generator` seeded from
    ``(seed, epoch)``; the val and test loaders keep the order and never drop samples.

    Args:
        batch_size: Samples per batch (>= 1).
        seed: Seed of the data construction and of the train shuffle (>= 0).
        num_workers: DataLoader worker processes (>= 0).
        drop_last: Drop the last incomplete *training* batch (val/test never drop).
        holdout_fraction: Share of the training split set aside, in ``[0, 1)``, as a *held-out part of
            the training data* (``holdout_dataloader()``) for methods that measure generalisation
            during training (Gradient-Blending); the train loader then serves the rest. Never the
            validation or test data. 0 (default): no hold-out.
        missing_rate: each sample of the splits in ``missing_splits`` lacks each modality with this
            probability (a float, or a mapping modality -> rate), independently; never all of them
            (:func:`mask_modalities`). The batches then carry ``"present"``, an ``(B, M)`` bool mask in
            ``modalities`` order, and the absent inputs are zeros. The mask is fixed per split (drawn
            once from ``seed``), as in datasets with missing modalities. 0 (default): complete data.
        (Every batch also carries ``"index"``: each sample's position in its split, e.g. for the dataset indices
        of :class:`~lightning_balance.CrossModalDistillation`'s memory, with ``num_samples=len(dm.datasets["train"])``.)
        missing_splits: the splits that ``missing_rate`` applies to; or a mapping split -> rate (a float or a
            mapping modality -> rate) for a different rate per split, e.g. ``{"train": 0.3, "test": {"audio":
            0.5}}`` (then ``missing_rate`` must stay 0; the splits left out are complete).
        valuation: serve the training split through a :class:`~lightning_balance.data.ValuationDataset`, which
            :class:`~lightning_balance.SampleValuation` grows by copies that keep one modality (use it with
            ``Trainer(reload_dataloaders_every_n_epochs=1)``).
    """

    modalities: tuple[str, ...] = ()
    num_classes: int = 0
    feature_dims: dict[str, int] = {}

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0, drop_last: bool = False,
                 holdout_fraction: float = 0.0, missing_rate: float | Mapping[str, float] = 0.0,
                 missing_splits: tuple[str, ...] | list[str] | Mapping[str, float | Mapping[str, float]] = SPLIT_NAMES,
                 valuation: bool = False) -> None:
        super().__init__()
        self.valuation = _check_bool("valuation", valuation)

        def checked(rate: Any, what: str) -> float | dict[str, float]:
            rates = list(rate.values()) if isinstance(rate, Mapping) else [rate]
            if not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 <= cast(float, r) < 1 for r in rates):
                raise ValueError(f"{what} must be in [0, 1) (or a mapping modality -> rate), got {rate!r}.")
            return {k: float(v) for k, v in rate.items()} if isinstance(rate, Mapping) else float(rate)

        self.missing_rate = checked(missing_rate, "missing_rate")
        unknown = sorted(set(missing_splits) - set(SPLIT_NAMES))
        if unknown:
            raise ValueError(f"missing_splits names unknown splits {unknown}; the splits are {list(SPLIT_NAMES)}.")
        if isinstance(missing_splits, Mapping):
            if any(self.missing_rate.values()) if isinstance(self.missing_rate, dict) else self.missing_rate > 0:
                raise ValueError("missing_splits gives each split its own rate: leave missing_rate at 0 (got "
                                 f"missing_rate={missing_rate!r} and missing_splits={dict(missing_splits)!r}).")
            self.split_missing_rates = {k: checked(v, f"missing_splits[{k!r}]") for k, v in missing_splits.items()}
        else:
            self.split_missing_rates = {k: self.missing_rate for k in missing_splits}
        self.missing_splits = tuple(self.split_missing_rates)
        if not isinstance(holdout_fraction, (int, float)) or isinstance(holdout_fraction, bool) or not 0 <= holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}. Use e.g. 0.1, or 0 for none.")
        self.holdout_fraction = float(holdout_fraction)
        self.batch_size = _check_int("batch_size", batch_size, low=1, hint="Pass a positive batch size, e.g. 64.")
        self.seed = _check_int("seed", seed, low=0, hint="Pass a non-negative integer seed.")
        self.num_workers = _check_int("num_workers", num_workers, low=0, hint="Use 0 to load in the main process.")
        self.drop_last = _check_bool("drop_last", drop_last)
        self.splits: Splits | None = None
        self.datasets: dict[str, MultimodalTensorDataset] = {}

    @abc.abstractmethod
    def _make_splits(self) -> Splits:
        """Build ``{"train": {...}, "val": {...}, "test": {...}}`` (each a dict of equal-length tensors)."""

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits (once; later calls reuse them)."""
        if self.splits is None:
            self.splits = self._make_splits()
            for split, rate in self.split_missing_rates.items():
                if isinstance(rate, dict):
                    unknown = sorted(set(rate) - set(self.modalities))
                    if unknown:
                        raise ValueError(f"the missing rate of {split!r} names unknown modalities {unknown}; the "
                                         f"modalities are {list(self.modalities)}.")
            for i, split in enumerate(SPLIT_NAMES):
                rate = self.split_missing_rates.get(split, 0.0)
                if any(rate.values()) if isinstance(rate, dict) else rate > 0:
                    self.splits[split] = mask_modalities(self.splits[split], self.modalities, rate,
                                                         seed=self.seed * 1009 + 17 + i)
            if self.holdout_fraction > 0:
                train = self.splits["train"]
                n = len(next(iter(train.values())))
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 7919))
                cut = max(1, round(self.holdout_fraction * n))
                self.splits["holdout"] = {k: v[order[:cut]] for k, v in train.items()}
                self.splits["train"] = {k: v[order[cut:]] for k, v in train.items()}
            for tensors in self.splits.values():  # each sample's position in its split (CRD's memory index)
                tensors["index"] = torch.arange(len(tensors["target"]))
            self.datasets = {name: MultimodalTensorDataset(split) for name, split in self.splits.items()}
            if self.valuation:
                from lightning_balance.data.valuation import ValuationDataset

                self.datasets["train"] = ValuationDataset(self.datasets["train"], self.modalities)  # type: ignore[assignment]

    def _dataset(self, split: str) -> MultimodalTensorDataset:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before requesting the {split} dataloader.")
        return self.datasets[split]

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        return DataLoader(
            dataset,
            sampler=_EpochSeededRandomSampler(dataset, self.seed),
            drop_last=self.drop_last,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), shuffle=False, drop_last=False, **self._loader_kwargs())

    def holdout_dataloader(self) -> DataLoader:
        """The held-out part of the training data (``holdout_fraction > 0``), in order."""
        if self.holdout_fraction == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no held-out training data: pass holdout_fraction (e.g. 0.1)."
            )
        return DataLoader(self._dataset("holdout"), shuffle=False, drop_last=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), shuffle=False, drop_last=False, **self._loader_kwargs())
