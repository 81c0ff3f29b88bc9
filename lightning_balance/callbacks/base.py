"""Machinery shared by every gradient-editing balancing callback.

One optimizer step of a :class:`GradientBalancingCallback`:

1. ``on_train_batch_start``: begin the method's epoch if it has not begun in this process (also after a
   resume inside an epoch), remember the module's record counter, to detect a ``training_step`` that
   did not call ``self.fuse(features, targets)``, and whether the step is in the method's window.
2. ``on_before_backward`` (once per micro-batch, also inside ``manual_backward``): read every
   :class:`~lightning_balance.modality.ModalityRecord` of the step and add the method's statistics
   (sums over the valid samples) to a :class:`StepStatistics`.
3. ``on_before_optimizer_step`` (once per optimizer step: after accumulation, after AMP unscaling,
   before gradient clipping): unless the GradScaler will skip the step (fp16 overflow), reduce all
   statistics across ranks with **one** all-reduce, compute the method's coefficients from the global
   statistics (identical on every rank), edit the gradients of the parameters that this optimizer owns,
   commit the once-per-step state, and log under ``balance/<method>/...``.

Several methods in one Trainer run as one pipeline (one all-reduce, edits in a declared order), so
the order of the ``callbacks`` list does not matter.

Because the statistics are sums and the edit happens once on the accumulated, all-reduced,
unscaled gradients, the result equals single-process training with the global batch.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal, Optional, TypeGuard, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
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
        if strategy.world_size == 1:  # type: ignore[attr-defined]  # nothing to reduce: no flattening copy
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


def is_number(value: Any) -> TypeGuard[Union[int, float]]:
    """A real number, not a bool (for argument validation)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def forked_rng(device: torch.device) -> Any:
    """``torch.random.fork_rng`` over the CPU stream and, on CUDA, the stream of the training ``device``: work
    inside it (a callback's own pass over data, branch training) leaves the training run's random streams
    untouched."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    return torch.random.fork_rng(devices=[])


def separate_loader(loader: Any) -> Any:
    """A loader over the same data, sampler and collation as ``loader`` that a callback can iterate while the
    Trainer holds ``loader``'s own iterator. A ``DataLoader`` with ``persistent_workers=True`` hands out (and
    resets) the one iterator the Trainer is using, so iterating it from a callback would consume the epoch's
    batches; the copy loads in the main process instead. Other loaders are returned as they are."""
    if not isinstance(loader, torch.utils.data.DataLoader) or not getattr(loader, "persistent_workers", False):
        return loader
    common: dict[str, Any] = dict(collate_fn=loader.collate_fn, num_workers=0, pin_memory=loader.pin_memory)
    if loader.batch_sampler is not None:
        return torch.utils.data.DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
                                       sampler=loader.sampler, **common)


def require_contract(pl_module: Any, owner: str) -> tuple[str, ...]:
    """The module's declared modalities; a clear error if it does not implement the modality contract."""
    if not isinstance(pl_module, MultimodalMixin):
        raise ModalityContractError(
            f"{owner} needs the modality contract: make {type(pl_module).__name__} inherit "
            f"`lightning_balance.MultimodalMixin` (before LightningModule) and call "
            f"`self.configure_modalities(...)` in __init__."
        )
    return pl_module.modalities  # raises a clear error if not declared


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradient for a callback's own pass; afterwards every submodule gets back the mode it had
    (a submodule the user keeps in eval, a frozen BatchNorm, stays in eval), as Lightning's evaluation loop does."""
    modes = {name: m.training for name, m in module.named_modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for name, m in module.named_modules():
            if name in modes:
                m.training = modes[name]


@contextlib.contextmanager
def precision_forward(trainer: pl.Trainer) -> Iterator[None]:
    """The Trainer's precision for a forward pass a callback makes itself (autocast under ``16-mixed`` /
    ``bf16-mixed``; nothing to do under true precisions, whose inputs :func:`training_batches` converts)."""
    with trainer.precision_plugin.forward_context():
        yield


def training_batches(trainer: pl.Trainer, loader: Any, limit: Optional[int] = None):
    """The first ``limit`` batches of ``loader`` (all if ``None``), moved to the device, for callbacks that make
    their own pass over training data (PMR's prototypes, Gradient-Blending's estimates). torch's RNG is
    forked (the CPU stream and the stream of the training device), so training's random streams are
    untouched; a shuffling sampler called at an epoch's start replays that epoch's order (except in the
    first epoch, whose order Lightning draws before the epoch starts)."""
    with forked_rng(trainer.strategy.root_device):
        for i, batch in enumerate(separate_loader(loader)):
            if limit is not None and i >= limit:
                break
            batch = trainer.strategy.batch_to_device(batch, trainer.strategy.root_device)
            yield trainer.precision_plugin.convert_input(batch)  # bf16-true / 64-true: the inputs' dtype


def loss_scales(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, float]:
    """``(1/accumulate_grad_batches under automatic optimisation else 1, the AMP GradScaler's scale or 1)``:
    what Lightning multiplies the user's loss by before ``backward()``."""
    accumulate = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    amp = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    return accumulate, amp


# The library logs epoch-level values that are already reduced across ranks (identical on every rank), so
# with sync_dist=False: Lightning's advice to sync them (once per key and fit) is silenced for our keys only.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('balance/", category=PossibleUserWarning)


def log_balance_metrics(pl_module: pl.LightningModule, metrics: dict[str, Tensor], **kwargs: Any) -> None:
    """Log through ``pl_module.log`` (any Lightning logger) unless the Trainer runs barebones. The values are
    the library's reduced statistics, the same on every rank: they are logged without ``sync_dist``."""
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


_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor")


def optimizer_step_skipped(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer step about to run will be skipped by the AMP GradScaler (inf/NaN found when
    the gradients were unscaled: fp16 overflow). Identical on every DDP rank (the gradients are all-reduced).

    Read in ``on_before_optimizer_step``, after Lightning's ``scaler.unscale_(optimizer)``: one host sync,
    the one ``scaler.step`` makes anyway. For optimizers that unscale inside their own ``step`` (fused
    ones), the gradients are checked directly.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    found = state.get("found_inf_per_device") if state else None
    if found:
        return bool(sum(v.item() for v in found.values()))
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return False
    return not bool(torch.stack([torch.isfinite(n) for n in torch._foreach_norm(grads)]).all())


def reduce_jointly(stats: Sequence[StepStatistics], strategy: pl.strategies.Strategy) -> list[dict[str, Tensor]]:
    """Reduce the pending statistics of several callbacks with **one** all-reduce (stacked methods share
    the step's single collective); returns each one's reduced states, in order, and resets them."""
    if len(stats) == 1 or strategy.world_size == 1:  # type: ignore[attr-defined]
        return [s.reduce(strategy) for s in stats]
    merged = StepStatistics()
    merged.copy = False
    for i, s in enumerate(stats):
        merged._values.update({f"{i:03d}/{k}": v for k, v in s._values.items()})
        s.reset()
    flat = merged.reduce(strategy)
    out: list[dict[str, Tensor]] = [{} for _ in stats]
    for key, value in flat.items():
        position, name = key.split("/", 1)
        out[int(position)][name] = value
    return out


class GradientBalancingCallback(Callback, abc.ABC):
    """Base class of callbacks that edit per-modality gradients once per optimizer step.

    Subclasses set ``method`` (the log namespace) and implement :meth:`collect` (per-micro-batch
    sums from the step's records), :meth:`compute` (coefficients from the rank-reduced sums) and
    :meth:`edit` (apply them to the gradients), and optionally :meth:`commit_step` (state that changes
    once per optimizer step) and :meth:`begin_epoch` (epoch-level state).

    **Stacking.** Several of these callbacks in one Trainer run as one pipeline, whatever their order in
    the ``callbacks`` list: every method collects its statistics from the step's records before any
    method fills a gradient tap; the statistics of all methods are reduced across ranks in one
    all-reduce; then the edits run in the methods' declared :attr:`edit_order` (MMPareto's merge of the
    loss gradients first, since it needs them as the loss produced them; then OGM-GE's modulation; then
    InfoReg's proximal term and Fisher trace; AGM's clip rule last, as Lightning's own clipping comes
    after these hooks). Both list orders give the same result.

    **Overflow steps.** Under fp16 AMP, a step on which the GradScaler found inf/NaN gradients (and will
    skip ``optimizer.step``) is recognised: no method edits, commits state, counts an edit, or raises on it.

    **Windows.** ``start_epoch``/``end_epoch`` and ``start_step``/``end_step`` (optimizer steps, i.e.
    ``trainer.global_step``) both bound when the method edits gradients. ``epoch_length`` makes the
    method's epoch-level schedule (its windows, and epoch-level state such as prototypes or a trace
    history) count blocks of that many optimizer steps instead of the Trainer's epochs: for training by
    steps (``max_steps``, an iterable loader, one long epoch). A method that never edited during a fit
    warns at its end.

    Args:
        modalities: the modalities the method acts on; ``None`` means all declared ones.
        start_epoch: first epoch (0-based, inclusive) in which the method is active.
        end_epoch: last epoch (inclusive) in which it is active; ``None`` for no end.
        start_step: first optimizer step (``trainer.global_step``, inclusive) in which it is active.
        end_step: last optimizer step (inclusive); ``None`` for no end.
        epoch_length: optimizer steps per "epoch" of the method's schedule; ``None``: the Trainer's epochs.
        nonfinite: what to do when the reduced statistics contain NaN/inf on a step that is not an AMP
            overflow step: ``"raise"`` (default) or ``"skip"`` the edit for that step.
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
    #: position of the method's edit in the pipeline of stacked methods (lower runs first)
    edit_order: ClassVar[int] = 50
    #: collect, compute and commit also on steps outside the active window (for statistics the official
    #: method keeps over the whole run: AGM's running means, InfoReg's Fisher trace); ``edit`` and the
    #: gradient taps stay inside the window
    observe_outside_window: bool = False
    #: the method was designed and published with SGD: warn when it is paired with an adaptive optimizer
    designed_for_sgd: ClassVar[bool] = False
    #: the method's statistics count a modality only where it is present (``fuse(..., present=...)``);
    #: a method without it refuses records with a presence mask, with :attr:`absence_refusal` as the reason
    supports_absence: ClassVar[bool] = True
    absence_refusal: ClassVar[str] = ""
    #: the method edits each modality's parameter group; a method that does not (modality dropout) needs no
    #: non-empty selection, skips the checks of the optimizer it would edit with, and never warns "never edited"
    edits_gradients: ClassVar[bool] = True
    #: how many modalities ``modalities=`` must name (balancing needs two; dropping one modality is a recipe)
    min_modalities: ClassVar[int] = 2

    def __init__(
        self,
        modalities: Optional[Sequence[str]] = None,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        allow_untested_strategy: bool = False,
        log_metrics: bool = True,
        start_step: int = 0,
        end_step: Optional[int] = None,
        epoch_length: Optional[int] = None,
    ) -> None:
        if modalities is not None:
            if isinstance(modalities, str) or not all(isinstance(m, str) for m in modalities):
                raise TypeError(f"modalities must be a list of modality names, got {modalities!r}.")
            if len(set(modalities)) != len(modalities):
                raise ValueError(f"modalities has duplicates: {list(modalities)}.")
            if len(modalities) < self.min_modalities:
                raise ValueError(f"modalities must name at least {self.min_modalities} modalities to balance, got "
                                 f"{list(modalities)}.")
        for name, low, high in (("epoch", start_epoch, end_epoch), ("step", start_step, end_step)):
            if isinstance(low, bool) or not isinstance(low, int) or low < 0:
                raise ValueError(f"start_{name} must be an int >= 0, got {low!r}.")
            if high is not None and (isinstance(high, bool) or not isinstance(high, int) or high < low):
                raise ValueError(f"end_{name} must be None or an int >= start_{name} ({low}), got {high!r}.")
        if epoch_length is not None and (isinstance(epoch_length, bool) or not isinstance(epoch_length, int)
                                         or epoch_length < 1):
            raise ValueError(f"epoch_length must be None or an int >= 1 (optimizer steps), got {epoch_length!r}.")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
        self.modalities: Optional[tuple[str, ...]] = tuple(modalities) if modalities is not None else None
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.start_step = start_step
        self.end_step = end_step
        self.epoch_length = epoch_length
        self.nonfinite = nonfinite
        self.allow_untested_strategy = allow_untested_strategy
        self.log_metrics = log_metrics  # not `self.log`: Lightning overwrites callback.log with pl_module.log
        self.num_edits = 0  # optimizer steps edited so far (each optimizer's step counts; checkpointed)
        self.num_skipped = 0  # AMP overflow steps seen (not checkpointed: a diagnostic)
        self._stats = StepStatistics()
        self._result: Optional[dict[str, Tensor]] = None
        #: whether the global batch of the step being computed has a labelled sample (set before ``compute``)
        self.step_has_labels = True
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._index_at_batch_start = 0
        self._consumed_index = -1
        self._records: list[ModalityRecord] = []
        self._per_optimizer: dict[int, tuple[Any, dict[str, list[nn.Parameter]]]] = {}
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._hook_handle: Any = None
        self._enabled = False  # whether the method acts on the current batch (its window)
        self._begun_epoch: Optional[int] = None  # the method epoch whose begin_epoch has run in this process

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        """Per-record statistics, as **sums** over the record's (valid) samples; a step's records, micro-batches
        and ranks are summed before :meth:`compute`."""

    @abc.abstractmethod
    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Coefficients (and anything to log) from rank-reduced statistics; identical on every rank.
        Must not change the callback's state: state that changes once per optimizer step is changed in
        :meth:`commit_step`, which is not called on AMP overflow steps."""

    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        """Edit ``p.grad`` in place for the parameters in ``groups`` (modality → parameters), once per
        optimizer step (after accumulation and AMP unscaling), inside the active window (methods with
        ``observe_outside_window`` are called on every step and check :attr:`is_editing`). Required when
        ``reduce_at="step"``; optional for ``"micro_batch"`` methods, which act inside the backward pass."""

    def commit_step(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device,
                    active: bool) -> None:
        """Once per optimizer step that is not skipped, after every method's edit: update the state the
        method keeps across steps (running means, traces). ``active``: whether the step was in the window."""

    def discard_step(self) -> None:
        """The optimizer step is skipped (AMP overflow): drop anything :meth:`compute` prepared for
        :meth:`commit_step` (the callback's state must stay as it was before the step)."""

    def prepare_backward(self, pl_module: MultimodalMixin, record: ModalityRecord, result: dict[str, Tensor],
                         loss_scale: float) -> None:
        """Required when ``reduce_at="micro_batch"``: fill the record's gradient taps before its backward
        (called for every record of the micro-batch). ``loss_scale`` is the factor between the user's loss
        and the tensor being back-propagated."""

    def begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Epoch-level state at the start of the method's ``epoch`` (see ``epoch_length``). Called before the
        first batch of each epoch, also when a run resumes inside an epoch (Lightning then skips
        ``on_train_epoch_start``): state loaded from the checkpoint must be kept, not rebuilt."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A method must override the hook its reduce_at relies on: checked when the class is defined,
        # not at the first optimizer step.
        super().__init_subclass__(**kwargs)
        if any(getattr(getattr(cls, name), "__isabstractmethod__", False) for name in ("collect", "compute")):
            return  # an intermediate abstract base
        needed = "edit" if cls.reduce_at == "step" else "prepare_backward"
        if cls.edits_gradients and getattr(cls, needed) is getattr(GradientBalancingCallback, needed):
            raise TypeError(f"{cls.__name__} has reduce_at={cls.reduce_at!r} and must implement {needed}().")

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalars to log, keys relative to ``balance/<method>/``."""
        return {}

    def acted(self, result: dict[str, Tensor]) -> bool:
        """Whether a step with this ``result`` changed training (counted in ``num_edits``)."""
        return True

    def select_parameters(self, pl_module: MultimodalMixin, modality: str) -> list[nn.Parameter]:
        """Which parameters of ``modality`` the method edits (default: its whole parameter group)."""
        return pl_module.modality_parameters(modality)

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def active_modalities(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def method_epoch(self, trainer: pl.Trainer) -> int:
        """The epoch of the method's schedule: the Trainer's epoch, or ``global_step // epoch_length``."""
        if self.epoch_length is None:
            return trainer.current_epoch
        return trainer.global_step // self.epoch_length

    def is_active(self, trainer: pl.Trainer) -> bool:
        """Whether the current optimizer step is inside the method's window (epochs and steps)."""
        epoch, step = self.method_epoch(trainer), trainer.global_step
        return (epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)
                and step >= self.start_step and (self.end_step is None or step <= self.end_step))

    @property
    def is_editing(self) -> bool:
        """Whether the current step is in the method's window (set at each batch start)."""
        return self._enabled

    def _observing(self, trainer: pl.Trainer) -> bool:
        return self._enabled or self.observe_outside_window

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        declared = require_contract(pl_module, name)
        chosen = self.modalities if self.modalities is not None else declared
        unknown = [m for m in chosen if m not in declared]
        if unknown:
            import difflib

            hints = [f"{u!r} -> {close[0]!r}?" for u in unknown
                     if (close := difflib.get_close_matches(u, list(declared), n=1))]
            raise ModalityContractError(
                f"{name}(modalities={list(chosen)}) names unknown modalities {unknown}; "
                f"{type(pl_module).__name__} declares {list(declared)}"
                f"{' (did you mean ' + ', '.join(hints) + ')' if hints else ''}. The names are checked against the "
                f"module's configure_modalities(...) when the fit starts, not when the callback is built."
            )
        check_strategy(trainer.strategy, name, allow_untested=self.allow_untested_strategy, fsdp_ok=self.fsdp_ok)
        self._groups = {}
        for m in chosen:
            params = self.select_parameters(cast(MultimodalMixin, pl_module), m)  # require_contract checked it
            if not params and self.edits_gradients:
                raise ModalityContractError(self._empty_group_message(m))
            self._groups[m] = params
        self._per_optimizer = {}
        self._stats.reset()
        self._result = None
        self._begun_epoch = None
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if any(hasattr(self, tap) for tap in ("tap_presence", "tap_inputs", "tap_features", "tap_logits")):
            self._hook_handle = cast(MultimodalMixin, pl_module).register_fuse_hook(self)

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
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.edits_gradients and scaler is not None and scaler.is_enabled():
            fused = [type(o).__name__ for o in trainer.optimizers if getattr(o, "_step_supports_amp_scaling", False)]
            if fused:
                raise ValueError(
                    f"{type(self).__name__} edits unscaled gradients, but {', '.join(fused)} unscales them inside its "
                    f"own step (fused=True), so under fp16 AMP the gradients it would see are still multiplied by the "
                    f"loss scale (Lightning refuses its own gradient clipping here for the same reason). Create the "
                    f"optimizer with fused=False (the default foreach implementation), or train in bf16 or fp32."
                )
        if self.designed_for_sgd:
            adaptive = sorted({type(o).__name__ for o in trainer.optimizers if type(o).__name__ in _ADAPTIVE})
            if adaptive:
                rank_zero_warn(
                    f"{type(self).__name__} was designed and published with SGD (momentum 0.9), and you train with "
                    f"{', '.join(adaptive)}. An adaptive optimizer divides each gradient by its running magnitude, "
                    f"which largely cancels a slowly varying per-modality factor; in our trials the method then "
                    f"hurt accuracy. Prefer SGD with this method, or a method that adds a learning signal "
                    f"(MMPareto, unimodal losses, CML, UMT). See docs/which_method.md.",
                    category=UserWarning,
                )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.edits_gradients and self.num_edits == 0 and not trainer.interrupted:
            window = f"start_epoch={self.start_epoch}, end_epoch={self.end_epoch}"
            if self.start_step or self.end_step is not None:
                window += f", start_step={self.start_step}, end_step={self.end_step}"
            rank_zero_warn(
                f"{type(self).__name__} never edited a gradient in this fit ({window}; the fit ran "
                f"{trainer.current_epoch} epoch(s), {trainer.global_step} optimizer step(s)"
                f"{'' if self.epoch_length is None else f', epoch_length={self.epoch_length}'}). If the window lies "
                f"beyond the fit, move it or train longer; if you train by steps (max_steps, an iterable loader, "
                f"one long epoch), give the window in steps (start_step/end_step) or set epoch_length.",
                category=UserWarning,
            )

    def _empty_group_message(self, modality: str) -> str:
        return f"{type(self).__name__} selected no parameters for modality {modality!r}."

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_begin_epoch(trainer, pl_module)

    def _maybe_begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = self.method_epoch(trainer)
        if self._begun_epoch != epoch:
            self._begun_epoch = epoch
            self.begin_epoch(trainer, pl_module, epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._maybe_begin_epoch(trainer, pl_module)  # a mid-epoch resume or a new block of epoch_length steps
        self._index_at_batch_start = cast(MultimodalMixin, pl_module).record_count
        self._result = None
        self._enabled = self.is_active(trainer)

    # ------------------------------------------------------------------ the pipeline of stacked methods
    @staticmethod
    def _pipeline(trainer: pl.Trainer) -> list[GradientBalancingCallback]:
        peers = [cb for cb in trainer.callbacks if isinstance(cb, GradientBalancingCallback)]  # type: ignore[attr-defined]
        order = {id(cb): i for i, cb in enumerate(peers)}
        return sorted(peers, key=lambda cb: (cb.edit_order, order[id(cb)]))

    def _leads(self, trainer: pl.Trainer) -> bool:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]  # Lightning calls callbacks in list order: the first one runs the pipeline
            if isinstance(cb, GradientBalancingCallback):
                return cb is self
        return False

    def _new_records(self, pl_module: pl.LightningModule) -> list[ModalityRecord]:
        since = max(self._index_at_batch_start, self._consumed_index)
        if cast(MultimodalMixin, pl_module).record_count <= since:
            if self._consumed_index > self._index_at_batch_start:
                return []  # a second backward on records already counted (manual optimisation)
        records = cast(MultimodalMixin, pl_module).records_since(
            since, type(self).__name__, need_targets=self.needs_targets
        )
        if not all(r.training for r in records):
            raise ModalityContractError(
                f"{type(self).__name__}: the step's record was made in eval mode; call self.fuse in training_step."
            )
        if not self.supports_absence and any(r.present is not None for r in records):
            raise ModalityContractError(
                f"{type(self).__name__} does not handle absent modalities: {self.absence_refusal} The step's "
                f"fuse(..., present=...) marks some samples as lacking a modality. Train this method on complete "
                f"samples, or use a method that supports absence (docs/design.md)."
            )
        self._consumed_index = records[-1].index
        return records

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self._leads(trainer):
            return
        pipeline = [cb for cb in self._pipeline(trainer) if cb._observing(trainer)]
        for cb in pipeline:  # 1. every method collects before any method fills a tap
            cb._records = cb._new_records(pl_module)
            for record in cb._records:
                cb._stats.update(cb.collect(pl_module, record))  # type: ignore[arg-type]
        micro = [cb for cb in pipeline if cb.reduce_at == "micro_batch" and cb._records and cb._stats.pending]
        if not micro:
            return
        reduced = reduce_jointly([cb._stats for cb in micro], trainer.strategy)  # 2. one collective
        for cb, stats in zip(micro, reduced):  # 3. coefficients, then the taps of every record
            cb._result = cb._compute_checked(trainer, pl_module, stats)
            if cb._result is not None and cb._enabled:
                scale = cb._loss_scale(trainer, pl_module)
                for record in cb._records:
                    cb.prepare_backward(pl_module, record, cb._result, scale)  # type: ignore[arg-type]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self._leads(trainer):
            return
        pipeline = self._pipeline(trainer)
        if optimizer_step_skipped(trainer, optimizer):
            for cb in pipeline:  # the scaler skips this step: leave every method's state as it was
                cb._stats.reset()
                cb._result = None
                cb.discard_step()
                cb.num_skipped += 1
            return
        pipeline = [cb for cb in pipeline if cb._observing(trainer)]
        step = [cb for cb in pipeline if cb.reduce_at == "step" and cb._stats.pending]
        if step:
            reduced = reduce_jointly([cb._stats for cb in step], trainer.strategy)
            for cb, stats in zip(step, reduced):
                cb._result = cb._compute_checked(trainer, pl_module, stats)
        for cb in pipeline:  # edits in the declared order, then each method's once-per-step state
            if cb._result is None:
                continue
            cb._optimizer = optimizer
            cb.edit(cb._groups_for(optimizer), cb._result, pl_module.device)  # outside the window only for
            cb.num_edits += int(cb._enabled and cb.acted(cb._result))  # observe_outside_window methods
        for cb in pipeline:  # per optimizer (its own parameters); once-per-step state must be idempotent here
            if cb._result is not None:
                cb.commit_step(cb._groups_for(optimizer), cb._result, pl_module.device, cb._enabled)

    def _compute_checked(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                         stats: dict[str, Tensor]) -> Optional[dict[str, Tensor]]:
        """Check the reduced statistics, compute the coefficients, log them. Before ``compute``,
        :attr:`step_has_labels` says whether the global batch has a labelled sample (``stats["count"] > 0``;
        a batch whose targets are all ``ignore_index`` has none), and, for a per-modality ``count`` ``(M,)``,
        one that has each modality (a batch where no sample has some modality gives no evidence to compare
        it with the others): methods then give a neutral result."""
        checks = []
        if self.check_finite_stats and stats:
            checks.append(torch.stack([torch.isfinite(v).all() for v in stats.values()]).all())
        if "count" in stats:  # (1,) labelled samples, or (M,) labelled samples that have each modality
            checks.append((stats["count"] > 0).all())
        flags = torch.stack(checks).tolist() if checks else []  # one host sync for both checks
        if self.check_finite_stats and stats and not flags[0] and not self.statistics_finite(stats, trainer.global_step):
            return None
        self.step_has_labels = bool(flags[-1]) if "count" in stats else True
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
        if not stats or bool(torch.stack([torch.isfinite(v).all() for v in stats.values()]).all()):  # one host sync
            return True
        if self.nonfinite == "raise":
            bad = [k for k, v in stats.items() if not bool(torch.isfinite(v).all())]
            raise NonFiniteStatisticsError(
                f"{type(self).__name__}: non-finite statistics {bad} at global step {step} (NaN/inf in the model's "
                f"features or logits: this is not an fp16 overflow step, which is recognised and skipped). Check the "
                f"model's inputs and learning rate, or pass nonfinite='skip' to skip the edit on such steps."
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


class ForwardPassMethod(GradientBalancingCallback):
    """A method that acts only in the forward pass, through fuse hooks (OPM, AMCo): no step statistics, no
    gradient edit, first in the pipeline; subclasses implement their taps (``tap_inputs``, ``tap_logits``)."""

    edit_order = 0
    edits_gradients = False
    fsdp_ok = True

    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        return {}

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def acted(self, result: dict[str, Tensor]) -> bool:
        return False

    def log_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, Tensor]) -> None:
        """Log ``metrics`` on the Trainer's logged steps (``log_every_n_steps``) when ``log_metrics`` is set."""
        if self.log_metrics and _logs_this_step(trainer):
            log_balance_metrics(pl_module, metrics, on_step=True, on_epoch=False)
