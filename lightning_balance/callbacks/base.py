"""Machinery shared by every gradient-editing balancing callback.

One optimizer step of a :class:`GradientBalancingCallback`:

1. ``on_train_batch_start``: remember the module's record counter, to detect a ``training_step``
   that did not call ``self.fuse(features, targets)``.
2. ``on_before_backward`` (once per micro-batch, also inside ``manual_backward``): read the step's
   :class:`~lightning_balance.modality.ModalityRecord` and add the method's per-micro-batch
   statistics (batch **sums**) to a :class:`StepStatistics`.
3. ``on_before_optimizer_step`` (once per optimizer step: after accumulation, after AMP unscaling,
   before gradient clipping): reduce all statistics across ranks with **one** all-reduce, compute
   the method's coefficients from the global statistics (identical on every rank), edit the
   gradients of the parameters that this optimizer owns, and log under ``balance/<method>/...``.

Because the statistics are sums and the edit happens once on the accumulated, all-reduced,
unscaled gradients, the result equals single-process training with the global batch.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_balance._distributed import all_reduce_sum, check_strategy
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["GradientBalancingCallback", "StepStatistics", "NonFiniteStatisticsError", "log_balance_metrics"]


class NonFiniteStatisticsError(FloatingPointError):
    """Raised when a step's reduced statistics contain NaN or infinity."""


class StepStatistics:
    """Named statistics summed over the micro-batches of one optimizer step, reduced once across ranks.

    Modelled on torchmetrics' ``add_state(..., dist_reduce_fx="sum")``: local accumulation, then a
    single collective. Every state is a sum, so micro-batches and ranks compose exactly.
    """

    def __init__(self) -> None:
        self._values: dict[str, Tensor] = {}
        #: copy the first value of each state (set False when callers hand over fresh tensors they never reuse)
        self.copy = True

    @property
    def pending(self) -> bool:
        return bool(self._values)

    def update(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            current = self._values.get(name)
            if current is None:
                self._values[name] = value.clone() if self.copy else value
            else:
                current.add_(value)

    def reduce(self, strategy: pl.strategies.Strategy) -> dict[str, Tensor]:
        """Sum every state over ranks with one all-reduce, return them, and reset."""
        names = sorted(self._values)  # identical order on every rank
        if strategy.world_size == 1:  # nothing to reduce: no flattening copy
            out, self._values = self._values, {}
            return out
        flat = torch.cat([self._values[n].reshape(-1) for n in names])
        flat = all_reduce_sum(flat, strategy)
        out, offset = {}, 0
        for n in names:
            shape = self._values[n].shape
            size = self._values[n].numel()
            out[n] = flat[offset : offset + size].reshape(shape)
            offset += size
        self._values = {}
        return out

    def reset(self) -> None:
        self._values = {}


def is_number(value: Any) -> bool:
    """A real number, not a bool (for argument validation)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_batches(trainer: pl.Trainer, loader: Any, limit: Optional[int] = None):
    """The first ``limit`` batches of ``loader`` (all if ``None``), moved to the device, for callbacks that make
    their own pass over training data (PMR's prototypes, Gradient-Blending's estimates). torch's RNG is
    forked, so a shuffling sampler replays this epoch's order and training's random stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            yield trainer.strategy.batch_to_device(batch, trainer.strategy.root_device)


def loss_scales(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, float]:
    """``(1/accumulate_grad_batches under automatic optimisation else 1, the AMP GradScaler's scale or 1)``:
    what Lightning multiplies the user's loss by before ``backward()``."""
    accumulate = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    amp = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    return accumulate, amp


def log_balance_metrics(pl_module: pl.LightningModule, metrics: dict[str, Tensor], **kwargs: Any) -> None:
    """Log through ``pl_module.log`` (any Lightning logger) unless the Trainer runs barebones."""
    trainer = pl_module._trainer
    if trainer is None or getattr(trainer, "barebones", False) or not metrics:
        return
    pl_module.log_dict(metrics, sync_dist=False, **kwargs)


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers this step (every ``log_every_n_steps``).

    ``pl_module.log`` costs ~0.5 ms per key on CPU, so per-step values are only computed for the
    steps that reach a logger.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class GradientBalancingCallback(Callback, abc.ABC):
    """Base class of callbacks that edit per-modality gradients once per optimizer step.

    Subclasses set ``method`` (the log namespace) and implement :meth:`collect` (per-micro-batch
    sums from the step record), :meth:`compute` (coefficients from the rank-reduced sums) and
    :meth:`edit` (apply them to the gradients).

    Args:
        modalities: the modalities the method acts on; ``None`` means all declared ones.
        start_epoch: first epoch (0-based, inclusive) in which the method is active.
        end_epoch: last epoch (inclusive) in which it is active; ``None`` for no end.
        nonfinite: what to do when the reduced statistics contain NaN/inf: ``"raise"`` (default) or
            ``"skip"`` the edit for that step (e.g. fp16 overflow steps that the GradScaler skips anyway).
        allow_untested_strategy: run under a strategy outside the allow-list (with a warning).
        log_metrics: log metrics under ``balance/<method>/...`` through ``pl_module.log``.
    """

    method: ClassVar[str] = "base"
    fsdp_ok: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = True
    #: ``"step"``: statistics reduced and the edit made once per optimizer step (exact under accumulation).
    #: ``"micro_batch"``: reduced before each backward and applied inside it through gradient taps
    #: (:meth:`prepare_backward`), for methods whose coefficients act on the backward pass itself.
    reduce_at: ClassVar[Literal["step", "micro_batch"]] = "step"
    #: check every reduced statistic for NaN/inf before ``compute`` (a pass over each); methods whose
    #: statistics are large (whole gradients) set False and check the scalars they derive instead
    check_finite_stats: ClassVar[bool] = True

    def __init__(
        self,
        modalities: Optional[Sequence[str]] = None,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        allow_untested_strategy: bool = False,
        log_metrics: bool = True,
    ) -> None:
        if modalities is not None:
            if isinstance(modalities, str) or not all(isinstance(m, str) for m in modalities):
                raise TypeError(f"modalities must be a list of modality names, got {modalities!r}.")
            if len(set(modalities)) != len(modalities):
                raise ValueError(f"modalities has duplicates: {list(modalities)}.")
            if len(modalities) < 2:
                raise ValueError(f"modalities must name at least two modalities to balance, got {list(modalities)}.")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}.")
        if end_epoch is not None and (not isinstance(end_epoch, int) or end_epoch < start_epoch):
            raise ValueError(f"end_epoch must be None or an int >= start_epoch ({start_epoch}), got {end_epoch!r}.")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
        self.modalities: Optional[tuple[str, ...]] = tuple(modalities) if modalities is not None else None
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.nonfinite = nonfinite
        self.allow_untested_strategy = allow_untested_strategy
        self.log_metrics = log_metrics  # not `self.log`: Lightning overwrites callback.log with pl_module.log
        self.num_edits = 0  # optimizer steps edited so far (checkpointed)
        self._stats = StepStatistics()
        self._result: Optional[dict[str, Tensor]] = None
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._index_at_batch_start = 0
        self._consumed_index = -1
        self._per_optimizer: dict[int, tuple[Any, dict[str, list[nn.Parameter]]]] = {}
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._hook_handle: Any = None
        self._enabled = False  # whether the method acts on the current batch (epoch window)

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        """Per-micro-batch statistics from the step record, as **sums** over the batch."""

    @abc.abstractmethod
    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Coefficients (and anything to log) from rank-reduced statistics; identical on every rank."""

    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        """Edit ``p.grad`` in place for the parameters in ``groups`` (modality → parameters), once per
        optimizer step (after accumulation and AMP unscaling). Required when ``reduce_at="step"``; optional
        for ``"micro_batch"`` methods, which act inside the backward pass (no edit by default)."""

    def prepare_backward(self, pl_module: MultimodalMixin, record: ModalityRecord, result: dict[str, Tensor],
                         loss_scale: float) -> None:
        """Required when ``reduce_at="micro_batch"``: fill the record's gradient taps before its backward.
        ``loss_scale`` is the factor between the user's loss and the tensor being back-propagated."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A method must override the hook its reduce_at relies on: checked when the class is defined,
        # not at the first optimizer step.
        super().__init_subclass__(**kwargs)
        if any(getattr(getattr(cls, name), "__isabstractmethod__", False) for name in ("collect", "compute")):
            return  # an intermediate abstract base
        needed = "edit" if cls.reduce_at == "step" else "prepare_backward"
        if getattr(cls, needed) is getattr(GradientBalancingCallback, needed):
            raise TypeError(f"{cls.__name__} has reduce_at={cls.reduce_at!r} and must implement {needed}().")

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalars to log, keys relative to ``balance/<method>/``."""
        return {}

    def select_parameters(self, pl_module: MultimodalMixin, modality: str) -> list[nn.Parameter]:
        """Which parameters of ``modality`` the method edits (default: its whole parameter group)."""
        return pl_module.modality_parameters(modality)

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def active_modalities(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def is_active(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not isinstance(pl_module, MultimodalMixin):
            raise ModalityContractError(
                f"{name} needs the modality contract: make {type(pl_module).__name__} inherit "
                f"`lightning_balance.MultimodalMixin` (before LightningModule) and call "
                f"`self.configure_modalities(...)` in __init__."
            )
        declared = pl_module.modalities  # raises a clear error if not declared
        chosen = self.modalities if self.modalities is not None else declared
        unknown = [m for m in chosen if m not in declared]
        if unknown:
            raise ModalityContractError(
                f"{name}(modalities={list(chosen)}) names unknown modalities {unknown}; "
                f"{type(pl_module).__name__} declares {list(declared)}."
            )
        check_strategy(trainer.strategy, name, allow_untested=self.allow_untested_strategy, fsdp_ok=self.fsdp_ok)
        self._groups = {}
        for m in chosen:
            params = self.select_parameters(pl_module, m)
            if not params:
                raise ModalityContractError(self._empty_group_message(m))
            self._groups[m] = params
        self._per_optimizer = {}
        self._stats.reset()
        self._result = None
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if hasattr(self, "tap_features") or hasattr(self, "tap_logits"):
            self._hook_handle = pl_module.register_fuse_hook(self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.reduce_at == "micro_batch" and pl_module.automatic_optimization
                and trainer.accumulate_grad_batches > 1 and getattr(self, "accumulation", "raise") == "raise"):
            raise ValueError(
                f"{type(self).__name__} acts inside each backward pass, so under accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} its coefficients would come from each micro-batch, not from "
                f"the optimizer step's batch. Train without accumulation (a larger batch), or pass "
                f"accumulation='per_micro_batch' to accept per-micro-batch coefficients."
            )

    def _empty_group_message(self, modality: str) -> str:
        return f"{type(self).__name__} selected no parameters for modality {modality!r}."

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._index_at_batch_start = pl_module.record_count  # type: ignore[attr-defined]
        self._enabled = self.is_active(trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self.is_active(trainer):
            return
        record = pl_module.record_since(  # type: ignore[attr-defined]
            self._index_at_batch_start, type(self).__name__, need_targets=self.needs_targets
        )
        if record.index == self._consumed_index:
            return  # a second backward on the same record (manual optimisation): counted once
        if not record.training:
            raise ModalityContractError(
                f"{type(self).__name__}: the latest record was made in eval mode; call self.fuse in training_step."
            )
        self._consumed_index = record.index
        self._stats.update(self.collect(pl_module, record))
        self._result = None
        if self.reduce_at == "micro_batch":
            self._result = self._reduce_and_compute(trainer, pl_module)
            if self._result is not None:
                self.prepare_backward(pl_module, record, self._result, self._loss_scale(trainer, pl_module))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self.is_active(trainer):
            self._stats.reset()
            return
        self._optimizer = optimizer
        if self.reduce_at == "step" and self._stats.pending:
            self._result = self._reduce_and_compute(trainer, pl_module)
        if self._result is None:
            return
        self.edit(self._groups_for(optimizer), self._result, pl_module.device)
        self.num_edits += 1

    def _reduce_and_compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[dict[str, Tensor]]:
        """Reduce the pending statistics across ranks (one collective), check them, compute, log."""
        stats = self._stats.reduce(trainer.strategy)
        if self.check_finite_stats and not self.statistics_finite(stats, trainer.global_step):
            return None
        result = self.compute(stats)
        if not result:
            return None  # nothing to apply this step (e.g. no prototypes yet)
        if self.log_metrics and _logs_this_step(trainer):
            log_balance_metrics(
                pl_module,
                {f"balance/{self.method}/{k}": v for k, v in self.metrics(result).items()},
                on_step=True,
                on_epoch=False,
            )
        return result

    def statistics_finite(self, stats: dict[str, Tensor], step: int) -> bool:
        """Whether all ``stats`` are finite; raises :class:`NonFiniteStatisticsError` under ``nonfinite="raise"``."""
        if bool(torch.stack([torch.isfinite(v).all() for v in stats.values()]).all()):  # one host sync
            return True
        if self.nonfinite == "raise":
            bad = [k for k, v in stats.items() if not bool(torch.isfinite(v).all())]
            raise NonFiniteStatisticsError(
                f"{type(self).__name__}: non-finite statistics {bad} at global step {step} "
                f"(NaN/inf in the unimodal logits?). Check the model's inputs and learning rate; under fp16 "
                f"pass nonfinite='skip' to skip the edit on overflow steps the GradScaler skips anyway."
            )
        return False

    @staticmethod
    def _loss_scale(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Factor between the user's loss and the tensor ``backward()`` is called on (see :func:`loss_scales`)."""
        accumulate, amp = loss_scales(trainer, pl_module)
        return accumulate * amp

    def _groups_for(self, optimizer: torch.optim.Optimizer) -> dict[str, list[nn.Parameter]]:
        cached = self._per_optimizer.get(id(optimizer))
        if cached is None or cached[0] is not optimizer:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cached = (optimizer, {m: [p for p in ps if id(p) in owned] for m, ps in self._groups.items()})
            self._per_optimizer[id(optimizer)] = cached
        return cached[1]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "num_edits": self.num_edits}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_edits = int(state_dict.get("num_edits", 0))
