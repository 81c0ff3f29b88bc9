"""A training dataset that grows by copies of its samples in which only one modality is kept: the data side of
:class:`~lightning_balance.SampleValuation` (modality valuation, Wei et al., CVPR 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

__all__ = ["ValuationDataset"]


class ValuationDataset(Dataset):
    """Wraps a map-style dataset of dict items: items ``0 .. N−1`` are the dataset's own, followed by the extra
    copies the callback asks for, each a sample in which only one modality is kept (the others marked absent).

    The copies say what they keep through the presence mask, the library's one way to mark an absent modality:
    every item carries ``"present"`` (the base item's own mask ANDed with the copy's: a ``(M,)`` bool tensor in
    ``modalities`` order if the base item has one, else a dict ``{modality: bool}``), and the module's
    ``training_step`` passes it on: ``self.fuse(features, targets, present=batch.get("present"))``. The fusion then
    sees the declared fill (zeros by default, the official code's zeroed features) for the dropped modalities.

    Keep one instance for the whole fit (e.g. as an attribute of the datamodule, built in ``setup``) and return a
    new ``DataLoader`` over it from ``train_dataloader()``: its length changes between epochs, so the Trainer must
    rebuild the loader every epoch (``Trainer(reload_dataloaders_every_n_epochs=1)``).

    Args:
        dataset: the training dataset (map-style, dict items).
        modalities: the modality names, in the order of a ``"present"`` tensor in the items (if any).
    """

    def __init__(self, dataset: Dataset, modalities: Sequence[str]) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"ValuationDataset wraps a map-style dataset (with __getitem__ and __len__), got "
                            f"{type(dataset).__name__}.")
        if len(modalities) < 2 or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must name at least two distinct modalities, got {list(modalities)!r}.")
        self.dataset = dataset
        self.modalities = tuple(modalities)
        self.base_index = torch.zeros(0, dtype=torch.long)  # per extra copy: the sample it copies
        self.keep = torch.zeros(0, dtype=torch.long)  # per extra copy: the index of the modality it keeps

    @property
    def num_base(self) -> int:
        return len(self.dataset)

    def set_extras(self, base_index: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> None:
        """Replace the extra copies: copy ``j`` is sample ``base_index[j]`` keeping only modality ``keep[j]``."""
        base_index = torch.zeros(0, dtype=torch.long) if base_index is None else torch.as_tensor(base_index).long().cpu()
        keep = torch.zeros(0, dtype=torch.long) if keep is None else torch.as_tensor(keep).long().cpu()
        if base_index.shape != keep.shape or base_index.ndim != 1:
            raise ValueError(f"base_index and keep must be two (K,) tensors, got {tuple(base_index.shape)} and "
                             f"{tuple(keep.shape)}.")
        if base_index.numel() and (int(base_index.min()) < 0 or int(base_index.max()) >= self.num_base):
            raise ValueError(f"base_index must lie in [0, {self.num_base}); got values in [{int(base_index.min())}, "
                             f"{int(base_index.max())}].")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= len(self.modalities)):
            raise ValueError(f"keep must index the {len(self.modalities)} modalities; got {keep.unique().tolist()}.")
        self.base_index, self.keep = base_index, keep

    def __len__(self) -> int:
        return self.num_base + int(self.base_index.numel())

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a ValuationDataset of {len(self)} items.")
        base = index if index < self.num_base else int(self.base_index[index - self.num_base])
        item = self.dataset[base]
        if not isinstance(item, Mapping):
            raise TypeError(f"ValuationDataset needs dict items (modality -> input, 'target', ...); item {base} is a "
                            f"{type(item).__name__}.")
        item = dict(item)
        keep = None if index < self.num_base else int(self.keep[index - self.num_base])
        own = item.get("present")
        if own is not None and not isinstance(own, (torch.Tensor, Mapping)):
            try:  # a NumPy array or a sequence of flags, as default_collate would take it
                own = torch.as_tensor(own, dtype=torch.bool)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"item {base}'s 'present' must be a bool tensor (or array/sequence) in the order "
                                f"{self.modalities}, or a dict modality -> bool; got {type(own).__name__}.") from err
        if isinstance(own, torch.Tensor):
            if own.shape != (len(self.modalities),):
                raise ValueError(f"item {base}'s 'present' has shape {tuple(own.shape)}; ValuationDataset expects a "
                                 f"({len(self.modalities)},) bool tensor in the order {self.modalities}.")
            mask = own.bool().clone()
            if keep is not None:
                mask &= torch.arange(len(self.modalities)) == keep
            item["present"] = mask
        else:
            own = own if isinstance(own, Mapping) else {}
            item["present"] = {m: torch.tensor(bool(own.get(m, True)) and (keep is None or keep == i))
                               for i, m in enumerate(self.modalities)}
        return item
