"""PMR math (Fan, Xu, Wang, Wang, Guo, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
CVPR 2023). Pure tensor functions, no Lightning.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "class_feature_sums",
    "update_prototypes",
    "prototype_logits",
    "prototype_entropy",
    "pmr_weights",
]


def class_feature_sums(features: Tensor, targets: Tensor, num_classes: int,
                       valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-class sums ``(C, d)`` and counts ``(C,)`` of ``(N, d)`` features, in float32 (sums, so that
    batches and ranks add up); only the samples in ``valid`` if given (the others' targets must still be
    valid indices, e.g. 0)."""
    onehot = F.one_hot(targets, num_classes).to(torch.float32)
    flat = features.reshape(features.shape[0], -1).float()
    if valid is not None:  # torch.where, not a product: a left-out row may hold NaN (0 * NaN is NaN)
        onehot = onehot * valid.to(torch.float32).unsqueeze(1)
        flat = torch.where(valid.unsqueeze(1), flat, torch.zeros((), device=flat.device))
    return onehot.T @ flat, onehot.sum(0)


def update_prototypes(
    sums: Tensor, counts: Tensor, previous: Optional[Tensor], seen: Optional[Tensor], momentum: float
) -> tuple[Tensor, Tensor]:
    """New prototypes ``c = (1 − μ) c_new + μ c_old`` from class sums and counts.

    A class with no sample keeps its previous prototype (instead of the official 0/0 = NaN); before
    its first sample it stays unseen.

    Returns:
        ``(prototypes (C, d), seen (C,) bool)``.
    """
    present = counts > 0
    new = sums / counts.clamp_min(1).unsqueeze(1)
    if previous is None:
        return torch.where(present.unsqueeze(1), new, torch.zeros_like(new)), present
    prev_seen = seen if seen is not None else torch.ones_like(present)
    mixed = torch.where(prev_seen.unsqueeze(1), (1 - momentum) * new + momentum * previous, new)
    return torch.where(present.unsqueeze(1), mixed, previous), present | prev_seen


def prototype_logits(features: Tensor, prototypes: Tensor, seen: Optional[Tensor] = None) -> Tensor:
    """``ℓ_{i,k} = −‖z_i − c_k‖₂`` (Euclidean, not squared), ``(N, C)`` float32; unseen classes get ``−inf``."""
    z = features.reshape(features.shape[0], -1).float()
    dist = torch.cdist(z, prototypes.float().to(z.device))
    logits = -dist
    if seen is not None:
        logits = logits.masked_fill(~seen.to(z.device).unsqueeze(0), float("-inf"))
    return logits


def prototype_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of ``σ(ℓ)`` (``−inf`` logits contribute 0)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def pmr_weights(scores: Tensor, rule: Literal["binary", "continuous"] = "binary") -> tuple[Tensor, Tensor]:
    r"""Weights of each modality's prototypical cross-entropy (PCE) and entropy term from the scores.

    ``scores``: ``(M,)`` prototype scores ``s_m = Σ_i σ(ℓ^m_i)[y_i]``.

    * ``"binary"`` (official code): weight 1 on the PCE of every modality behind the leader, i.e. for
      M = 2 the weaker one (``ρ = s_a/s_v > 1`` → visual), none on a tie.
    * ``"continuous"`` (paper, Eq. 9–13): :math:`\beta_m = \operatorname{clip}(\max_k s_k / s_m - 1, 0, 1)`.

    Entropy weights (paper's PER, applied to the leading modality):
    :math:`e_m = \max_{k \ne m} \operatorname{clip}(s_m / s_k - 1, 0, 1)` (for M = 2: ``γ`` on ``H^a``,
    ``β`` on ``H^v``).

    Returns:
        ``(pce_weights, entropy_weights)``, each ``(M,)``.
    """
    s = scores.float().clamp_min(1e-12)
    if rule == "binary":
        pce = (s < s.max()).float()
    elif rule == "continuous":
        pce = (s.max() / s - 1).clamp(0, 1)
    else:
        raise ValueError(f"rule must be 'binary' or 'continuous', got {rule!r}.")
    ratio = (s.unsqueeze(1) / s.unsqueeze(0) - 1).clamp(0, 1)  # [m, k] = clip(s_m / s_k - 1)
    ratio.fill_diagonal_(0)
    return pce, ratio.max(dim=1).values
