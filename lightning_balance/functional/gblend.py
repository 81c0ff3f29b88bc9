"""Gradient-Blending math (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks
Hard?", CVPR 2020). Pure tensor functions, no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["floor_weights", "gblend_weights"]


def gblend_weights(train_before: Tensor, holdout_before: Tensor, train_after: Tensor, holdout_after: Tensor,
                   eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    r"""Blending weights from each head's losses at two checkpoints ``N`` and ``N + n``.

    Overfitting :math:`O = L^V - L^T` (held-out minus train loss), :math:`\Delta O = O_{N+n} - O_N`,
    generalisation :math:`\Delta G = L^V_N - L^V_{N+n}`, and the weights minimising the
    overfitting-to-generalisation ratio, :math:`w_k \propto \Delta G_k / \Delta O_k^2`, normalised to sum
    to 1. Guards: ``ΔG ← max(ΔG, 0)`` (a head whose held-out loss got worse gets no weight),
    ``ΔO² ← max(ΔO², eps)``, ``w ← max(w, eps)`` (tsai's guards; a head with ``ΔG ≤ 0``
    ends with a weight of about ``eps / Σ_k w_k``, see :func:`floor_weights` for an opt-in floor).

    Args:
        train_before, holdout_before, train_after, holdout_after: ``(K,)`` losses of the K heads (fused and
            unimodal) before and after.

    Returns:
        ``(weights, delta_g, delta_o)``, each ``(K,)``.
    """
    shapes = {tuple(t.shape) for t in (train_before, holdout_before, train_after, holdout_after)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four loss vectors must all have shape (K,), got {sorted(shapes)}.")
    delta_o = (holdout_after - train_after) - (holdout_before - train_before)
    delta_g = holdout_before - holdout_after
    w = delta_g.clamp_min(0) / delta_o.square().clamp_min(eps)
    w = w.clamp_min(eps)
    return w / w.sum(), delta_g, delta_o


def floor_weights(weights: Tensor, min_weight: float) -> Tensor:
    r"""Normalised weights with every entry at least ``min_weight``, the others keeping their ratios.

    The heads below the floor are set to ``min_weight``; the rest share :math:`1 - |F|\,\mathrm{min\_weight}`
    in proportion to their weights (``F`` the floored heads). Shrinking the rest may push another head
    below the floor, so this repeats until no head is added to ``F`` (at most ``K`` rounds):

    .. math:: w'_k = \mathrm{min\_weight}\ (k \in F), \qquad
              w'_k = w_k \, \frac{1 - |F|\,\mathrm{min\_weight}}{\sum_{j \notin F} w_j}\ (k \notin F).

    Args:
        weights: ``(K,)`` non-negative weights summing to 1 (:func:`gblend_weights`).
        min_weight: the floor, ``0 <= min_weight < 1 / K``; 0 returns ``weights`` unchanged.
    """
    if weights.ndim != 1:
        raise ValueError(f"weights must have shape (K,), got {tuple(weights.shape)}.")
    k = weights.shape[0]
    if not 0.0 <= min_weight < 1.0 / k:
        raise ValueError(f"min_weight must be in [0, 1/K) = [0, {1.0 / k:.4g}) for K = {k} heads, got {min_weight!r}.")
    if min_weight == 0.0:
        return weights
    floored = torch.zeros(k, dtype=torch.bool, device=weights.device)
    out = weights
    for _ in range(k):
        new = floored | (out < min_weight)
        free = weights.masked_fill(new, 0.0)
        out = torch.where(new, weights.new_tensor(min_weight), free * (1.0 - min_weight * int(new.sum())) / free.sum())
        if torch.equal(new, floored):
            break
        floored = new
    return out
