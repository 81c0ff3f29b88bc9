"""MMPareto math (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
ICML 2024). Pure tensor functions, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pareto_weights", "pareto_merge", "pareto_merge_from_sum_", "pareto_stationary"]


def pareto_weights(dot: Tensor, sq_mm: Tensor, sq_uni: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    r"""Weights of the multimodal and unimodal gradients of each encoder.

    With :math:`\cos = \langle g_{mm}, g_u\rangle / (\lVert g_{mm}\rVert \lVert g_u\rVert)` over the whole
    encoder: ``cos > 0`` (no conflict) gives the uniform ``(½, ½)``; otherwise the two-vector min-norm
    point :math:`c^* = (\lVert g_u\rVert^2 - \langle g_{mm}, g_u\rangle) / \lVert g_{mm} - g_u\rVert^2`
    gives ``(c*, 1 − c*)``, as the official ``MinNormSolver._min_norm_element_from2``: 0.999 when
    :math:`\langle g_{mm}, g_u\rangle \ge \lVert g_{mm}\rVert^2`, 0.001 when it is
    :math:`\ge \lVert g_u\rVert^2` (only possible with a zero gradient under a conflict), else ``c*`` unclipped.

    Args:
        dot, sq_mm, sq_uni: ``(M,)`` (or scalars): :math:`\langle g_{mm}, g_u\rangle`, :math:`\lVert g_{mm}\rVert^2`,
            :math:`\lVert g_u\rVert^2` per encoder.

    Returns:
        ``(w_mm, w_uni, cos)``.
    """
    dot, sq_mm, sq_uni = dot.double(), sq_mm.double(), sq_uni.double()
    cos = dot / (sq_mm.sqrt() * sq_uni.sqrt()).clamp_min(eps)
    # the official two-vector solver: 0.999 if <g_mm,g_u> >= |g_mm|^2, 0.001 if >= |g_u|^2, else the exact
    # min-norm point, unclipped (with cos <= 0 and both non-zero the first two cases cannot occur)
    exact = (sq_uni - dot) / (sq_mm + sq_uni - 2 * dot).clamp_min(eps)
    c = torch.where(dot >= sq_mm, torch.full_like(exact, 0.999), torch.where(dot >= sq_uni, torch.full_like(exact, 0.001), exact))
    conflict = cos <= 0
    half = torch.full_like(c, 0.5)
    w_mm = torch.where(conflict, c, half)
    return w_mm.float(), (1 - w_mm).float(), cos.float()


def pareto_stationary(dot: Tensor, sq_mm: Tensor, sq_uni: Tensor, w_mm: Tensor, tol: float = 1e-3) -> Tensor:
    r"""Whether the Pareto direction :math:`\hat g = 2(w\, g_{mm} + (1-w) g_u)` vanishes:
    :math:`\lVert\hat g\rVert \le \mathrm{tol}\,\sqrt{\lVert g_{mm}\rVert^2 + \lVert g_u\rVert^2}`, from the
    dot products alone (float64). True when the two gradients are (numerically) anti-parallel: a
    Pareto-stationary point, where no direction decreases both losses."""
    dot, sq_mm, sq_uni, w = dot.double(), sq_mm.double(), sq_uni.double(), w_mm.double()
    sq_merged = 4 * (w * w * sq_mm + (1 - w) * (1 - w) * sq_uni + 2 * w * (1 - w) * dot)
    return sq_merged.clamp_min(0) <= (tol * tol) * (sq_mm + sq_uni)


def pareto_merge(g_mm: Sequence[Tensor], g_uni: Sequence[Tensor], w_mm: Tensor, w_uni: Tensor,
                 gamma: float, uniform_norms: Tensor | None = None) -> Sequence[Tensor]:
    r"""The merged gradient of one encoder, per parameter tensor ``p``:

    :math:`\hat g_p = 2(w_{mm} g_{mm,p} + w_u g_{u,p})`,
    :math:`g_p = \gamma \, \hat g_p \max(1, \lVert g_{mm,p} + g_{u,p}\rVert / \lVert \hat g_p\rVert)`:
    the Pareto direction, scaled back up (never down) to the norm of the uniform sum, then by ``γ``.
    Without conflict (``w = ½``) this is ``γ (g_mm + g_u)``. ``uniform_norms`` (the per-tensor
    :math:`\lVert g_{mm,p} + g_{u,p}\rVert`, if already known) saves a pass.
    """
    merged = torch._foreach_add(torch._foreach_mul(list(g_mm), 2 * w_mm), torch._foreach_mul(list(g_uni), 2 * w_uni))
    if uniform_norms is None:
        uniform_norms = torch.stack(torch._foreach_norm(torch._foreach_add(list(g_mm), list(g_uni))))
    uniform = uniform_norms
    norms = torch.stack(torch._foreach_norm(merged))
    factors = gamma * torch.maximum(torch.ones_like(norms), uniform / norms.clamp_min(1e-30))
    torch._foreach_mul_(merged, list(factors.unbind()))
    return merged


def pareto_merge_from_sum_(totals: Sequence[Tensor], g_uni: Sequence[Tensor], w_mm: float, w_uni: float,
                           gamma: float) -> None:
    r""":func:`pareto_merge` in place, from the per-tensor sums ``totals = g_mm + g_u`` (what one backward
    of ``L_mm + L_u`` leaves in ``.grad``) and ``g_u``, without materialising ``g_mm``:
    :math:`\hat g = 2 w_{mm} (g_{mm} + g_u) + 2 (w_u - w_{mm}) g_u`, four passes and no allocation
    of gradient size.
    """
    totals = list(totals)
    uniform = torch.stack(torch._foreach_norm(totals))
    torch._foreach_mul_(totals, 2 * w_mm)
    torch._foreach_add_(totals, list(g_uni), alpha=2 * (w_uni - w_mm))
    norms = torch.stack(torch._foreach_norm(totals))
    factors = gamma * torch.maximum(torch.ones_like(norms), uniform / norms.clamp_min(1e-30))
    torch._foreach_mul_(totals, list(factors.unbind()))
