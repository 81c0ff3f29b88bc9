r"""MBSD, modality-balanced self-distillation between the modalities' predictions (the survey's [12], Liu et al.,
WSDM 2023, as BalanceBenchmark implements it; no official code was found). Pure tensor functions, no Lightning.

Per pair of modalities :math:`(a, b)` and sample :math:`i`, with :math:`p_{m,i} = \sigma(o_{m,i})` and
:math:`t_{m,i} = p_{m,i}[y_i]`:

.. math::
    w_i = |t_{a,i} - t_{b,i}| \cdot \mathbb 1[\hat y_{a,i} = y_i \lor \hat y_{b,i} = y_i], \qquad
    RS_i = \tfrac1C \lVert o_{a,i} - o_{b,i} \rVert^2, \qquad
    KL_i = \mathrm{KL}\big(\mathrm{sg}(p_{s,i}) \,\|\, p_{w,i}\big)

where :math:`s` is the modality with the larger true-class probability on that sample and :math:`w` the other: the
stronger modality teaches the weaker one, more where they disagree more and at least one of them is right. The
pair's loss is :math:`\frac1N \sum_i w_i (RS_i + KL_i)`; for ``M > 2`` the pairs are averaged. BalanceBenchmark
feeds the two scalar true-class probabilities to ``F.kl_div`` (probabilities where it expects log-probabilities);
here the KL is the one over the classes that the method describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mbsd_pair_terms", "mbsd_distillation"]


def mbsd_pair_terms(logits_a: Tensor, logits_b: Tensor, targets: Tensor,
                    detach_weight: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, RS, KL)``, each ``(N,)``, for one pair of ``(N, C)`` unimodal logits (see the module docstring).

    ``targets`` must be valid class indices (mask unlabelled samples out of the reduction yourself).
    ``detach_weight``: ``w`` carries no gradient (BalanceBenchmark's weight does, likely unintended).
    """
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f"need two (N, C) logit tensors of one shape, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}.")
    a, b = logits_a.float(), logits_b.float()
    log_pa, log_pb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    t_a = log_pa.gather(1, targets[:, None]).squeeze(1).exp()
    t_b = log_pb.gather(1, targets[:, None]).squeeze(1).exp()
    right = (a.argmax(-1) == targets) | (b.argmax(-1) == targets)
    w = (t_a - t_b).abs() * right.to(a.dtype)
    if detach_weight:
        w = w.detach()
    rs = ((a - b) ** 2).sum(-1) / a.shape[-1]
    a_leads = (t_a >= t_b).unsqueeze(1)
    log_s = torch.where(a_leads, log_pa, log_pb).detach()  # the teacher: the stronger modality, no gradient
    log_w = torch.where(a_leads, log_pb, log_pa)
    kl = (log_s.exp() * (log_s - log_w)).sum(-1)
    return w, rs, kl


def mbsd_distillation(logits: Sequence[Tensor], targets: Tensor, counted: Optional[Tensor] = None,
                      detach_weight: bool = True, denominator: Optional[Tensor] = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """MBSD's distillation term: the mean over modality pairs of ``Σ_i w_i (RS_i + KL_i) / N``.

    Args:
        logits: ``M ≥ 2`` unimodal ``(N, C)`` logits (attached).
        targets: ``(N,)`` class indices; entries outside ``counted`` may be anything.
        counted: optional ``(M, N)`` bool: which samples count for each modality (labelled and present); a pair
            sums over the samples counted for both. ``None``: every sample counts.
        detach_weight: see :func:`mbsd_pair_terms`.
        denominator: ``N``, the number the sums are divided by (default: the batch size). The loss term passes
            the number of labelled samples, so that a pair present in 30% of them weighs 30% and DDP and
            accumulation equal one process on the whole batch (when every rank and micro-batch has the same
            number of labelled samples).

    Returns:
        ``(value, metrics)``: the scalar term and detached means of ``w``, ``RS`` and ``KL`` over the counted
        samples of all pairs.
    """
    m = len(logits)
    if m < 2:
        raise ValueError(f"MBSD distils between modalities: it needs at least two, got {m}.")
    n = logits[0].shape[0]
    if counted is not None and tuple(counted.shape) != (m, n):
        raise ValueError(f"counted must be (M, N) = ({m}, {n}), got {tuple(counted.shape)}.")
    safe = targets.clamp(0, logits[0].shape[-1] - 1) if counted is not None else targets
    norm = (torch.tensor(float(n), device=logits[0].device) if denominator is None
            else denominator.float().to(logits[0].device)).clamp_min(1.0)
    value = logits[0].new_zeros((), dtype=torch.float32)
    sums = torch.zeros(3, device=logits[0].device)
    total = torch.zeros((), device=logits[0].device)
    pairs = 0
    for i in range(m):
        for j in range(i + 1, m):
            w, rs, kl = mbsd_pair_terms(logits[i], logits[j], safe, detach_weight)
            if counted is None:
                both = torch.ones(n, device=w.device)
            else:
                both = (counted[i] & counted[j]).to(w.dtype)
            count = both.sum()
            value = value + (both * w * (rs + kl)).sum() / norm
            sums = sums + torch.stack([(both * v).sum() for v in (w, rs, kl)]).detach()
            total = total + count.detach()
            pairs += 1
    stats = sums / total.clamp_min(1.0)
    return value / pairs, {"weight": stats[0], "rs": stats[1], "kl": stats[2]}
