"""Gradient-Blending as a callback (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_balance._distributed import check_strategy
from lightning_balance.callbacks.base import log_balance_metrics, training_batches
from lightning_balance.functional.gblend import gblend_weights
from lightning_balance.modality import ModalityContractError, MultimodalMixin

__all__ = ["GradientBlending"]


class GradientBlending(Callback):
    r"""Online Gradient-Blending: weight the fused and unimodal losses by their overfitting-to-generalisation ratio.

    The module trains on :math:`L = w_{fused} L_{fused} + \sum_m w_m L_m` through
    :meth:`MultimodalMixin.add_unimodal_losses`; this callback sets the weights
    (:attr:`MultimodalMixin.loss_weights`). Every ``every_n_epochs`` epochs (a super-epoch), starting
    from the current joint weights, each head's branch is trained **alone** for ``estimate_epochs``
    epochs on the training data, on a copy of the model: the fused head with all encoders, and each
    modality's unimodal head with its encoder. Its loss on the training data (``L^T``) and on a
    **held-out part of the training data** (``L^V``, the datamodule's ``holdout_dataloader()``; never
    validation or test data) is measured before and after, and

    .. math::
        \Delta O_k = (L^V_k - L^T_k)_{after} - (L^V_k - L^T_k)_{before},\quad
        \Delta G_k = L^V_{k,before} - L^V_{k,after},\quad
        w_k \propto \max(\Delta G_k, 0) / \max(\Delta O_k^2, 10^{-8}),\quad \textstyle\sum_k w_k = 1.

    This is the paper's online estimate. It needs a model copy per branch, so training costs
    ``(M + 1) · estimate_epochs`` extra epochs every super-epoch. A cheaper estimate reads the heads'
    losses from the joint run itself, but there every head is trained by the blended loss, so a head
    with a small weight learns slowly, shows a small ``ΔG`` and loses more weight. That feedback loop
    is why it is not what the paper measures, and why it is not used here. Branch training uses a fresh
    optimizer of the same class and hyper-parameters as the Trainer's first optimizer, at its current
    learning rate.

    Under DDP the estimate runs on rank 0 (with rank 0's shard of the training data) and the weights are
    broadcast, so every rank trains with the same loss.

    Args:
        every_n_epochs: super-epoch length: weights are re-estimated at the start of epochs
            ``start_epoch, start_epoch + every_n_epochs, ...``.
        estimate_epochs: epochs of branch training per estimate (default: ``every_n_epochs``).
        max_batches: training batches per estimate epoch and for ``L^T`` (``None``: all).
        start_epoch: first epoch with an estimate; before it the module's own weights apply.
        allow_untested_strategy: run under a strategy outside the allow-list.
        log_metrics: log ``balance/gblend/weight/<head>``, ``.../delta_g/<head>``, ``.../delta_o/<head>``.

    State (checkpointed): the current weights and the history of estimates.
    """

    method = "gblend"

    def __init__(self, every_n_epochs: int = 10, estimate_epochs: Optional[int] = None, max_batches: Optional[int] = None,
                 start_epoch: int = 0, allow_untested_strategy: bool = False, log_metrics: bool = True) -> None:
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("start_epoch", start_epoch, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        for name, value in (("estimate_epochs", estimate_epochs), ("max_batches", max_batches)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}.")
        self.every_n_epochs = every_n_epochs
        self.estimate_epochs = estimate_epochs
        self.max_batches = max_batches
        self.start_epoch = start_epoch
        self.allow_untested_strategy = allow_untested_strategy
        self.log_metrics = log_metrics
        self.weights: Optional[dict[str, float]] = None
        self.history: list[dict[str, Any]] = []
        self._checked = False

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, MultimodalMixin):
            raise ModalityContractError(
                f"GradientBlending needs the modality contract: make {type(pl_module).__name__} inherit "
                f"`lightning_balance.MultimodalMixin` and declare its modalities."
            )
        pl_module.modalities  # noqa: B018  (raises a clear error if not declared)
        check_strategy(trainer.strategy, "GradientBlending", allow_untested=self.allow_untested_strategy)
        holdout = getattr(trainer.datamodule, "holdout_dataloader", None) if trainer.datamodule is not None else None
        if holdout is None:
            raise ModalityContractError(
                "GradientBlending measures generalisation on a held-out part of the training data: use a datamodule "
                "with holdout_dataloader() (lightning_balance's datamodules: pass holdout_fraction=0.1)."
            )
        self._checked = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.weights is not None:  # resumed: the estimate in force continues
            pl_module.loss_weights = self.weights  # type: ignore[attr-defined]

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._checked:
            return
        record = pl_module.balance_record  # type: ignore[attr-defined]
        if record is None or "objective" not in record.extras:
            raise ModalityContractError(
                "GradientBlending sets the weights of the unimodal auxiliary objectives: return "
                "`self.add_unimodal_losses(fused_loss)` from training_step."
            )
        self._checked = True

    # ------------------------------------------------------------------ the estimate
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or (epoch - self.start_epoch) % self.every_n_epochs:
            return
        heads = ["fused", *pl_module.modalities]  # type: ignore[attr-defined]
        payload = None
        if trainer.is_global_zero:
            payload = self._estimate(trainer, pl_module, heads)
        payload = trainer.strategy.broadcast(payload, src=0)
        weights, delta_g, delta_o = (torch.tensor(payload[k]) for k in ("weights", "delta_g", "delta_o"))
        self.weights = {h: float(w) for h, w in zip(heads, weights)}
        pl_module.loss_weights = self.weights  # type: ignore[attr-defined]
        self.history.append({"epoch": epoch, **{f"weight/{h}": self.weights[h] for h in heads},
                             **{f"delta_g/{h}": float(v) for h, v in zip(heads, delta_g)},
                             **{f"delta_o/{h}": float(v) for h, v in zip(heads, delta_o)}})
        if self.log_metrics:
            metrics = {f"balance/{self.method}/{k}": torch.tensor(v) for k, v in self.history[-1].items() if k != "epoch"}
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    def _estimate(self, trainer: pl.Trainer, pl_module: Any, heads: list[str]) -> dict[str, list[float]]:
        train_loader = trainer.train_dataloader
        holdout_loader = trainer.datamodule.holdout_dataloader()
        epochs = self.estimate_epochs or self.every_n_epochs
        base = _detached_copy(pl_module)
        before_t, before_v, after_t, after_v = [], [], [], []
        for head in heads:
            net = copy.deepcopy(base)
            before_t.append(self._mean_loss(net, trainer, train_loader, head, self.max_batches))
            before_v.append(self._mean_loss(net, trainer, holdout_loader, head, None))
            optimizer = _like(trainer.optimizers[0], net.parameters())
            net.train()
            for _ in range(epochs):
                for batch in training_batches(trainer, train_loader, self.max_batches):
                    optimizer.zero_grad(set_to_none=True)
                    _head_loss(net, batch, head).backward()
                    optimizer.step()
            after_t.append(self._mean_loss(net, trainer, train_loader, head, self.max_batches))
            after_v.append(self._mean_loss(net, trainer, holdout_loader, head, None))
        w, g, o = gblend_weights(*(torch.tensor(x) for x in (before_t, before_v, after_t, after_v)))
        return {"weights": w.tolist(), "delta_g": g.tolist(), "delta_o": o.tolist()}

    def _mean_loss(self, net: Any, trainer: pl.Trainer, loader: Iterable, head: str, limit: Optional[int]) -> float:
        was_training = net.training
        net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in training_batches(trainer, loader, limit):
                _, targets = net.encode_batch(batch)
                total += float(_head_loss(net, batch, head, reduction="sum"))
                count += int(targets.shape[0])
        net.train(was_training)
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "weights": self.weights, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights = state_dict.get("weights")
        self.history = list(state_dict.get("history", []))


def _head_loss(net: Any, batch: Any, head: str, reduction: str = "mean") -> Tensor:
    features, targets = net.encode_batch(batch)
    logits = net.fuse_features(features) if head == "fused" else net.compute_unimodal_logits(features)[head]
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def _detached_copy(pl_module: pl.LightningModule) -> Any:
    """A copy of the module outside the Trainer (no DDP hooks, no trainer reference)."""
    trainer = pl_module._trainer
    pl_module._trainer = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = trainer


def _like(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and hyper-parameters, at the current learning rate."""
    group = optimizer.param_groups[0]
    kwargs = {k: group[k] for k in optimizer.defaults if k in group}
    return type(optimizer)(params, **kwargs)


