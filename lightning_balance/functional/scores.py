"""Per-modality confidence scores (pure tensor functions, no Lightning)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = ["true_class_probability", "modality_scores", "stack_modalities", "present_sums"]


def stack_modalities(values: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Stack per-modality tensors of one shape into a ``(M, ...)`` tensor in ``names`` order."""
    return torch.stack([values[m] for m in names])


def true_class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of the true class, ``σ(o_i)[y_i]``, computed in float32.

    Args:
        logits: ``(..., N, C)`` logits (any leading dims, e.g. ``(M, N, C)`` for M modalities).
        targets: ``(N,)`` class indices.

    Returns:
        ``(..., N)`` probabilities.
    """
    if logits.shape[-2] != targets.shape[0]:
        raise ValueError(f"logits batch size {logits.shape[-2]} != targets batch size {targets.shape[0]}.")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    index = targets.reshape(*([1] * (logits.ndim - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    return log_p.gather(-1, index).squeeze(-1).exp()


def modality_scores(unimodal_logits: Tensor, targets: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Confidence score of each modality: ``s_m = Σ_i σ(o_{m,i})[y_i]`` (a batch **sum**).

    This is the score of OGM-GE (Peng et al., CVPR 2022, Eq. 8) and its family. Sums, not means, so
    that scores of micro-batches and ranks add up to the score of the global batch.

    Args:
        unimodal_logits: ``(M, N, C)`` stacked per-modality logits.
        targets: ``(N,)`` class indices.
        valid: optional ``(N,)`` bool mask: only these samples are summed (the others' targets may be
            any value, e.g. an ``ignore_index``); or ``(M, N)``, one mask per modality (the samples that
            are labelled and have the modality).

    Returns:
        ``(M,)`` float32 scores.
    """
    if valid is None:
        return true_class_probability(unimodal_logits, targets).sum(dim=-1)
    any_valid = valid if valid.ndim == 1 else valid.any(0)
    safe = torch.where(any_valid, targets, torch.zeros_like(targets))
    p = true_class_probability(unimodal_logits, safe)
    return torch.where(valid, p, torch.zeros((), device=p.device)).sum(dim=-1)  # not a product: 0 * NaN


def present_sums(sums: Tensor, counts: Tensor, total: Tensor) -> Tensor:
    r"""Per-modality batch sums put on one footing when modalities were present in different numbers of
    samples: :math:`\tilde s_m = s_m \cdot n / n_m`, the sum the ``n`` labelled samples would give at the
    mean of the ``n_m`` that have modality ``m`` (0 when ``n_m = 0``).

    With every modality in every sample (``n_m = n``) the factor is exactly 1: the official batch sums.
    Methods whose formulas take sums (OGM-GE's ratio, InfoReg's ``tanh(s_u - s_k)``) keep their scale.
    """
    counts = counts.to(sums.dtype)
    factor = torch.where(counts > 0, total.to(sums.dtype) / counts.clamp_min(1), torch.zeros_like(counts))
    return sums * factor
