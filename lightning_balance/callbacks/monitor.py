"""Monitoring v1: is a modality being ignored? Per-modality validation metrics for any Lightning logger."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_balance._distributed import all_reduce_sum
from lightning_balance.callbacks.base import log_balance_metrics
from lightning_balance.functional.ogm import ogm_ratios
from lightning_balance.functional.scores import modality_scores, stack_modalities
from lightning_balance.modality import ModalityContractError, MultimodalMixin

__all__ = ["ModalityMonitor"]


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

    Accuracies are torchmetrics ``MulticlassAccuracy`` (synchronised across ranks); score sums are
    reduced with one all-reduce. The same keys with ``test_`` instead of ``val_`` are logged by
    ``trainer.test`` (and kept in ``test_results``). Values go through ``pl_module.log``, so every Lightning logger
    (CSV, TensorBoard, W&B, ...) receives the same keys. ``history`` keeps one dict per epoch (on every
    rank) for plotting.

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
        self._metrics: Optional[nn.ModuleDict] = None
        self._scores: Optional[Tensor] = None
        self._index_at_batch_start = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MultimodalMixin):
            raise ModalityContractError(
                f"ModalityMonitor needs the modality contract: make {type(pl_module).__name__} inherit "
                f"`lightning_balance.MultimodalMixin` and call `self.configure_modalities(...)`."
            )
        _ = pl_module.modalities  # raises a clear error if the module has not declared its modalities

    def _build(self, pl_module: MultimodalMixin, num_classes: int, device: torch.device) -> nn.ModuleDict:
        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, average="micro")

        metrics = nn.ModuleDict({"fused": acc()})
        for m in pl_module.modalities:
            metrics[f"uni_{m}"] = acc()
            if self.missing:
                metrics[f"without_{m}"] = acc()
        return metrics.to(device)

    # ------------------------------------------------------------------ shared by val and test
    def _epoch_start(self) -> None:
        if self._metrics is not None:
            for metric in self._metrics.values():
                metric.reset()
        self._scores = None

    @torch.no_grad()
    def _batch_end(self, pl_module: pl.LightningModule, stage: str) -> tuple[Any, dict[str, Tensor]]:
        record = pl_module.record_since(self._index_at_batch_start, "ModalityMonitor", f"{stage}_step")  # type: ignore[attr-defined]
        names = pl_module.modalities  # type: ignore[attr-defined]
        targets = record.targets
        fused = record.logits.detach()
        if self._metrics is None:
            self._metrics = self._build(pl_module, fused.shape[-1], fused.device)  # type: ignore[arg-type]
        uni = record.unimodal_logits()
        self._metrics["fused"].update(fused.float(), targets)
        for m in names:
            self._metrics[f"uni_{m}"].update(uni[m].float(), targets)
        if self.missing:
            feats = {m: z.detach() for m, z in record.features.items()}
            for m in names:
                with record.autocast():
                    without = pl_module.fuse_without(feats, m)  # type: ignore[attr-defined]
                self._metrics[f"without_{m}"].update(without.float(), targets)
        scores = modality_scores(stack_modalities(uni, names), targets)
        self._scores = scores if self._scores is None else self._scores + scores
        return record, uni

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._metrics is None or self._scores is None:
            return
        names = pl_module.modalities  # type: ignore[attr-defined]
        p = self.prefix
        values: dict[str, Tensor] = {f"{p}/{stage}_acc_fused": self._metrics["fused"].compute()}
        for m in names:
            values[f"{p}/{stage}_acc/{m}"] = self._metrics[f"uni_{m}"].compute()
            if self.missing:
                values[f"{p}/{stage}_acc_without/{m}"] = self._metrics[f"without_{m}"].compute()
        ratios = ogm_ratios(all_reduce_sum(self._scores.clone(), trainer.strategy))
        for i, m in enumerate(names):
            values[f"{p}/{stage}_score_ratio/{m}"] = ratios[i]
        if trainer.sanity_checking:
            return
        log_balance_metrics(pl_module, values, on_step=False, on_epoch=True)
        row = {"epoch": float(trainer.current_epoch)}
        row.update({k[len(p) + 1 :]: float(v) for k, v in values.items()})
        if stage == "val":
            self.history.append(row)
        else:
            self.test_results = row

    # ------------------------------------------------------------------ Lightning hooks
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._index_at_batch_start = pl_module.record_count  # type: ignore[attr-defined]

    on_test_batch_start = on_validation_batch_start

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(pl_module, "validation")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(pl_module, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
