"""Gradient-Blending as a callback (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020)."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_balance._distributed import all_reduce_sum, check_strategy
from lightning_balance._distributed import mean_gradients as _mean_gradients
from lightning_balance.callbacks.base import forked_rng, log_balance_metrics, separate_loader, require_contract
from lightning_balance.functional.gblend import floor_weights, gblend_weights
from lightning_balance.modality import ModalityContractError, MultimodalMixin

__all__ = ["GradientBlending"]

#: a head whose weight ends below this share of the blended loss is reported as collapsed
COLLAPSED_WEIGHT = 1e-4


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
    is why it is not what the paper measures, and why it is not used here.

    **Branch training** is the joint training with the loss of one head: a fresh copy of each of the
    Trainer's optimizers (same class, the constructor options it was built with, and each param
    group's options as they are now, so the *current* learning rate), the Trainer's
    ``accumulate_grad_batches`` and gradient clipping, in full precision. Learning-rate schedulers are
    not stepped during the estimate: the branch trains at the learning rate in force. Losses are
    cross-entropy over the samples whose target is not the module's ``ignore_index``.

    **DDP.** Every rank trains the branch copies on its own shard of the training data; once per branch
    step the gradient sums (and the numbers of labelled samples) are added across ranks in one
    all-reduce and divided by the global count, so every copy takes the step of the global batch and
    the copies stay identical. Losses are reduced as sums and counts. The estimate is therefore the
    single-process estimate on the global data, and every rank sets the same weights. The held-out
    loader is used as the datamodule returns it on each rank: unsharded, every rank evaluates all of it
    (forward passes only) and the result is its mean; sharded by the datamodule, the mean over the union.

    **Random streams.** The whole estimate runs inside ``torch.random.fork_rng`` over the CPU and the
    training device's CUDA stream: branch training draws its own shuffles and dropout masks, epoch after
    epoch, and the training run's streams are as if no estimate had run.

    Args:
        every_n_epochs: super-epoch length: weights are re-estimated at the start of epochs
            ``start_epoch, start_epoch + every_n_epochs, ...``.
        estimate_epochs: epochs of branch training per estimate (default: ``every_n_epochs``).
        max_batches: training batches (per rank) per estimate epoch and for ``L^T`` (``None``: the
            Trainer's epoch, ``limit_train_batches`` included).
        start_epoch: first epoch with an estimate; before it the module's own weights apply.
        allow_untested_strategy: run under a strategy outside the allow-list.
        log_metrics: log ``balance/gblend/weight/<head>``, ``.../delta_g/<head>``, ``.../delta_o/<head>``.
        min_weight: opt-in floor on every head's weight, in ``[0, 1/K)`` for ``K`` heads
            (:func:`~lightning_balance.functional.gblend.floor_weights`); 0 (default) keeps the paper's
            weights, where a head with ``ΔG ≤ 0`` gets about ``1e-8`` of the loss. Whenever a head's
            weight ends below ``COLLAPSED_WEIGHT = 1e-4``, a warning names it, its weight, ``ΔG`` and
            ``ΔO``, and the remedies.

    State (checkpointed): the current weights and the history of estimates.
    """

    method = "gblend"

    def __init__(self, every_n_epochs: int = 10, estimate_epochs: Optional[int] = None, max_batches: Optional[int] = None,
                 start_epoch: int = 0, allow_untested_strategy: bool = False, log_metrics: bool = True,
                 min_weight: float = 0.0) -> None:
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("start_epoch", start_epoch, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        for name, bound in (("estimate_epochs", estimate_epochs), ("max_batches", max_batches)):
            if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {bound!r}.")
        if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) or not 0.0 <= min_weight < 1 / 3:
            raise ValueError(f"min_weight must be a number in [0, 1/K) for K heads (fused + modalities, at least 3), "
                             f"got {min_weight!r}.")
        self.every_n_epochs = every_n_epochs
        self.estimate_epochs = estimate_epochs
        self.max_batches = max_batches
        self.start_epoch = start_epoch
        self.min_weight = float(min_weight)
        self.allow_untested_strategy = allow_untested_strategy
        self.log_metrics = log_metrics
        self.weights: Optional[dict[str, float]] = None
        self.history: list[dict[str, Any]] = []
        self._checked = False

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_contract(pl_module, "GradientBlending")
        heads = 1 + len(cast(MultimodalMixin, pl_module).modalities)  # raises a clear error if not declared
        if self.min_weight * heads >= 1.0:
            raise ValueError(f"min_weight={self.min_weight} leaves nothing to blend for {heads} heads: "
                             f"use min_weight < 1/{heads} = {1.0 / heads:.4g}.")
        check_strategy(trainer.strategy, "GradientBlending", allow_untested=self.allow_untested_strategy)
        holdout = (getattr(trainer.datamodule, "holdout_dataloader", None)  # type: ignore[attr-defined]
                   if trainer.datamodule is not None else None)  # type: ignore[attr-defined]
        if holdout is None:
            raise ModalityContractError(
                "GradientBlending measures generalisation on a held-out part of the training data: use a datamodule "
                "with holdout_dataloader() (lightning_balance's datamodules: pass holdout_fraction=0.1)."
            )
        self._checked = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.weights is not None:  # resumed: the estimate in force continues
            cast(MultimodalMixin, pl_module).loss_weights = self.weights

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._checked:
            return
        record = cast(MultimodalMixin, pl_module).balance_record
        if record is None or "objective" not in record.extras:
            raise ModalityContractError(
                "GradientBlending sets the weights of the unimodal auxiliary objectives: return "
                "`self.add_unimodal_losses(fused_loss)` from training_step."
            )
        self._checked = True

    # ------------------------------------------------------------------ the estimate
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The estimate runs here, on a separate loader (in epoch 0 the Trainer's iterator already exists, and a
        # persistent-worker loader would hand it out). Nothing else is built here:
        # Lightning skips this hook when it resumes inside an epoch (that epoch's estimate ran before the
        # checkpoint, and its weights are in the callback's and the module's state).
        self._maybe_estimate(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning also skips on_train_epoch_start for the epoch that follows a checkpoint taken at the last
        # batch of an epoch, and then trains that epoch from its first batch: estimate there instead.
        if batch_idx == 0:
            self._maybe_estimate(trainer, pl_module)

    def _due(self, epoch: int) -> bool:
        if epoch < self.start_epoch or (epoch - self.start_epoch) % self.every_n_epochs:
            return False
        return not (self.history and self.history[-1]["epoch"] == epoch)  # not done yet for this epoch

    def _maybe_estimate(self, trainer: pl.Trainer, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if not self._due(epoch):
            return
        heads = ["fused", *pl_module.modalities]
        with forked_rng(trainer.strategy.root_device):
            losses = self._estimate(trainer, pl_module, heads)
        raw, delta_g, delta_o = gblend_weights(*losses)
        weights = floor_weights(raw, self.min_weight)
        self.weights = {h: float(w) for h, w in zip(heads, weights)}
        pl_module.loss_weights = self.weights
        self.history.append({"epoch": epoch, **{f"weight/{h}": self.weights[h] for h in heads},
                             **{f"delta_g/{h}": float(v) for h, v in zip(heads, delta_g)},
                             **{f"delta_o/{h}": float(v) for h, v in zip(heads, delta_o)}})
        self._warn_collapsed(epoch, heads)
        if self.log_metrics:
            metrics = {f"balance/{self.method}/{k}": torch.tensor(v) for k, v in self.history[-1].items() if k != "epoch"}
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    def _warn_collapsed(self, epoch: int, heads: list[str]) -> None:
        entry = self.history[-1]
        for head in heads:
            weight = entry[f"weight/{head}"]
            if weight >= COLLAPSED_WEIGHT:
                continue
            dg, do = entry[f"delta_g/{head}"], entry[f"delta_o/{head}"]
            cause = (f"its held-out loss did not improve while its branch trained alone (ΔG = {dg:.4g} ≤ 0, "
                     f"ΔO = {do:.4g})" if dg <= 0 else
                     f"its generalisation is small next to its overfitting (ΔG = {dg:.4g}, ΔO = {do:.4g})")
            what = ("the fused head is the model's prediction, and its loss is now practically switched off"
                    if head == "fused" else f"the {head!r} head and encoder now barely learn from their own loss")
            rank_zero_warn(
                f"GradientBlending (epoch {epoch}): the weight of head {head!r} fell to {weight:.3g} because {cause}; "
                f"{what} until the next estimate at epoch {epoch + self.every_n_epochs}. A few epochs on little "
                f"held-out data give noisy ΔG: use more estimate_epochs (now {self._epochs}), a larger held-out "
                f"part (holdout_fraction), or keep a floor with GradientBlending(min_weight=0.05).",
                category=UserWarning,
            )

    @property
    def _epochs(self) -> int:
        return self.estimate_epochs or self.every_n_epochs

    def _estimate(self, trainer: pl.Trainer, pl_module: Any, heads: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(L^T before, L^V before, L^T after, L^V after)``, each ``(K,)``, identical on every rank."""
        train_loader = separate_loader(trainer.train_dataloader)  # not the Trainer's live iterator
        holdout_loader = trainer.datamodule.holdout_dataloader()  # type: ignore[attr-defined]
        ignore_index = pl_module.modality_spec.ignore_index
        limit = self.max_batches
        if limit is None and math.isfinite(trainer.num_training_batches):
            limit = int(trainer.num_training_batches)  # the training epoch (limit_train_batches)
        base = _detached_copy(pl_module)
        before, after = [], []
        for head in heads:
            net = copy.deepcopy(base)
            before.append(self._measure(trainer, net, head, train_loader, holdout_loader, ignore_index, limit))
            self._train_branch(trainer, pl_module, net, head, train_loader, ignore_index, limit)
            after.append(self._measure(trainer, net, head, train_loader, holdout_loader, ignore_index, limit))
        before_t, before_v = torch.stack(before).unbind(1)
        after_t, after_v = torch.stack(after).unbind(1)
        return before_t, before_v, after_t, after_v

    def _measure(self, trainer: pl.Trainer, net: Any, head: str, train_loader: Iterable, holdout_loader: Iterable,
                 ignore_index: int, limit: Optional[int]) -> Tensor:
        """``(L^T, L^V)``: mean losses over the labelled samples of all ranks (sums and counts, one all-reduce)."""
        was_training = net.training
        net.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=trainer.strategy.root_device)
        with torch.no_grad():
            for i, (loader, n) in enumerate(((train_loader, limit), (holdout_loader, None))):
                for batch in _batches(trainer, loader, n):
                    total, count = _head_loss(net, batch, head, ignore_index)
                    sums[2 * i] += total.double()
                    sums[2 * i + 1] += count
        net.train(was_training)
        sums = all_reduce_sum(sums, trainer.strategy).cpu()
        if sums[3] == 0:
            raise ModalityContractError(
                "GradientBlending: the held-out loader gave no labelled sample for a head (every target is "
                "ignore_index, no held-out sample has the head's modality, or the loader is empty); it needs a "
                "held-out part of the training data with labels (holdout_fraction=0.1)."
            )
        return sums[0::2] / sums[1::2].clamp_min(1)

    def _train_branch(self, trainer: pl.Trainer, pl_module: Any, net: Any, head: str, loader: Iterable,
                      ignore_index: int, limit: Optional[int]) -> None:
        """``estimate_epochs`` epochs of one head's loss on ``net``, with copies of the Trainer's optimizers."""
        copy_of = {id(p): q for p, q in zip(pl_module.parameters(), net.parameters())}
        optimizers = [o for o in (_rebuild_optimizer(opt, copy_of) for opt in trainer.optimizers) if o is not None]
        if not optimizers:
            raise ModalityContractError("GradientBlending trains copies of the model with the Trainer's optimizers, "
                                        "but no optimizer holds any of the module's parameters.")
        params = list({id(p): p for o in optimizers for g in o.param_groups for p in g["params"]}.values())
        automatic = pl_module.automatic_optimization
        accumulate = trainer.accumulate_grad_batches if automatic else 1
        clip_val = trainer.gradient_clip_val if automatic else None
        clip_by_value = trainer.gradient_clip_algorithm == "value"  # a str enum: str() of it is its name
        strategy = trainer.strategy
        device = strategy.root_device
        with_closure = [_needs_closure(o) for o in optimizers]
        net.train()
        for _ in range(self._epochs):
            batches = _batches(trainer, loader, limit)
            while True:
                window = list(islice(batches, accumulate))
                if not window and strategy.world_size == 1:  # type: ignore[attr-defined]
                    break
                active = [False]

                def closure(window: list[Any] = window, active: list[bool] = active) -> Tensor:
                    # gradient of the window's mean loss over the labelled samples of every rank
                    for o in optimizers:
                        o.zero_grad(set_to_none=True)
                    scalars = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, count, active
                    scalars[2] = float(bool(window))
                    for batch in window:
                        loss_sum, count = _head_loss(net, batch, head, ignore_index)
                        loss_sum.backward()
                        scalars[0] += loss_sum.detach().double()
                        scalars[1] += count
                    scalars = _mean_gradients(params, scalars, strategy)
                    active[0] = bool(scalars[2] > 0)
                    return (scalars[0] / scalars[1].clamp_min(1)).float()

                closure()
                if not active[0]:
                    break  # every rank has run out of batches (under DDP a rank with fewer still takes part)
                for o, needs_closure in zip(optimizers, with_closure):
                    if clip_val:
                        owned = [p for g in o.param_groups for p in g["params"] if p.grad is not None]
                        if clip_by_value:
                            torch.nn.utils.clip_grad_value_(owned, clip_val)
                        else:
                            torch.nn.utils.clip_grad_norm_(owned, clip_val)
                    if needs_closure:
                        o.step(closure)  # type: ignore[arg-type]  # torch types a closure as returning a float
                    else:
                        o.step()
        for o in optimizers:
            o.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "weights": self.weights, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights = state_dict.get("weights")
        self.history = list(state_dict.get("history", []))


def _head_loss(net: Any, batch: Any, head: str, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Sum of one head's cross-entropy over the batch's labelled samples (that have the head's modality), and
    their number (no host sync)."""
    features, targets, present = net.encoded_batch(batch)
    if head == "fused":  # through the contract (the fill, and the mask for a fusion that takes it)
        logits = net.fuse_subset(features, net.modalities, present)
    else:
        logits = net.compute_unimodal_logits(features, present=present)[head]
        if present is not None:  # a head's loss over the samples that have its modality
            targets = torch.where(present[head], targets, torch.full_like(targets, ignore_index))
    loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return loss, (targets != ignore_index).sum()


def _batches(trainer: pl.Trainer, loader: Iterable, limit: Optional[int]) -> Iterator[Any]:
    """The first ``limit`` batches of ``loader`` (all if ``None``), on the training device. Unlike
    ``callbacks.base.training_batches`` it does not fork the random streams: the whole estimate runs
    inside one fork, so successive branch epochs draw fresh shuffles."""
    for batch in (loader if limit is None else islice(loader, limit)):
        yield trainer.strategy.batch_to_device(batch, trainer.strategy.root_device)


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (``LBFGS``)."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _detached_copy(pl_module: pl.LightningModule) -> Any:
    """A copy of the module outside the Trainer (no DDP hooks, no trainer reference)."""
    trainer = pl_module._trainer
    pl_module._trainer = None
    try:
        return copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = trainer


def _constructor_options(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``optimizer.defaults`` that the optimizer's constructor takes as arguments (torch's
    ``AdamW`` keeps ``decoupled_weight_decay`` in its defaults, but its constructor has no such argument)."""
    try:
        signature = inspect.signature(cls.__init__)  # type: ignore[misc]
    except (TypeError, ValueError):
        return {}
    named = list(signature.parameters.values())[2:]  # self, params
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: copy.deepcopy(defaults[p.name]) for p in named if p.kind in kinds and p.name in defaults}


def _rebuild_optimizer(optimizer: torch.optim.Optimizer, copy_of: dict[int, torch.nn.Parameter]) -> Optional[torch.optim.Optimizer]:
    """A fresh optimizer of the same class over the copies of its parameters (``copy_of``: id of an
    original parameter -> its copy), with no state: the constructor's options from ``optimizer.defaults``,
    and every param group's options as they are now (its current learning rate, its own weight decay...).
    Parameters without a copy are left out; ``None`` if none has one."""
    groups = []
    for group in optimizer.param_groups:
        params = [copy_of[id(p)] for p in group["params"] if id(p) in copy_of]
        if params:
            groups.append({"params": params, **{k: copy.deepcopy(v) for k, v in group.items() if k != "params"}})
    if not groups:
        return None
    cls = type(optimizer)
    try:
        return cls(groups, **_constructor_options(cls, optimizer.defaults))
    except Exception as err:  # a custom optimizer with an unusual constructor
        raise ModalityContractError(
            f"GradientBlending trains each branch with a fresh copy of the Trainer's optimizer, but "
            f"{cls.__name__} could not be rebuilt from its param groups and constructor options "
            f"({type(err).__name__}: {err}). Its constructor should accept `params` as a list of param groups and "
            f"take its options as keyword arguments named as in `optimizer.defaults`."
        ) from err

