"""What one call of ``MultimodalMixin.fuse`` records, and which batch of the Trainer it belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["ModalityRecord", "batch_token", "autocast_state"]


@dataclass
class ModalityRecord:
    """What one call of :meth:`MultimodalMixin.fuse` recorded.

    Attributes:
        index: increasing counter of ``fuse`` calls on the module; callbacks use it to tell a fresh
            record from one they have already consumed.
        features: per-modality features, as passed (still attached to the autograd graph), in their
            own shape: ``(N, D)`` vectors or ``(N, T, D)`` token sequences.
        logits: the fused logits ``(N, C)`` (attached to the graph).
        targets: the class targets passed to ``fuse`` (``None`` if none were given).
        training: whether the module was in training mode.
        batch: the Trainer batch the record belongs to (``None`` outside a Trainer loop).
        ignore_index: the target value that marks a sample to leave out of every statistic.
        present: modality → ``(N,)`` bool, which samples have the modality (``None``: all of them). The
            features of an absent sample are the declared fill, not evidence: statistics of a modality
            count only :meth:`counted` samples.
    """

    index: int
    features: dict[str, Tensor]
    logits: Tensor
    targets: Optional[Tensor]
    training: bool
    _owner: Any = field(default=None, repr=False)
    _autocast: tuple[str, bool, Optional[torch.dtype]] = field(default=("cpu", False, None), repr=False)
    _unimodal: Optional[dict[str, Tensor]] = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    inputs: Optional[dict[str, Tensor]] = field(default=None, repr=False)
    batch: Any = field(default=None, repr=False)
    ignore_index: int = -100
    _valid: Optional[Tensor] = field(default=None, repr=False)
    present: Optional[dict[str, Tensor]] = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    @property
    def valid(self) -> Optional[Tensor]:
        """``(N,)`` bool: the samples whose target is not ``ignore_index`` (``None`` without targets).

        Every statistic a method computes from the record (scores, prototypes, accuracies, probes) is
        taken over these samples only; a batch may have none."""
        if self.targets is None:
            return None
        if self._valid is None:
            self._valid = self.targets != self.ignore_index
        return self._valid

    @property
    def complete(self) -> bool:
        """Whether every sample has every modality (no presence mask was given)."""
        return self.present is None

    def presence(self, modality: str) -> Optional[Tensor]:
        """``(N,)`` bool: the samples that have ``modality`` (``None``: all of them)."""
        return None if self.present is None else self.present[modality]

    def counted(self, modality: str) -> Optional[Tensor]:
        """``(N,)`` bool: the samples that count in a statistic of ``modality``: labelled (:attr:`valid`) and
        having the modality. ``None`` when every sample counts (no targets, no mask)."""
        valid, present = self.valid, self.presence(modality)
        if present is None:
            return valid
        return present if valid is None else valid & present

    def counted_stack(self, modalities: "list[str] | tuple[str, ...]") -> Optional[Tensor]:
        """``(M, N)`` bool: :meth:`counted` of each of ``modalities``; ``None`` when the record is complete
        (then :attr:`valid` says which samples count, for every modality)."""
        if self.present is None:
            return None
        return torch.stack([self.counted(m) for m in modalities])  # type: ignore[misc]

    def modality_counts(self, modalities: "list[str] | tuple[str, ...]") -> Tensor:
        """``(M,)`` float32: how many samples count for each of ``modalities`` (labelled and present)."""
        stacked = self.counted_stack(modalities)
        if stacked is not None:
            return stacked.sum(1).float()
        n = self.valid.sum() if self.valid is not None else torch.tensor(self.batch_size, device=self.logits.device)
        return n.float().expand(len(modalities)).clone()

    def valid_targets(self) -> Tensor:
        """Targets with ``ignore_index`` replaced by 0, safe for indexing (mask the result with :attr:`valid`)."""
        if self.targets is None:
            raise ValueError("this record has no targets")
        return torch.where(self.valid, self.targets, torch.zeros_like(self.targets))  # type: ignore[arg-type]

    def autocast(self) -> torch.autocast:
        """The autocast state of the forward pass that made this record (callbacks run outside it)."""
        device_type, enabled, dtype = self._autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)

    def unimodal_logits(self) -> dict[str, Tensor]:
        """Detached per-modality logits for this record, computed once and cached."""
        if self._unimodal is None:
            detached = {m: z.detach() for m, z in self.features.items()}
            with torch.no_grad(), self.autocast():
                self._unimodal = self._owner.compute_unimodal_logits(detached, present=self.present)
        return self._unimodal

    def vectors(self, detach: bool = True) -> dict[str, Tensor]:
        """One ``(N, D)`` vector per sample and modality: the features pooled by the module's
        :meth:`~lightning_balance.MultimodalMixin.pool_features` (token sequences are averaged over the tokens)."""
        return {m: self._owner.pool_features(m, z.detach() if detach else z) for m, z in self.features.items()}


def autocast_state(device_type: str) -> tuple[str, bool, Optional[torch.dtype]]:
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return (device_type, False, None)
    enabled = torch.is_autocast_enabled(device_type)
    return (device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None)


def batch_token(trainer: Any) -> Any:
    """An identifier of the batch the Trainer is processing now (training, validation, test), or ``None``
    outside a Trainer loop. Records with the same token belong to the same batch."""
    if trainer is None:
        return None
    try:
        if trainer.training:
            progress = trainer.fit_loop.epoch_loop.batch_progress
        elif trainer.sanity_checking or trainer.validating or trainer.testing:
            progress = trainer._evaluation_loop.batch_progress
        else:
            return None
        return (str(trainer.state.stage), trainer.current_epoch, progress.total.ready)
    except (AttributeError, RuntimeError):
        return None
