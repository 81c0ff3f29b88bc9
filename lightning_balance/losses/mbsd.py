"""MBSD as a loss term: self-distillation from each sample's stronger modality into its weaker one."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_balance.functional.mbsd import mbsd_distillation
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["MBSDLoss"]


class MBSDLoss(LossTerm):
    r"""MBSD: per-sample self-distillation between the modalities' predictions (the survey's reference [12],
    Liu et al., WSDM 2023; no official code was found, so the recipe is BalanceBenchmark's ``MBSDTrainer`` with its
    KL term corrected).

    .. math::
        L_{term} = \sum_m \mathrm{CE}(o_m, y) + \operatorname{mean}_{pairs}\ \frac1N \sum_i w_i\,(RS_i + KL_i)

    with :math:`o_m` the unimodal logits (the contract's ``compute_unimodal_logits``, attached),
    :math:`w_i = |p_a(y_i) - p_b(y_i)|` where at least one of the two predicts :math:`y_i` (else 0, detached),
    :math:`RS_i = \frac1C\lVert o_{a,i} - o_{b,i}\rVert^2` and
    :math:`KL_i = \mathrm{KL}(\mathrm{sg}(p_{s,i}) \| p_{w,i})` from the sample's stronger modality (larger
    true-class probability) to its weaker one (:func:`~lightning_balance.functional.mbsd_distillation`). Your loss
    (the cross-entropy of the fused logits) plus this term is BalanceBenchmark's ``total_loss``.

    Absent modalities (``fuse(..., present=...)``): a modality's cross-entropy sums over the samples that have it,
    a pair over the samples that have both, each divided by the number of labelled samples (the convention of
    ``add_unimodal_losses``: a modality present in 30% of the samples weighs 30%, and DDP and accumulation equal
    one process when every rank and micro-batch has the same number of labelled samples). Samples whose target is the declared ``ignore_index`` count nowhere.

    Args:
        unimodal_losses: add each modality's cross-entropy (part of MBSD's objective). Set ``False`` when your
            ``training_step`` already adds them (``add_unimodal_losses``).
        detach_weight: ``w`` carries no gradient (BalanceBenchmark's does, through the probabilities it is made
            of; ``False`` reproduces that).
        weight, start_epoch, end_epoch: see :class:`LossTerm` (BalanceBenchmark's window: epochs 0-80).

    Standalone: ``MBSDLoss()(unimodal_logits, targets)`` with a list of ``(N, C)`` tensors.
    """

    name = "mbsd"

    def __init__(self, unimodal_losses: bool = True, detach_weight: bool = True, weight: float = 1.0,
                 start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        for n, v in (("unimodal_losses", unimodal_losses), ("detach_weight", detach_weight)):
            if not isinstance(v, bool):
                raise ValueError(f"{n} must be True or False, got {v!r}.")
        self.unimodal_losses, self.detach_weight = unimodal_losses, detach_weight

    def forward(self, unimodal_logits: Any, targets: Tensor, counted: Optional[Tensor] = None) -> Tensor:
        """The term on a list (or mapping) of ``(N, C)`` unimodal logits; ``counted``: optional ``(M, N)`` bool."""
        logits = list(unimodal_logits.values()) if isinstance(unimodal_logits, dict) else list(unimodal_logits)
        return self._value(logits, targets, counted)[0]

    def _value(self, logits: list[Tensor], targets: Tensor, counted: Optional[Tensor],
               labelled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``labelled``: the number of labelled samples, every sum's denominator (default: the batch size)."""
        value, metrics = mbsd_distillation(logits, targets, counted, self.detach_weight, labelled)
        metrics["distillation"] = value.detach()
        if self.unimodal_losses:
            safe = targets if counted is None else targets.clamp(0, logits[0].shape[-1] - 1)
            norm = (torch.tensor(float(len(targets)), device=targets.device) if labelled is None
                    else labelled.float()).clamp_min(1.0)
            for k, o in enumerate(logits):
                ce = F.cross_entropy(o.float(), safe, reduction="none")
                value = value + (ce if counted is None else ce * counted[k].to(ce.dtype)).sum() / norm
        return value, metrics

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        names = module.modalities
        if record.targets is None:
            raise ModalityContractError("MBSDLoss compares each modality with the labels: call "
                                        "self.fuse(features, targets).")
        if len(names) < 2:
            raise ModalityContractError("MBSDLoss distils between modalities: it needs at least two.")
        with record.autocast():
            unimodal = module.compute_unimodal_logits(record.features, present=record.present)
        logits = [unimodal[m] for m in names]
        counted = record.counted_stack(list(names))  # labelled and present; complete data: the labelled ones
        if counted is None:
            counted = record.valid.unsqueeze(0).expand(len(names), -1)  # type: ignore[union-attr]
        return self._value(logits, record.valid_targets(), counted, record.valid.sum())  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return f"unimodal_losses={self.unimodal_losses}, detach_weight={self.detach_weight}"
