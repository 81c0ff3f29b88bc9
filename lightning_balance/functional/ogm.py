"""OGM / OGM-GE math (Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022). Pure tensor functions, no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ogm_ratios", "ogm_coefficients", "ge_noise_std"]


def ogm_ratios(scores: Tensor, eps: float = 1e-8) -> Tensor:
    """Discrepancy ratio of each modality against the others.

    ``ρ_m = s_m / mean_{k≠m} s_k``. For two modalities this is the paper's ``ρ_a = s_a / s_v`` and
    ``ρ_v = s_v / s_a`` exactly. For M > 2 it compares each modality with the average of the rest (a
    generalisation of ours: the paper and the official code define only M = 2).

    Scores are clamped below at ``eps`` so that a modality whose score is ~0 early in training does not
    make the others' ratios infinite (their coefficient then saturates at ``1 - tanh(α·ρ)`` → 0 rather
    than becoming NaN).

    Args:
        scores: ``(M,)`` non-negative scores (batch sums of the true-class probability), M ≥ 2.
    """
    if scores.ndim != 1 or scores.numel() < 2:
        raise ValueError(f"scores must have shape (M,) with M >= 2, got {tuple(scores.shape)}.")
    s = scores.float().clamp_min(eps)
    m = s.numel()
    # mean of the others via an off-diagonal matrix, not (sum - s): that cancels catastrophically
    # when one score dominates (1 + 1e-8 - 1 == 0 in float32)
    off_diagonal = 1.0 - torch.eye(m, dtype=s.dtype, device=s.device)
    others = (off_diagonal @ s) / (m - 1)
    return s / others


def ogm_coefficients(scores: Tensor, alpha: float, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """OGM gradient coefficients (paper Eq. 10, official code).

    ``k_m = 1 − tanh(α · ρ_m)`` if ``ρ_m > 1`` (the modality is dominant), else ``k_m = 1``. On an exact tie
    (no ``ρ_m > 1``) the first modality gets ``1 − tanh(α · ρ_1)``, as the official code's ``else`` branch
    slows audio when ``ρ_v`` is not above 1.

    Note the rule is discontinuous at ``ρ = 1`` (``k`` jumps from 1 to ``1 − tanh(α)``); this is the
    published behaviour and is kept.

    Returns:
        ``(ratios, coefficients)``, both ``(M,)`` float32.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")
    ratios = ogm_ratios(scores, eps)
    slowed = ratios > 1
    slowed[0] = slowed[0] | ~slowed.any()  # official: `if ratio_v > 1: ... else: slow audio` (ties included)
    coeffs = torch.where(slowed, 1.0 - torch.tanh(alpha * ratios), torch.ones_like(ratios))
    return ratios, coeffs


def ge_noise_std(grad: Tensor, floor: float = 1e-8) -> Tensor:
    """Standard deviation of the GE noise for one gradient tensor: ``std(g) + 1e-8``.

    ``std`` is over all elements of the **unmodulated** gradient, with Bessel's correction (as
    ``torch.std``); a one-element gradient has no spread and gets the floor only.
    """
    if grad.numel() < 2:
        return torch.full((), floor, dtype=torch.float32, device=grad.device)
    return grad.float().std() + floor
