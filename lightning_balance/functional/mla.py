"""MLA — Multimodal Learning with Alternating Unimodal Adaptation (Zhang, Yoon, Bansal, Yao, CVPR 2024).

Pure tensor functions, no Lightning:

* :func:`mla_alpha` — ``α_t = 0.1^(1 + batch_idx / num_batches)`` (0.1 → 0.01 within each epoch);
* :func:`mla_update_projector` — the orthogonal-weight-modification step ``q = P h̄``,
  ``P ← P − q qᵀ / (α + h̄ᵀ q)``, then ``P ← P / ‖P‖_F``;
* :func:`mla_project_gradient` — ``∇W ← ∇W Pᵀ`` for the shared head's ``(C, d)`` weight;
* :func:`mla_entropy_weights` — the test-time fusion weights ``λ_m = exp(max_k e_k − e_m) / Σ_j exp(max_k e_k − e_j)``
  with ``e_m`` the per-sample prediction entropy;
* :func:`mla_fuse_logits` — ``Σ_m λ_m o_m`` over the modalities each sample has.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["mla_alpha", "mla_entropy_weights", "mla_fuse_logits", "mla_project_gradient", "mla_update_projector"]


def mla_alpha(batch_idx: int, num_batches: int) -> float:
    """``0.1^(1 + batch_idx / num_batches)``: the regulariser of the projector update, 0.1 at an epoch's first
    batch decaying toward 0.01 at its last (official ``GSPlugin.before_update``)."""
    if num_batches <= 0:
        raise ValueError(f"num_batches must be > 0, got {num_batches}.")
    return 1.0 * 0.1 ** (batch_idx / num_batches + 1)


def mla_update_projector(projector: Tensor, mean_feature: Tensor, alpha: float) -> Tensor:
    """One step of the projector (``(d, d)``, float32 or float64) with the batch-mean feature ``h̄`` (``(d,)``) of
    the modality just trained: ``q = P h̄``, ``P ← P − q qᵀ / (α + h̄ᵀ q)``, ``P ← P / ‖P‖_F`` (a new tensor)."""
    h = mean_feature.to(projector.dtype).reshape(-1, 1)
    q = projector @ h
    updated = projector - (q @ q.T) / (alpha + (h.T @ q))
    return updated / torch.linalg.matrix_norm(updated, ord="fro")


def mla_project_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    """``∇W Pᵀ`` for a ``(C, d)`` weight gradient, computed in the projector's precision, returned in the
    gradient's dtype."""
    return (grad.to(projector.dtype) @ projector.T).to(grad.dtype)


def mla_entropy_weights(logits: Tensor, present: Optional[Tensor] = None) -> Tensor:
    """``(N, M)`` fusion weights from ``(M, N, C)`` per-modality logits: ``e_m = −Σ_c p_{m,c} log p_{m,c}`` per sample,
    ``λ_m = exp(max_k e_k − e_m) / Σ_j exp(max_k e_k − e_j)`` over the modalities the sample has (``present``,
    ``(N, M)`` bool; an absent modality gets weight 0; a sample with none gets zeros)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).T  # (N, M)
    score = -entropy  # exp(max e − e_m) ∝ exp(−e_m): the max only keeps the exponent bounded
    if present is not None:
        score = score.masked_fill(~present.bool(), float("-inf"))
    weights = torch.softmax(score, dim=1)
    return torch.nan_to_num(weights, nan=0.0)


def mla_fuse_logits(logits: Tensor, weights: Tensor) -> Tensor:
    """``(N, C)``: ``Σ_m λ_{n,m} o_{m,n}`` from ``(M, N, C)`` logits and ``(N, M)`` weights."""
    return torch.einsum("mnc,nm->nc", logits, weights.to(logits.dtype))
