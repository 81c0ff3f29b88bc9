"""The objective side of the modality contract: unimodal auxiliary losses, their weights, loss terms.

Split from :mod:`lightning_balance.modality` (which declares modalities and records steps); mixed into
:class:`~lightning_balance.MultimodalMixin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_balance._record import ModalityRecord

if TYPE_CHECKING:
    from lightning_balance.modality import MultimodalMixin

__all__ = ["ObjectivesMixin"]

_WEIGHTS_KEY = "_balance_loss_weights"


def _save_loss_weights(module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: user- or callback-set loss weights travel in the module's checkpoint."""
    weights = getattr(module, "_lb_loss_weights", None)
    if weights is not None:
        order = ["fused", *module.modality_spec.names]
        state_dict[prefix + _WEIGHTS_KEY] = torch.tensor([weights[k] for k in order], dtype=torch.float64)


def _load_loss_weights(module: Any, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                       missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    value = state_dict.pop(prefix + _WEIGHTS_KEY, None)  # popped: never an unexpected key
    if value is not None:
        order = ["fused", *module.modality_spec.names]
        values = value.tolist()
        if len(values) != len(order):
            error_msgs.append(f"{_WEIGHTS_KEY} has {len(values)} entries but the module declares {order}.")
            return
        module._lb_loss_weights = dict(zip(order, (float(v) for v in values)))


class ObjectivesMixin:
    """Unimodal auxiliary losses, their weights, and balancing loss terms (part of the modality contract)."""

    _lb_loss_weights: Optional[dict[str, float]] = None

    def _register_objective_hooks(self) -> None:
        if getattr(self, "_lb_objective_hooks", False):
            return
        self.register_state_dict_post_hook(_save_loss_weights)  # type: ignore[attr-defined]
        self.register_load_state_dict_pre_hook(_load_loss_weights)  # type: ignore[attr-defined]
        self._lb_objective_hooks = True

    def unimodal_loss(self, record: Optional[ModalityRecord] = None, detach_features: bool = True) -> Tensor:
        """Sum over modalities of the cross-entropy of each auxiliary unimodal head (``unimodal='heads'``).

        With ``detach_features=True`` (default) only the heads learn from it, so they are online probes
        of each encoder and do not change the encoders' training.
        """
        spec = self.modality_spec  # type: ignore[attr-defined]
        if spec.unimodal != "heads":
            from lightning_balance.modality import ModalityContractError

            raise ModalityContractError("unimodal_loss() trains auxiliary heads; declare unimodal='heads'.")
        record = record or self.current_record("unimodal_loss()")  # type: ignore[attr-defined]
        targets = self._targets_of(record, "unimodal_loss()")
        feats = {m: (z.detach() if detach_features else z) for m, z in record.features.items()}
        logits = self.compute_unimodal_logits(feats, present=record.present)  # type: ignore[attr-defined]
        return sum(self._cross_entropy(logits[m], targets, record, m) for m in spec.names)  # type: ignore[return-value]

    # ------------------------------------------------------------------ unimodal auxiliary objectives
    @property
    def loss_weights(self) -> dict[str, float]:
        """Weights of :meth:`add_unimodal_losses`: ``"fused"`` and one per modality (all 1.0 by default).

        A plain dict: set entries directly, assign a whole dict (validated), or let a callback
        (Gradient-Blending) set them. They are saved in the module's ``state_dict`` (so in every
        checkpoint) and restored with it.
        """
        if self._lb_loss_weights is None:
            self._lb_loss_weights = {"fused": 1.0, **{m: 1.0 for m in self.modality_spec.names}}  # type: ignore[attr-defined]
        return self._lb_loss_weights

    @loss_weights.setter
    def loss_weights(self, weights: Mapping[str, float]) -> None:
        from lightning_balance.modality import ModalityContractError

        expected = {"fused", *self.modality_spec.names}  # type: ignore[attr-defined]
        if set(weights) != expected:
            raise ModalityContractError(
                f"loss_weights must have exactly the keys {sorted(expected)}, got {sorted(weights)}."
            )
        bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0}
        if bad:
            raise ModalityContractError(f"loss_weights must be numbers >= 0, got {bad}.")
        self._lb_loss_weights = {k: float(v) for k, v in weights.items()}

    def add_unimodal_losses(self, fused_loss: Tensor, record: Optional[ModalityRecord] = None) -> Tensor:
        r"""The multimodal objective with unimodal auxiliary losses:

        .. math:: L = w_{fused} L_{fused} + \sum_m w_m \, \mathrm{CE}(o_m, y)

        with ``o_m`` the unimodal logits of the step (declared ``unimodal`` mode: split head, masked
        fusion or auxiliary heads; or those a fuse hook stored in ``record.extras["unimodal_logits"]``, as AMCo
        stores its masked ones), **attached** to the graph, so each encoder also learns from its
        own prediction. Weights are :attr:`loss_weights`; samples whose target is the declared
        ``ignore_index`` are left out, as in ``F.cross_entropy``, and a sample that lacks modality ``m``
        adds 0 to ``CE(o_m, y)``, which stays a mean over the labelled samples (so a modality present in
        30% of the samples weighs 30%; DDP and accumulation equal one process). The weighted terms are kept on the
        step's record (``record.extras["objective"]``) for callbacks that treat them separately (MMPareto).

        Call it in ``training_step`` after :meth:`fuse`: ``return self.add_unimodal_losses(loss)``.
        """
        from lightning_balance.modality import ModalityContractError

        record = record or self.current_record("add_unimodal_losses()")  # type: ignore[attr-defined]
        targets = self._targets_of(record, "add_unimodal_losses()")
        if not isinstance(fused_loss, Tensor) or fused_loss.ndim != 0:
            raise ModalityContractError(
                f"add_unimodal_losses() takes the scalar loss of the fused logits, got "
                f"{tuple(fused_loss.shape) if isinstance(fused_loss, Tensor) else type(fused_loss).__name__}."
            )
        weights = self.loss_weights
        logits = record.extras.get("unimodal_logits")  # a fuse hook's modified unimodal logits (AMCo's masked ones)
        if logits is None:
            logits = self.compute_unimodal_logits(record.features, present=record.present)  # type: ignore[attr-defined]
        terms = {"fused": weights["fused"] * fused_loss}
        for m in self.modality_spec.names:  # type: ignore[attr-defined]
            terms[m] = weights[m] * self._cross_entropy(logits[m], targets, record, m)
        record.extras["objective"] = terms
        return sum(terms.values())  # type: ignore[return-value]

    @staticmethod
    def _cross_entropy(logits: Tensor, targets: Tensor, record: ModalityRecord, modality: Optional[str] = None) -> Tensor:
        """Cross-entropy summed over the valid samples (that have ``modality``), divided by the number of valid
        samples: the batch mean of each sample's loss, 0 for a sample that lacks the modality. (A mean over the
        present samples only would weigh a rank's or a micro-batch's few present samples as much as another's
        many: the per-sample normalisation keeps DDP and accumulation equal to one process on the whole batch.)
        0 (attached to the graph) when there are none."""
        counted = record.valid if modality is None else record.counted(modality)
        if counted is not record.valid:  # some samples lack the modality: leave them out like ignore_index
            targets = torch.where(counted, targets, torch.full_like(targets, record.ignore_index))  # type: ignore[arg-type]
        loss = F.cross_entropy(logits.float(), targets, ignore_index=record.ignore_index, reduction="sum")
        count = record.valid.sum().clamp_min(1)  # type: ignore[union-attr]
        return loss / count

    def _targets_of(self, record: ModalityRecord, who: str) -> Tensor:
        if record.targets is None:
            from lightning_balance.modality import ModalityContractError

            raise ModalityContractError(f"{who} needs targets: call self.fuse(features, targets).")
        return record.targets

    # ------------------------------------------------------------------ loss terms
    def configure_loss_terms(self, terms: Any) -> None:
        """Attach balancing loss terms (a list of :class:`~lightning_balance.losses.LossTerm`, or a mapping
        name → term); ``training_step`` then returns ``self.add_loss_terms(loss)``."""
        from lightning_balance.losses.base import configure_loss_terms

        configure_loss_terms(cast("MultimodalMixin", self), terms)

    def add_loss_terms(self, loss: Tensor, record: Optional[ModalityRecord] = None) -> Tensor:
        """``loss`` plus every active attached loss term (weighted); each is logged under ``balance/<name>/``."""
        from lightning_balance.losses.base import add_loss_terms

        return add_loss_terms(self, loss, record)

    #: whether :meth:`balanced_loss` adds the unimodal losses (:meth:`add_unimodal_losses`); off by default, switched
    #: on by a configuration or by :func:`~lightning_balance.compare_methods` for the methods that train with them.
    balance_unimodal_losses: bool = False

    def balanced_loss(self, loss: Tensor, record: Optional[ModalityRecord] = None) -> Tensor:
        """``loss`` with every objective that balancing attached to this module: the loss terms of
        :meth:`configure_loss_terms`, if any (:meth:`add_loss_terms`), then, when :attr:`balance_unimodal_losses` is
        on, the unimodal losses (:meth:`add_unimodal_losses`). Without either it returns ``loss`` unchanged.

        Return it from ``training_step`` (``return self.balanced_loss(loss)``) and one model serves every method,
        callbacks and objectives alike: a configuration, or :func:`~lightning_balance.compare_methods`, switches the
        objectives on without another change to the model.
        """
        self._lb_balanced_loss_called = True  # compare_methods checks that training_step returns it
        if getattr(self, "_lb_skip_objectives", False):  # the "without" steps of step_time_ratio's A/B timing
            return loss
        if getattr(self, "balance_losses", None) is not None:
            loss = self.add_loss_terms(loss, record)
        if self.balance_unimodal_losses:
            loss = self.add_unimodal_losses(loss, record)
        return loss

    def parameter_groups(self, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
        """The module's parameters as two optimizer groups: ``weight_decay`` on every parameter but those
        the attached loss terms exclude (a contrastive term's learnable temperature, as the CLIP recipe
        does), which get ``weight_decay=0``. One line in ``configure_optimizers``::

            return torch.optim.AdamW(self.parameter_groups(weight_decay=0.1), lr=1e-3)

        ``group_options`` (e.g. ``lr``) are set on both groups.
        """
        excluded: set[int] = set()
        terms = getattr(self, "balance_losses", None)
        if terms is not None:
            for term in terms.values():
                excluded.update(id(p) for p in term.no_weight_decay())
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        decay = [p for p in params if id(p) not in excluded]
        no_decay = [p for p in params if id(p) in excluded]
        groups = [{"params": decay, "weight_decay": float(weight_decay), **group_options}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **group_options})
        return groups
