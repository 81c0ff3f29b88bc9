"""Loss terms: balancing methods that add to the user's objective instead of editing gradients."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_balance.callbacks.base import _logs_this_step
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["LossTerm", "LossTerms", "configure_loss_terms", "add_loss_terms"]


class LossTerm(nn.Module, abc.ABC):
    """A balancing loss term: a plain ``nn.Module`` whose :meth:`from_record` computes its value from a
    step of the modality contract. Its own parameters (if any) train with the model.

    Outside its epochs a term adds nothing to the loss; its trainable parameters (if any) still enter the
    graph, as ``0 · Σ p``, so that DDP with ``find_unused_parameters=False`` (its default) finds every
    parameter used. They receive a zero gradient rather than none, so the optimizer steps them: weight
    decay shrinks them (before ``start_epoch`` too) and momentum keeps moving them after ``end_epoch``.
    Parameters a term lists in :meth:`no_weight_decay` are left out of weight decay by the mixin's
    ``parameter_groups``.

    Args:
        weight: multiplier of the term in the objective.
        start_epoch, end_epoch: epochs (inclusive) in which the term is added; ``None``: no end.
    """

    name: ClassVar[str] = "term"
    #: the term counts a modality only where it is present (``fuse(..., present=...)``); a term without it
    #: refuses records with a presence mask, with :attr:`absence_refusal` as the reason
    supports_absence: ClassVar[bool] = True
    absence_refusal: ClassVar[str] = ""

    def __init__(self, weight: float = 1.0, start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}.")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}.")
        if end_epoch is not None and (not isinstance(end_epoch, int) or end_epoch < start_epoch):
            raise ValueError(f"end_epoch must be None or an int >= start_epoch, got {end_epoch!r}.")
        self.weight = float(weight)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Parameters to leave out of weight decay (e.g. a learnable temperature); the mixin's
        ``parameter_groups(weight_decay)`` puts them in a group with ``weight_decay=0``."""
        return []

    def task_loss_weight(self, module: MultimodalMixin, epoch: int) -> Optional[float]:
        """A factor of the user's loss while the term is active (``None``: leave it), for methods whose objective
        reweights the supervised loss itself (LFM's ``2 α_cls(t)``). Several terms' factors multiply. Read after
        every active term's :meth:`from_record` of the step."""
        return None

    @abc.abstractmethod
    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        """The term's (unweighted) scalar value for this step, and metrics to log under ``balance/<name>/``."""


def configure_loss_terms(module: MultimodalMixin, terms: Union[Sequence[LossTerm], Mapping[str, LossTerm]]) -> None:
    """Attach loss terms to ``module`` (as the submodule ``balance_losses``, so their parameters train and
    are checkpointed). Keys are the terms' names (or the mapping's keys) and must be unique."""
    if isinstance(terms, Mapping):
        named = dict(terms)
    else:
        named = {}
        for term in terms:
            if term.name in named:
                raise ModalityContractError(
                    f"two loss terms are named {term.name!r}; pass a mapping {{name: term}} to give them distinct names."
                )
            named[term.name] = term
    bad = [k for k, t in named.items() if not isinstance(t, LossTerm)]
    if bad:
        raise ModalityContractError(f"loss terms must be LossTerm modules; {bad} are not.")
    module.balance_losses = nn.ModuleDict(named)


def add_loss_terms(module: Any, loss: Tensor, record: Optional[ModalityRecord] = None) -> Tensor:
    """``w · loss + Σ_k weight_k · term_k(step)`` for the module's active loss terms (``w``: the product of their
    :meth:`LossTerm.task_loss_weight` factors, 1 for most terms); logs each term."""
    terms = getattr(module, "balance_losses", None)
    if terms is None:
        raise ModalityContractError(
            "add_loss_terms() found no loss terms: attach them with self.configure_loss_terms([...]) or the "
            "LossTerms([...]) callback."
        )
    record = record or module.current_record("add_loss_terms()")
    if record.batch_size == 0:
        raise ModalityContractError("add_loss_terms() got an empty batch (0 samples): drop empty batches before fusing.")
    trainer = module._trainer
    epoch = trainer.current_epoch if trainer is not None else 0
    parts: list[Tensor] = []  # added to the (rescaled) loss in attachment order
    task_weight = 1.0
    metrics: dict[str, Tensor] = {}
    for name, term in terms.items():
        if not term.active(epoch):
            idle = [p for p in term.parameters() if p.requires_grad]
            if idle and module.training and torch.is_grad_enabled():
                # keep the graph static: DDP (find_unused_parameters=False) needs every parameter used
                parts.append(0.0 * torch.stack([p.sum().float() for p in idle]).sum())
            continue
        if record.present is not None and not term.supports_absence:
            raise ModalityContractError(
                f"{type(term).__name__} does not handle absent modalities: {term.absence_refusal} The step's "
                f"fuse(..., present=...) marks some samples as lacking a modality. Train this term on complete "
                f"samples, or use a term that supports absence (docs/design.md)."
            )
        value, extra = term.from_record(module, record)
        parts.append(term.weight * value)
        metrics[f"balance/{name}/loss"] = value.detach()
        metrics.update({f"balance/{name}/{k}": v.detach() for k, v in extra.items()})
        factor = term.task_loss_weight(module, epoch)
        if factor is not None:
            task_weight *= float(factor)
    total = loss if task_weight == 1.0 else task_weight * loss
    for part in parts:
        total = total + part
    if (trainer is not None and metrics and not getattr(trainer, "barebones", False) and module.training
            and _logs_this_step(trainer)):  # pl_module.log costs ~0.5 ms per key on CPU: only on logged steps
        module.log_dict(metrics, on_step=True, on_epoch=False)
    return total


class LossTerms(Callback):
    """Attach loss terms to the module from the Trainer's callbacks (so LightningCLI YAML can set them);
    ``training_step`` then returns ``self.add_loss_terms(loss)``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: lightning_balance.LossTerms
              init_args:
                terms:
                  - class_path: lightning_balance.losses.CMLLoss
                    init_args: {rank_weight: 0.1}
    """

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        if not terms:
            raise ValueError("LossTerms needs at least one loss term.")
        self.terms = list(terms)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MultimodalMixin):
            raise ModalityContractError(
                f"LossTerms needs the modality contract: make {type(pl_module).__name__} inherit MultimodalMixin."
            )
        if trainer.world_size > 1:
            # Attaching modules from a callback under DDP was seen to leave the terms' parameters
            # unsynchronised in some runs (cause not found yet); refuse rather than diverge silently.
            raise ModalityContractError(
                "LossTerms attaches loss terms from a callback, which is single-process only for now. Under DDP, "
                "attach them in the module's __init__ with self.configure_loss_terms([...]) (LightningCLI can "
                "pass the terms as an init argument of the model)."
            )
        if getattr(pl_module, "balance_losses", None) is None:
            pl_module.configure_loss_terms(self.terms)
