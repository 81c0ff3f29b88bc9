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
    """Logs, after every validation epoch, how much each modality contributes.

    From the records of ``validation_step`` (which must call ``self.fuse(features, targets)``):

    * ``balance/monitor/val_acc/<m>``: accuracy of modality ``m``'s unimodal logits (the module's
      ``unimodal`` mode: split head, masking or auxiliary heads);
    * ``balance/monitor/val_acc_fused``: accuracy of the fused logits;
    * ``balance/monitor/val_acc_without/<m>``: fused accuracy with ``m`` missing (its features set
      to zero through the fusion); a value near the fused accuracy means ``m`` is ignored;
    * ``balance/monitor/val_score_ratio/<m>``: ``s_m / mean_{k≠m} s_k`` of the confidence scores
      ``s_m = Σ_i softmax(o_{m,i})[y_i]`` (the OGM-GE imbalance ratio; 1 means balanced).

    Accuracies are torchmetrics ``MulticlassAccuracy`` (synchronised across ranks); score sums are
    reduced with one all-reduce. Values go through ``pl_module.log``, so every Lightning logger
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
        self._metrics: Optional[nn.ModuleDict] = None
        self._scores: Optional[Tensor] = None
        self._index_at_batch_start = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MultimodalMixin):
            raise ModalityContractError(
                f"ModalityMonitor needs the modality contract: make {type(pl_module).__name__} inherit "
                f"`lightning_balance.MultimodalMixin` and call `self.configure_modalities(...)`."
            )
        pl_module.modalities  # raises a clear error if undeclared

    def _build(self, pl_module: MultimodalMixin, num_classes: int, device: torch.device) -> nn.ModuleDict:
        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, average="micro")

        metrics = nn.ModuleDict({"fused": acc()})
        for m in pl_module.modalities:
            metrics[f"uni_{m}"] = acc()
            if self.missing:
                metrics[f"without_{m}"] = acc()
        return metrics.to(device)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metrics is not None:
            for metric in self._metrics.values():
                metric.reset()
        self._scores = None

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._index_at_batch_start = pl_module._lb_calls  # type: ignore[attr-defined]

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        record = pl_module.balance_record  # type: ignore[attr-defined]
        if record is None or record.index == self._index_at_batch_start:
            raise ModalityContractError(
                "ModalityMonitor found no modality record for this validation batch: `validation_step` must "
                "obtain its logits with `self.fuse(features, targets)`."
            )
        if record.targets is None:
            raise ModalityContractError("ModalityMonitor needs targets: call self.fuse(features, targets) in validation_step.")
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

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._metrics is None or self._scores is None:
            return
        names = pl_module.modalities  # type: ignore[attr-defined]
        p = self.prefix
        values: dict[str, Tensor] = {f"{p}/val_acc_fused": self._metrics["fused"].compute()}
        for m in names:
            values[f"{p}/val_acc/{m}"] = self._metrics[f"uni_{m}"].compute()
            if self.missing:
                values[f"{p}/val_acc_without/{m}"] = self._metrics[f"without_{m}"].compute()
        ratios = ogm_ratios(all_reduce_sum(self._scores.clone(), trainer.strategy))
        for i, m in enumerate(names):
            values[f"{p}/val_score_ratio/{m}"] = ratios[i]
        if trainer.sanity_checking:
            return
        log_balance_metrics(pl_module, values, on_step=False, on_epoch=True)
        row = {"epoch": float(trainer.current_epoch)}
        row.update({k[len(p) + 1 :]: float(v) for k, v in values.items()})
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
