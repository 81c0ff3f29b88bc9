r"""OPM, on-the-fly prediction modulation (Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal
Learning", T-PAMI 2024): the feed-forward counterpart of OGM. Pure tensor functions, no Lightning.

During training, the features of the currently dominant modality are dropped per sample, with a probability that
grows with its lead, so that the fused prediction has to rely more on the others:

.. math::

    \rho_m = \frac{s_m}{\operatorname{mean}_{k \ne m} s_k}, \qquad
    q_m = \operatorname{clip}_{[0, 1]}\Big(q_{base}\,\big(1 + \lambda \tanh(\operatorname{ReLU}(\rho_m - 1))\big)\Big)
    \ \text{if } \rho_m > 1, \text{ else } q_m = 0

with :math:`s_m` OGM's score (the batch sum of the true-class softmax probability of modality ``m``'s unimodal
logits). With probability :math:`p_{exe}` (one draw per batch) the step drops: sample ``i`` keeps modality ``m``
with probability :math:`1 - q_m`, and every kept feature is scaled by one factor for all modalities,

.. math:: z'_{i,m} = \frac{k_{i,m}\, z_{i,m}}{1 - \theta}, \qquad \theta = \frac{\sum_m d_m q_m}{\sum_m d_m}

(:math:`d_m` the feature widths: the width-weighted mean drop rate, not a per-modality inverted dropout). In the
official code a sample that lost every modality leaves the batch (its loss is not computed); ``rescue=True`` keeps
such a sample's present modalities instead. With every modality present this never happens: the modality of the
lowest score never leads the mean of the others, so its ``q`` is 0 and it is always kept. For two modalities :math:`\rho` is the
paper's ratio exactly; for ``M > 2`` the mean of the others is ours (the official code has two modalities).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_balance.functional.ogm import ogm_ratios

__all__ = ["opm_drop_probabilities", "opm_scale", "opm_drop"]


def opm_drop_probabilities(scores: Tensor, q_base: float = 0.5, lam: float = 0.5, eps: float = 1e-8) -> Tensor:
    """``q``, ``(M,)``: each modality's drop probability from its scores (the official ``calcu_q``): only a modality
    that leads the mean of the others (``ρ_m > 1``) is dropped, with probability between ``q_base`` and
    ``q_base · (1 + lam)``, clipped to ``[0, 1]``.

    Args:
        scores: ``(M,)`` non-negative scores (OGM's, :func:`~lightning_balance.functional.ogm_ratios`), M ≥ 2.
        q_base: the drop probability of a modality that barely leads (official 0.5: the script's argparse default overrides its config's 0.4).
        lam: how much a larger lead adds (official 0.5).
    """
    if not 0 <= q_base <= 1 or lam < 0:
        raise ValueError(f"q_base must be in [0, 1] and lam >= 0, got {q_base!r} and {lam!r}.")
    ratios = ogm_ratios(scores, eps)
    lead = torch.tanh(torch.relu(ratios - 1.0))
    return torch.where(lead > 0, q_base * (1.0 + lam * lead), torch.zeros_like(lead)).clamp(0.0, 1.0)


def opm_scale(q: Tensor, dims: Sequence[int]) -> Tensor:
    """``1 / (1 − θ)`` with ``θ = Σ d_m q_m / Σ d_m``: the one factor of every kept feature (a 0-d tensor).

    ``θ < 1`` whenever ``q`` comes from :func:`opm_drop_probabilities` (the modality of the lowest score never
    leads the mean of the others, so its ``q`` is 0). A ``q`` of all ones is refused where that costs no host sync
    (a CPU tensor)."""
    widths = [int(d) for d in dims]
    if len(widths) != q.numel() or min(widths, default=0) <= 0:
        raise ValueError(f"dims must give one positive width per modality ({q.numel()}), got {dims!r}.")
    d = torch.tensor(widths, dtype=q.dtype, device=q.device)
    theta = (d * q).sum() / d.sum()
    if q.device.type == "cpu" and theta >= 1:
        raise ValueError(f"every feature would be dropped (theta = {float(theta):g}): lower q_base or lam.")
    return 1.0 / (1.0 - theta)


def opm_drop(features: Mapping[str, Tensor], uniform: Tensor, q: Tensor, dims: Sequence[int],
             present: Optional[Tensor] = None, rescue: bool = False) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One dropping step (the official ``execute_drop``, once the batch's ``p_exe`` draw said drop).

    Args:
        features: modality -> ``(N, ...)`` features in declared order (token features too).
        uniform: ``(N, M)`` draws in ``[0, 1)``; sample ``i`` keeps modality ``m`` when ``uniform[i, m] >= q[m]``
            (probability ``1 − q_m``).
        q: ``(M,)`` drop probabilities (:func:`opm_drop_probabilities`).
        dims: the feature widths ``d_m`` of the rescaling.
        present: optional ``(N, M)`` bool presence: an absent modality is never kept (its features are the fill
            and stay out of the decision of which samples survive).
        rescue: a sample that would keep none of its present modalities keeps them all, unscaled (it survives:
            nothing of it was dropped), instead of leaving the batch. Only a sample whose never-dropped modalities are all absent can need it.

    Returns:
        ``(features', keep, survivors)``: the dropped and rescaled features of every sample (select
        ``survivors`` for the loss), ``keep`` ``(N, M)`` bool, ``survivors`` ``(N,)`` bool (kept some modality).
    """
    names = list(features)
    n = next(iter(features.values())).shape[0]
    if uniform.shape != (n, len(names)) or q.shape != (len(names),):
        raise ValueError(f"uniform must be (N, M) = ({n}, {len(names)}) and q (M,), got {tuple(uniform.shape)} and "
                         f"{tuple(q.shape)}.")
    keep = uniform >= q.to(uniform.dtype)
    if present is not None:
        keep = keep & present.to(keep.device)
    scale = opm_scale(q, dims).reshape(1).expand(n)
    if rescue:  # a rescued sample keeps what it has, unscaled: nothing of it was dropped
        everything = torch.ones_like(keep) if present is None else present.to(keep.device)
        rescued = ~keep.any(1)
        keep = torch.where(rescued[:, None], everything, keep)
        scale = torch.where(rescued.to(scale.device), torch.ones_like(scale), scale)
    out = {}
    for i, m in enumerate(names):
        z = features[m]
        shape = (n, *([1] * (z.ndim - 1)))
        factor = keep[:, i].to(scale.device).to(torch.float32) * scale.float()  # the factor in fp32, then cast once
        out[m] = z * factor.reshape(shape).to(z.dtype)
    return out, keep, keep.any(1)
