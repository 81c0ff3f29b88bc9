"""CML as a loss term (Ma et al., "Calibrating Multimodal Learning", ICML 2023)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_balance.functional.cml import cml_ranking_penalty, removal_chains
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["CMLLoss"]


class CMLLoss(LossTerm):
    r"""Calibrating Multimodal Learning: removing a modality must not make the model more confident.

    Per sample, a random removal order gives nested subsets ``S_0 = all ⊃ S_1 ⊃ … ⊃ S_{M-1}``; the
    model predicts on each (removed modalities' features set to zero, through your fusion). With the
    confidence of the predicted class :math:`\mathrm{Conf}^{(j)}_i = \max_c \sigma(f(x_i^{S_j}))_c`:

    .. math::
        L = \lambda \cdot \frac1N \sum_i \sum_j g^{(j)}_i \max(0, \mathrm{Conf}^{(j+1)}_i - \mathrm{Conf}^{(j)}_i - \epsilon)
            \;+\; \mu \cdot \frac{1}{M-1}\sum_{j \ge 1} \mathrm{CE}(f(x^{S_j}), y)

    with the gate ``g = 1[the larger subset is correct]`` (official MIWAE variant). Your loss supplies
    ``CE(f(x^{S_0}), y)``; the second term adds the smaller subsets' task losses (the official code
    averages the task loss over all subsets, i.e. ``μ = 1`` up to a factor ``1/M`` on the whole).

    For a concat + linear head, zeroing a modality's features is exactly BalanceBenchmark's split-head
    subtraction (``f − W_m z_m``); for other fusions it is feature masking (``2^M − 2`` fusion passes).

    Deviations: the penalty is a per-sample hinge averaged over the batch (the official code sums it;
    a mean is batch-size invariant: multiply λ by the batch size to compare). BalanceBenchmark's
    variant hinges the **batch sum** of confidence differences, so samples that violate the ranking
    are cancelled by samples that satisfy it, and under DDP it becomes a per-rank quantity; we do not
    offer it. The removal order is drawn from torch's global RNG, like dropout (ranks may differ).

    Args:
        rank_weight: λ (official ``β/100`` with ``β = 10``: 0.1).
        subset_weight: μ, weight of the smaller subsets' cross-entropy (0 to add only the ranking term).
        margin: ε (official 0).
        gate: ``"larger_correct"`` or ``"all"``.
        weight, start_epoch, end_epoch: see :class:`LossTerm`.

    Standalone: ``CMLLoss()(chain_logits, targets)`` with ``chain_logits`` of shape ``(M, N, C)``.
    """

    name = "cml"

    def __init__(self, rank_weight: float = 0.1, subset_weight: float = 1.0, margin: float = 0.0,
                 gate: Literal["larger_correct", "all"] = "larger_correct", weight: float = 1.0,
                 start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        for n, v in (("rank_weight", rank_weight), ("subset_weight", subset_weight), ("margin", margin)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{n} must be a number >= 0, got {v!r}.")
        if gate not in ("larger_correct", "all"):
            raise ValueError(f"gate must be 'larger_correct' or 'all', got {gate!r}.")
        self.rank_weight, self.subset_weight, self.margin, self.gate = float(rank_weight), float(subset_weight), float(margin), gate

    def forward(self, chain_logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        penalty = cml_ranking_penalty(chain_logits, targets, self.margin, self.gate).mean()
        subsets = torch.stack([F.cross_entropy(lg.float(), targets) for lg in chain_logits[1:]]).mean()
        return self.rank_weight * penalty + self.subset_weight * subsets

    def chain_logits(self, module: MultimodalMixin, record: ModalityRecord) -> Tensor:
        """``(M, N, C)`` logits on each sample's chain of subsets (``[0]``: the step's fused logits)."""
        names = module.modalities
        m, n = len(names), record.batch_size
        device = record.logits.device
        order = removal_chains(m, n, device=device)  # (N, M)
        present = torch.ones(m, n, m, dtype=torch.bool, device=device)  # [j, i, modality]
        for j in range(1, m):
            present[j:, torch.arange(n, device=device), order[:, j - 1]] = False
        # logits of every non-empty subset, by bit mask, then each sample's own subset per chain step
        full = 2**m - 1
        by_mask = {full: record.logits}
        for mask in range(1, full):
            by_mask[mask] = module.fuse_subset(record.features, [k for b, k in enumerate(names) if mask >> b & 1])
        stacked = torch.stack([by_mask[k] for k in range(1, full + 1)])  # (2^M - 1, N, C)
        weights = (2 ** torch.arange(m, device=device)).view(1, 1, m)
        masks = (present.long() * weights).sum(-1)  # (M, N) subset mask per chain step and sample
        return stacked[masks - 1, torch.arange(n, device=device).unsqueeze(0)]

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        if record.targets is None:
            raise ModalityContractError("CMLLoss needs targets: call self.fuse(features, targets).")
        if len(module.modalities) < 2:
            raise ModalityContractError("CMLLoss needs at least two modalities.")
        chains = self.chain_logits(module, record)
        penalty = cml_ranking_penalty(chains, record.targets, self.margin, self.gate)
        value = self.forward(chains, record.targets)
        return value, {"penalty": penalty.mean(), "violations": (penalty > 0).float().mean()}
