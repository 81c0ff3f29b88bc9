r"""Modality dropout: per-sample removal of whole modalities during training (pure tensor functions).

Each sample keeps modality :math:`m` with probability :math:`1 - p_m(t)`, through the presence mask of the
contract (the fusion then sees the declared fill, and every method counts the sample as lacking ``m``):

.. math:: \delta_{i,m} = \mathbb 1[u_{i,m} \ge p_m(t)] \wedge \text{present}_{i,m}, \qquad u_{i,m} \sim U(0, 1)

never removing every modality of a sample: if all its present modalities fall below their thresholds, the
one whose draw is closest to its threshold (largest :math:`u_{i,m} - p_m`) is kept. Modality dropout as
in ModDrop (Neverova et al., TPAMI 2016) and AV-HuBERT (Shi et al., ICLR 2022, whose features are zeroed);
the seed survey (2024) and Dai et al. (CVPR 2024) warn that dropping one modality can increase the
reliance on the other, hence the schedules.

Schedules of :math:`p_m(t)` (``t`` in optimizer steps):

* ``"constant"``: :math:`p_m`.
* ``"linear"``: :math:`p_m \min(1, t / T)` (warm-up over ``T`` steps).
* ``"cosine"``: :math:`p_m \tfrac12 (1 - \cos(\pi \min(1, t / T)))`.
* ``"adaptive"``: the dominant modality is dropped more,
  :math:`p_m = \min(p_{max}, p_m M \bar c_m)` with :math:`\bar c_m` a running mean of modality ``m``'s share
  of the confidence scores :math:`c_m = \tilde s_m / \sum_k \tilde s_k` (OGM-GE's scores of the unimodal
  logits over the samples that have ``m``): balanced modalities (:math:`c_m = 1/M`) get :math:`p_m`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Schedule", "scheduled_factor", "adaptive_probabilities", "drop_modalities"]

Schedule = Literal["constant", "linear", "cosine", "adaptive"]


def scheduled_factor(schedule: str, step: int, warmup_steps: int) -> float:
    """The warm-up factor of ``p`` at optimizer step ``step`` (1 for ``"constant"`` and ``"adaptive"`` without
    warm-up)."""
    if warmup_steps <= 0 or schedule == "constant":
        return 1.0
    x = min(1.0, max(step, 0) / warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    return x  # linear, and the warm-up of "adaptive"


def adaptive_probabilities(base: Tensor, shares: Tensor, p_max: float) -> Tensor:
    """:math:`\\min(p_{max}, p_m M c_m)` from the base probabilities ``(M,)`` and the score shares ``(M,)``."""
    return (base * shares.numel() * shares).clamp(0.0, p_max)


def drop_modalities(uniform: Tensor, present: Tensor, p: Tensor) -> Tensor:
    """The presence mask after dropout.

    Args:
        uniform: ``(N, M)`` draws in ``[0, 1)``.
        present: ``(N, M)`` bool, the samples' own presence.
        p: ``(M,)`` drop probabilities.

    Returns:
        ``(N, M)`` bool: present and not dropped; every sample with a present modality keeps at least one.
    """
    p = p.to(uniform.dtype)
    kept = present & (uniform >= p)
    lost = present.any(1) & ~kept.any(1)  # every present modality fell: keep the one closest to its threshold
    margin = torch.where(present, uniform - p, torch.full_like(uniform, -math.inf))
    rescue = torch.nn.functional.one_hot(margin.argmax(1), present.shape[1]).bool()  # no host sync
    return kept | (rescue & lost[:, None])
