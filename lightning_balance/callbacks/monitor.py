"""Monitoring v1: is a modality being ignored? Per-modality validation metrics for any Lightning logger."""

from __future__ import annotations

from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_balance._distributed import all_reduce_sum
from lightning_balance._record import ModalityRecord
from lightning_balance.callbacks.base import log_balance_metrics
from lightning_balance.functional.ogm import ogm_ratios
from lightning_balance.functional.scores import present_sums, modality_scores, stack_modalities
from lightning_balance._dtypes import accumulation_dtype as _sum_dtype
from lightning_balance.modality import ModalityContractError, MultimodalMixin

__all__ = ["ModalityMonitor"]


def sampler_layout(trainer: pl.Trainer, dataloader_idx: int) -> Optional[tuple[int, int, int]]:
    """``(W, r, n)`` when evaluation loader ``dataloader_idx`` is read through a ``DistributedSampler`` (rank
    ``r`` of ``W``, ``n`` samples in the dataset), else ``None``.

    Such a sampler (Lightning's default under DDP) pads its index list to a multiple of ``W`` by repeating the
    first indices, and rank ``r`` reads positions ``r, r+W, r+2W, ...`` of it: the ``i``-th sample a rank reads
    is position ``i·W + r``, a padding duplicate when ``i·W + r ≥ n`` (the same rule with and without shuffling)."""
    try:
        combined = trainer._evaluation_loop._combined_loader
    except (AttributeError, RuntimeError):
        return None
    loaders = getattr(combined, "flattened", None) or []
    if dataloader_idx >= len(loaders):
        return None
    sampler = getattr(loaders[dataloader_idx], "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return None
    try:
        return int(sampler.num_replicas), int(sampler.rank), len(sampler.dataset)  # type: ignore[arg-type]
    except TypeError:  # a dataset without a length
        return None


class ModalityMonitor(Callback):
    """Logs, after every validation (and test) epoch, how much each modality contributes.

    From the records of ``validation_step`` (which must call ``self.fuse(features, targets)``):

    * ``balance/monitor/val_acc/<m>``: accuracy of modality ``m``'s unimodal logits (the module's
      ``unimodal`` mode: split head, masking or auxiliary heads);
    * ``balance/monitor/val_acc_fused``: accuracy of the fused logits;
    * ``balance/monitor/val_acc_without/<m>``: fused accuracy with ``m`` missing (its features set
      to zero through the fusion); a value near the fused accuracy means ``m`` is ignored;
    * ``balance/monitor/val_score_ratio/<m>``: ``s_m / mean_{k≠m} s_k`` of the confidence scores
      ``s_m = Σ_i softmax(o_{m,i})[y_i]`` (the OGM-GE imbalance ratio; 1 means balanced).

    Which samples count: every sample whose target is not the module's ``ignore_index``, of every
    ``fuse`` call of the step (a ``validation_step`` that fuses two views counts both views' predictions);
    calls with 0 samples are skipped. Under DDP the padding duplicates of a ``DistributedSampler``
    (Lightning's default validation sampler, which repeats the first samples so that every rank has as
    many) are left out: sample ``i`` of rank ``r`` of ``W`` is a duplicate when ``i·W + r`` ≥ the
    dataset's length, so the accuracies equal those of one process on the same data.

    Accuracies are counts of correct predictions and of samples; they and the score sums are reduced
    across ranks with one all-reduce per epoch. When some features or logits are not finite (NaN/inf) a
    warning says so, once per epoch (the accuracies of such an epoch count those samples' arbitrary
    argmax). The same keys with ``test_`` instead of ``val_`` are logged by ``trainer.test`` (and kept in
    ``test_results``). Values go through ``pl_module.log``, so every Lightning logger (CSV, TensorBoard,
    W&B, ...) receives the same keys. ``history`` keeps one dict per epoch (on every rank) for plotting.

    Args:
        missing: also compute the accuracy with each modality missing (``M`` extra fusion passes).
        prefix: namespace of the logged keys.
    """

    def __init__(self, missing: bool = True, prefix: str = "balance/monitor") -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}.")
        self.missing = missing
        self.prefix = prefix.rstrip("/")
        self.history: list[dict[str, float]] = []
        self.test_results: Optional[dict[str, float]] = None
        self._sums: Optional[Tensor] = None
        self._positions: dict[int, int] = {}
        self._layouts: dict[int, Optional[tuple[int, int, int]]] = {}
        self._index_at_batch_start = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MultimodalMixin):
            raise ModalityContractError(
                f"ModalityMonitor needs the modality contract: make {type(pl_module).__name__} inherit "
                f"`lightning_balance.MultimodalMixin` and call `self.configure_modalities(...)`."
            )
        _ = pl_module.modalities  # raises a clear error if the module has not declared its modalities

    # ------------------------------------------------------------------ layout of the epoch's sums
    # [fused correct, unimodal correct x M, without-m correct x M (missing), labelled count,
    #  labelled samples that have each modality x M, score x M, samples with non-finite logits,
    #  samples with non-finite features x M]
    def _size(self, m: int) -> int:
        return 1 + m + (m if self.missing else 0) + 1 + m + m + 1 + m

    # ------------------------------------------------------------------ shared by val and test
    def _epoch_start(self) -> None:
        self._sums = None
        self._positions = {}
        self._layouts = {}

    def _subset_masks(self, names: tuple[str, ...]) -> list[int]:
        """Subsets (bit masks, bit ``b``: modality ``b`` present) whose fused predictions each batch needs,
        besides the full one (the step's own logits)."""
        full = 2 ** len(names) - 1
        return [full ^ (1 << b) for b in range(len(names))] if self.missing else []

    def _layout(self, trainer: pl.Trainer, dataloader_idx: int) -> Optional[tuple[int, int, int]]:
        if dataloader_idx not in self._layouts:
            self._layouts[dataloader_idx] = sampler_layout(trainer, dataloader_idx)
        return self._layouts[dataloader_idx]

    @torch.no_grad()
    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int,
                   stage: str) -> None:
        records = cast(MultimodalMixin, pl_module).records_since(self._index_at_batch_start, type(self).__name__, f"{stage}_step")
        if trainer.sanity_checking:
            return
        try:
            size = extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot size: the records' own size
            size = max(r.batch_size for r in records)
        start = self._positions.get(dataloader_idx, 0)
        self._positions[dataloader_idx] = start + size
        layout = self._layout(trainer, dataloader_idx)
        names = cast(MultimodalMixin, pl_module).modalities
        for view, record in enumerate(records):
            n = record.batch_size
            if n == 0:
                continue
            positions = start + torch.arange(n, device=record.logits.device)
            real = None if layout is None else positions * layout[0] + layout[1] < layout[2]
            assert record.valid is not None  # records_since checked that the records have targets
            keep = record.valid if real is None else record.valid & real
            preds = self._predictions(pl_module, record, names)
            self._record_end(pl_module, record, names, preds, keep, real, positions, view, dataloader_idx, layout)

    def _predictions(self, pl_module: pl.LightningModule, record: ModalityRecord, names: tuple[str, ...]) -> dict[int, Tensor]:
        """Argmax predictions of the full model (the step's logits) and of every subset in :meth:`_subset_masks`."""
        preds = {2 ** len(names) - 1: record.logits.detach().argmax(-1)}
        features = {m: z.detach() for m, z in record.features.items()}
        for mask in self._subset_masks(names):
            present = [m for b, m in enumerate(names) if mask >> b & 1]
            with record.autocast():
                logits = cast(MultimodalMixin, pl_module).fuse_subset(features, present, present=record.present)
            preds[mask] = logits.argmax(-1)
        return preds

    def _record_end(self, pl_module: pl.LightningModule, record: ModalityRecord, names: tuple[str, ...],
                    preds: dict[int, Tensor], keep: Tensor, real: Optional[Tensor], positions: Tensor, view: int,
                    dataloader_idx: int, layout: Optional[tuple[int, int, int]]) -> None:
        """Adds one record's counts to the epoch's sums (``keep``: labelled samples that are no padding)."""
        full = 2 ** len(names) - 1
        targets = record.valid_targets()
        uni = record.unimodal_logits()
        dtype = _sum_dtype(keep.device)

        def count(pred: Tensor, where: Tensor = keep) -> Tensor:
            return ((pred == targets) & where).sum()

        # a modality's own accuracy and score count the samples that have it
        own = {m: keep if record.present is None else keep & record.present[m] for m in names}
        counts = [count(preds[full]), *[count(uni[m].argmax(-1), own[m]) for m in names]]
        if self.missing:
            counts += [count(preds[full ^ (1 << b)]) for b in range(len(names))]
        counts.append(keep.sum())
        counts += [own[m].sum() for m in names]
        seen = torch.ones_like(keep) if real is None else real
        n = record.batch_size
        nonfinite = [(~torch.isfinite(record.logits.detach()).all(-1) & seen).sum()]
        nonfinite += [(~torch.isfinite(record.features[m].detach().reshape(n, -1)).all(-1) & seen).sum() for m in names]
        scores = modality_scores(stack_modalities(uni, names), targets, torch.stack([own[m] for m in names]))
        sums = torch.cat([torch.stack(counts).to(dtype), scores.to(dtype), torch.stack(nonfinite).to(dtype)])
        self._sums = sums if self._sums is None else self._sums + sums

    def _extra_sums(self, pl_module: pl.LightningModule, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Values a subclass sums across ranks in the monitor's one all-reduce of the epoch."""
        return torch.zeros(0, device=device, dtype=dtype)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Optional[Tensor]:
        """Reduces the epoch's sums across ranks (one all-reduce, every rank), logs; returns the reduced
        :meth:`_extra_sums` (``None`` in the sanity check)."""
        if trainer.sanity_checking:
            return None
        names = cast(MultimodalMixin, pl_module).modalities
        m = len(names)
        device = pl_module.device
        dtype = _sum_dtype(device)
        local = self._sums if self._sums is not None else torch.zeros(self._size(m), device=device, dtype=dtype)
        extras = self._extra_sums(pl_module, device, dtype)
        total = all_reduce_sum(torch.cat([local.to(device, dtype), extras]), trainer.strategy)
        sums, extras = total[: self._size(m)], total[self._size(m):]
        head = 1 + m + (m if self.missing else 0)
        correct, count = sums[:head], float(sums[head])
        present = sums[head + 1: head + 1 + m]
        scores = sums[head + 1 + m: head + 1 + 2 * m]
        nonfinite = sums[head + 1 + 2 * m:].tolist()
        where = "validation" if stage == "val" else "test"
        if any(nonfinite):
            what = [f"the logits of {int(nonfinite[0])} samples"] if nonfinite[0] else []
            what += [f"the features of {names[i]!r} of {int(c)} samples" for i, c in enumerate(nonfinite[1:]) if c]
            rank_zero_warn(f"{type(self).__name__}: non-finite values (NaN/inf) in {where} epoch "
                           f"{trainer.current_epoch}: {', '.join(what)}. The accuracies of this epoch count their "
                           f"arbitrary predictions; check the encoders and the fusion (a diverged run, fp16 overflow).")
        if count == 0:
            rank_zero_warn(f"{type(self).__name__}: no labelled {where} sample in epoch {trainer.current_epoch} "
                           f"(every target is ignore_index, or every batch is empty): nothing is logged.")
            return extras
        acc = correct / count
        p = self.prefix
        values: dict[str, Tensor] = {f"{p}/{stage}_acc_fused": acc[0]}
        absent = [name for i, name in enumerate(names) if float(present[i]) == 0]
        for i, name in enumerate(names):
            if name not in absent:  # over the labelled samples that have the modality
                values[f"{p}/{stage}_acc/{name}"] = correct[1 + i] / present[i]
            if self.missing:
                values[f"{p}/{stage}_acc_without/{name}"] = acc[1 + m + i]
        if absent:
            rank_zero_warn(f"{type(self).__name__}: no labelled {where} sample of epoch {trainer.current_epoch} has "
                           f"{absent}: their accuracy and score ratio are not logged.")
        else:
            ratios = ogm_ratios(present_sums(scores, present, sums[head]))
            for i, name in enumerate(names):
                values[f"{p}/{stage}_score_ratio/{name}"] = ratios[i]
        values = {k: v.float() for k, v in values.items()}
        log_balance_metrics(pl_module, values, on_step=False, on_epoch=True)
        row = {"epoch": float(trainer.current_epoch)}
        row.update({k[len(p) + 1:]: float(v) for k, v in values.items()})
        if stage == "val":
            self.history.append(row)
        else:
            self.test_results = row
        return extras

    # ------------------------------------------------------------------ Lightning hooks
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._index_at_batch_start = cast(MultimodalMixin, pl_module).record_count

    on_test_batch_start = on_validation_batch_start

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, batch, dataloader_idx, "validation")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, batch, dataloader_idx, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
