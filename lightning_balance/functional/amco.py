r"""AMCo, adaptive mask co-optimisation (Zhou et al., "Adaptive Mask Co-Optimization for Modal Dependence in
Multimodal Learning", ICASSP; no official code was found, the recipe is BalanceBenchmark's). Pure tensor functions,
no Lightning.

The fused logits are the sum of per-modality logits, :math:`f = \sum_m o_m` (a concat + linear head split by
modality, each slice with :math:`b/M`). A modality the model currently *depends on* has part of its logits masked
out of the fused prediction, with a masking ratio that grows within each epoch:

.. math::
    p_t = \sin\Big(\frac\pi2 \cdot \frac{\min(\varepsilon, \ell_t)}{\varepsilon}\Big), \qquad
    f' = \sum_m \big(d_m\, \mu + (1 - d_m)\big) \odot o_m

with :math:`\mu \in \{0, 1\}^C` a class mask holding :math:`\lfloor p_t C \rfloor` zeros at random positions (one
per batch), :math:`\ell_t` reset to 0 at each epoch and raised by ``epoch / 10`` after every batch, and
:math:`d_m` the dependence flag from the previous batch: one softmax over the concatenated unimodal logits
:math:`[o_1; \dots; o_M]` (the masked ones for flagged modalities), modality :math:`m`'s slice of the mass averaged
over the batch, :math:`d_m = \text{mass}_m > \sigma`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["amco_mask_ratio", "amco_class_mask", "amco_mask_logits", "amco_dependence_mass"]


def amco_mask_ratio(progress: float, eps: float = 0.3) -> float:
    """``p_t = sin(π/2 · min(ε, ℓ_t)/ε)``: the share of classes masked at curriculum position ``ℓ_t``."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}.")
    return math.sin(math.pi / 2 * min(eps, max(progress, 0.0)) / eps)


def amco_class_mask(num_classes: int, ratio: float, generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """``(C,)`` float mask with ``int(ratio · C)`` zeros at positions drawn without replacement, the rest ones."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}.")
    masked = int(ratio * num_classes)
    mask = torch.ones(num_classes)
    if masked:
        mask[torch.randperm(num_classes, generator=generator)[:masked]] = 0.0
    return mask if device is None else mask.to(device)


def amco_mask_logits(fused: Tensor, unimodal: Tensor, dependent: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mask the dependent modalities' share of the fused logits.

    Args:
        fused: ``(N, C)`` fused logits, equal to ``unimodal.sum(0)`` (a split concat head).
        unimodal: ``(M, N, C)`` per-modality logits (attached).
        dependent: ``(M,)`` bool flags.
        mask: ``(C,)`` class mask.

    Returns:
        ``(fused', unimodal')``: ``fused − Σ_{m dependent} (1 − μ) ⊙ o_m`` (the user's logits, with only the masked
        parts removed) and the unimodal logits with the flagged ones masked.
    """
    if unimodal.ndim != 3 or unimodal.shape[1:] != fused.shape or dependent.shape != (unimodal.shape[0],):
        raise ValueError(f"need fused (N, C), unimodal (M, N, C) and dependent (M,), got {tuple(fused.shape)}, "
                         f"{tuple(unimodal.shape)}, {tuple(dependent.shape)}.")
    factor = torch.where(dependent.to(unimodal.device)[:, None], mask.to(unimodal.dtype).to(unimodal.device)[None, :],
                         torch.ones((), dtype=unimodal.dtype, device=unimodal.device))  # (M, C)
    masked = unimodal * factor[:, None, :]
    removed = (unimodal - masked).sum(0)
    return fused - removed.to(fused.dtype), masked


def amco_dependence_mass(unimodal: Tensor, counted: Optional[Tensor] = None) -> Tensor:
    """``(M,)``: the sum over samples of each modality's slice of one softmax over the concatenated logits
    ``[o_1; …; o_M]`` (divide by the number of samples for the mean mass; ``counted``: optional ``(N,)`` bool of the
    samples to sum)."""
    m, n, c = unimodal.shape
    mass = torch.softmax(unimodal.detach().float().permute(1, 0, 2).reshape(n, m * c), dim=-1).reshape(n, m, c).sum(-1)
    if counted is not None:
        mass = mass * counted.to(mass.dtype)[:, None]
    return mass.sum(0)
