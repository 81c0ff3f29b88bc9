"""ReconBoost (Hua, Xu, Bao, Yang, Huang, ICML 2024, "ReconBoost: Boosting Can Achieve Modality Reconcilement").

Pure tensor functions, no Lightning:

* :func:`reconboost_schedule` — which stage, phase and modality an epoch belongs to (stages alternate the
  modalities; each stage trains one learner for ``epochs_per_stage`` epochs, then corrects the ensemble for
  ``correct_epochs`` epochs);
* :func:`boosting_loss` — the per-sample reconcilement-weighted cross-entropy
  ``ℓ_i = −(1/C) (w1 − w2 · q_i) log softmax(f_m(x_i))_{y_i}``, ``q_i = softmax(F_{−m}(x_i))_{y_i}``;
* :func:`alignment_loss` — the per-sample "GA" term ``(1/C) Σ_c (softmax(f_m)_c − softmax(f_prev)_c)²``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["alignment_loss", "boosting_loss", "reconboost_schedule"]


def reconboost_schedule(epoch: int, epochs_per_stage: int, correct_epochs: int, num_modalities: int
                        ) -> tuple[int, int, int, bool]:
    """``(stage, phase, modality index, first epoch of its phase)`` of a 0-based epoch: stage
    ``s = epoch // (E1 + E2)`` trains modality ``s mod M`` alone (phase 1, ``E1`` epochs), then corrects the whole
    ensemble (phase 2, ``E2`` epochs; none if ``E2 = 0``)."""
    length = epochs_per_stage + correct_epochs
    stage, offset = divmod(epoch, length)
    phase = 1 if offset < epochs_per_stage else 2
    first = offset == 0 or offset == epochs_per_stage
    return stage, phase, stage % num_modalities, first


def boosting_loss(logits: Tensor, others: Optional[Tensor], targets: Tensor, weight1: float, weight2: float,
                  has_others: Optional[Tensor] = None) -> Tensor:
    """``(N,)`` per-sample boosting loss of the learner's ``(N, C)`` logits given the other learners' ensemble logits
    ``F_{−m}`` (``None``, or a sample with ``has_others`` False: no other learner, ``q = 1``, as the official constant
    ensemble of an empty ``DynamicNet`` gives), as the official code writes it:
    ``−w1 · mean_c(t · log p) + w2 · mean_c(t · softmax(F_{−m}) · log p)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, targets[:, None])[:, 0]
    if others is None:
        q = torch.ones_like(picked)
    else:
        q = F.softmax(others.float(), dim=-1).gather(1, targets[:, None])[:, 0].detach()
        if has_others is not None:
            q = torch.where(has_others, q, torch.ones_like(q))
    c = logits.shape[-1]
    return -(weight1 - weight2 * q) * picked / c


def alignment_loss(logits: Tensor, previous: Tensor, gradient: bool = True) -> Tensor:
    """``(N,)`` per-sample ``(1/C) Σ_c (softmax(f_m)_c − softmax(f_prev)_c)²`` (``MSELoss`` over the batch is the mean
    of these). The official code detaches both sides, so the term has no gradient; ``gradient=True`` keeps the
    current learner's side live (only the previous learner's prediction is a fixed target)."""
    p = F.softmax(logits.float(), dim=-1)
    if not gradient:
        p = p.detach()
    target = F.softmax(previous.float(), dim=-1).detach()
    return ((p - target) ** 2).mean(-1)
