"""InfoReg math (Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition", CVPR 2025). Pure tensor functions, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fisher_trace_increment", "prime_window_indicator", "inforeg_coefficients"]


def fisher_trace_increment(grads: Sequence[Tensor]) -> Tensor:
    r"""One step's contribution to an encoder's Fisher-trace estimate.

    The estimate over an epoch ``e`` is
    :math:`T_u(e) = \sum_{\ell} \operatorname{mean}_{\text{elements}}\big(\sum_{t \in e} g_{\ell,t}^2\big)
    = \sum_t \sum_\ell \lVert g_{\ell,t} \rVert^2 / |\ell|`, so each step adds
    :math:`\sum_\ell \lVert g_\ell \rVert^2 / |\ell|` over the encoder's weight tensors ``ℓ``.

    Returns:
        A float32 scalar tensor (0 for an empty list).
    """
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads)).float()
    sizes = torch.tensor([g.numel() for g in grads], dtype=torch.float32, device=norms.device)
    return (norms.square() / sizes).sum()


def prime_window_indicator(history: Sequence[float], window: int = 10) -> float:
    r"""The prime-learning-window indicator ``k_e`` from the trace history ``T(0..e-1)``.

    With the history pre-padded by ``window`` zeros (as the official code does),
    :math:`k_e = (\bar A_e - \bar A'_e) / \bar A_e` where :math:`\bar A_e` is the mean of the last
    ``window`` traces and :math:`\bar A'_e` the mean of the ``window`` traces one epoch earlier, i.e.
    :math:`k_e = (T(e-1) - T(e-1-window)) / \sum_{j=e-window}^{e-1} T(j)`. ``k_0 = 1`` (no history yet),
    and so is ``k_e`` whenever the last ``window`` traces sum to zero.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    padded = [0.0] * window + [float(t) for t in history]
    recent = padded[-window:]
    total = sum(recent)
    if not history or total == 0.0:
        return 1.0
    return (padded[-1] - padded[-1 - window]) / total


def inforeg_coefficients(scores: Tensor, strengths: Tensor, window_open: Tensor) -> Tensor:
    r"""Proximal-regulation strength ``β_u`` of each modality for one step.

    Only the dominant modality (largest score) is regulated, and only while its window is open:

    .. math::
        \beta_u = \begin{cases} c_u \exp\big(\tanh(s_u - \max_{k \ne u} s_k)\big) &
        u = \arg\max_k s_k,\ s_u > \max_{k \ne u} s_k,\ \text{window}_u \\ 0 & \text{otherwise} \end{cases}

    For two modalities this is the paper's ``β_a = 0.95·exp(tanh(s_a − s_v))`` when ``s_a > s_v``
    (``c_a = 0.95``, ``c_v = 0.10`` in the official code).

    Args:
        scores: ``(M,)`` scores (batch sums, as the official code, or means).
        strengths: ``(M,)`` constants ``c_u``.
        window_open: ``(M,)`` booleans: whether modality ``u`` may be regulated this epoch.

    Returns:
        ``(M,)`` float32 coefficients, at most one of them non-zero.
    """
    if scores.ndim != 1 or scores.numel() < 2:
        raise ValueError(f"scores must have shape (M,) with M >= 2, got {tuple(scores.shape)}.")
    if strengths.shape != scores.shape or window_open.shape != scores.shape:
        raise ValueError(
            f"strengths {tuple(strengths.shape)} and window_open {tuple(window_open.shape)} must match scores "
            f"{tuple(scores.shape)}."
        )
    s = scores.float()
    top2 = torch.topk(s, 2).values
    dominant = torch.argmax(s)
    gap = top2[0] - top2[1]
    beta = torch.zeros_like(s)
    value = strengths.float().to(s.device)[dominant] * torch.exp(torch.tanh(gap))
    regulate = (gap > 0) & window_open.to(s.device)[dominant]
    beta[dominant] = torch.where(regulate, value, torch.zeros_like(value))
    return beta
