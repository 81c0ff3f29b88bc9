"""Gradient-Blending math (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks
Hard?", CVPR 2020). Pure tensor functions, no Lightning.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["gblend_weights"]


def gblend_weights(train_before: Tensor, holdout_before: Tensor, train_after: Tensor, holdout_after: Tensor,
                   eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    r"""Blending weights from each head's losses at two checkpoints ``N`` and ``N + n``.

    Overfitting :math:`O = L^V - L^T` (held-out minus train loss), :math:`\Delta O = O_{N+n} - O_N`,
    generalisation :math:`\Delta G = L^V_N - L^V_{N+n}`, and the weights minimising the
    overfitting-to-generalisation ratio, :math:`w_k \propto \Delta G_k / \Delta O_k^2`, normalised to sum
    to 1. Guards: ``ΔG ← max(ΔG, 0)`` (a head whose held-out loss got worse gets no weight),
    ``ΔO² ← max(ΔO², eps)``, ``w ← max(w, eps)``.

    Args:
        ``(K,)`` losses of the K heads (fused and unimodal) before and after.

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
