r"""LFM, dynamically learning the modality gap (Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification via
Dynamically Learning Modality Gap", NeurIPS 2024). Pure tensor functions, no Lightning.

The supervised loss is mixed with an unsupervised cross-modal matching loss, with a weight that starts
alignment-heavy and moves to classification over training:

.. math::
    L = 2\,\big(\alpha_{cls}(t)\, \mathrm{CE}(f, y) + \alpha_{align}(t)\, D(\sigma(o_a), \sigma(o_v))\big),
    \qquad \alpha_{cls} + \alpha_{align} = 1

with :math:`o_m` the unimodal logits and, in the official code (``Alignment``),

.. math::
    D(p, q) = \tfrac12\big(\mathrm{KL}(m \,\|\, p) + \mathrm{KL}(m \,\|\, q)\big), \quad m = \tfrac12 (p + q)

averaged over the batch (``F.kl_div(p.log(), m, reduction="batchmean")`` is :math:`\mathrm{KL}(m\|p)`, so this is
the Jensen-Shannon form with the KL arguments swapped; the textbook JS divergence
:math:`\tfrac12(\mathrm{KL}(p\|m) + \mathrm{KL}(q\|m))` is ``divergence="js"``). Both are symmetric, zero exactly
when ``p = q``, and gradients flow through ``m``.

Two schedules of the official code: the **fitted** one (``Crema_epoch.py``, the default script), a degree-5
polynomial of the epoch fitted to a learned trajectory over 200 epochs, and the **learnable** one
(``Crema_epoch_learnable.py``): once per epoch, on one fixed held-out batch,
:math:`\alpha_{align} \leftarrow \operatorname{clip}_{[0.05, 0.95]}(\alpha_{align} - \eta_\alpha h)` with
:math:`h` the mean of the first parameter tensor's entries of the Hessian-vector product
:math:`\nabla^2_\theta L_{tot}\, \nabla_\theta L_{cls}`, :math:`L_{tot} = \alpha_{cls} L_{cls} + \alpha_{align} D`,
and :math:`\eta_\alpha` halved at every 20th epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FITTED_ALPHA_CLS",
    "lfm_divergence",
    "lfm_alignment",
    "lfm_fitted_alpha",
    "lfm_hypergradient",
    "lfm_alpha_step",
]

#: coefficients ``a_0 … a_5`` of the official fitted schedule ``α_cls(t) = Σ_i a_i t^i`` (``getAlpha_Learnable_Fitted``)
FITTED_ALPHA_CLS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
#: the number of epochs the fitted polynomial was fitted on (the official 200-epoch run)
FITTED_EPOCHS = 200

Divergence = Literal["official", "js"]


def lfm_divergence(logits_p: Tensor, logits_q: Tensor, divergence: Divergence = "official") -> Tensor:
    """``(N,)`` per-sample divergence between the softmax distributions of two ``(N, C)`` logit tensors.

    ``"official"``: ``½ (KL(m‖p) + KL(m‖q))``, the official ``Alignment`` before its batch mean; ``"js"``: the
    Jensen-Shannon divergence ``½ (KL(p‖m) + KL(q‖m))``; ``m = ½ (p + q)``. Computed in float32 from log-softmax
    (the official ``softmax(·).log()`` is the same value without its underflow to ``-inf``).
    """
    if divergence not in ("official", "js"):
        raise ValueError(f"divergence must be 'official' or 'js', got {divergence!r}.")
    if logits_p.shape != logits_q.shape or logits_p.ndim != 2:
        raise ValueError(f"need two (N, C) logit tensors of one shape, got {tuple(logits_p.shape)} and "
                         f"{tuple(logits_q.shape)}.")
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # log m without underflow (finite gradients too)
    m = log_m.exp()
    if divergence == "official":  # Σ_c m (log m − log p) and the same with q
        kl_p = (m * (log_m - log_p)).sum(-1)
        kl_q = (m * (log_m - log_q)).sum(-1)
    else:
        kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def lfm_alignment(logits: Sequence[Tensor], present: Optional[Tensor] = None,
                  divergence: Divergence = "official") -> Tensor:
    """The matching loss: the batch mean of :func:`lfm_divergence`, averaged over every pair of modalities (two
    modalities: the official loss; ``M > 2``: the mean over the ``M(M-1)/2`` pairs).

    Args:
        logits: ``M ≥ 2`` unimodal ``(N, C)`` logit tensors (attached: the loss trains the encoders and the head).
        present: optional ``(N, M)`` bool: a pair sums over the samples that have both modalities, divided by
            ``N`` (the library's convention, as ``add_unimodal_losses``: a pair present in 30% of the samples weighs
            30%, and DDP and accumulation equal one process on the whole batch).
        divergence: ``"official"`` or ``"js"`` (:func:`lfm_divergence`).
    """
    if len(logits) < 2:
        raise ValueError(f"the matching loss needs at least two modalities, got {len(logits)}.")
    n = logits[0].shape[0]
    if present is not None and tuple(present.shape) != (n, len(logits)):
        raise ValueError(f"present must be (N, M) = ({n}, {len(logits)}), got {tuple(present.shape)}.")
    total = logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for i in range(len(logits)):
        for j in range(i + 1, len(logits)):
            d = lfm_divergence(logits[i], logits[j], divergence)
            if present is None:
                total = total + d.mean()
            else:
                both = (present[:, i] & present[:, j]).to(d.dtype)
                total = total + (d * both).sum() / max(n, 1)
            pairs += 1
    return total / pairs


def lfm_fitted_alpha(epoch: float, horizon: Optional[int] = None) -> tuple[float, float]:
    """``(α_cls, α_align)`` of the official fitted schedule at ``epoch`` (``α_align = 1 − α_cls``).

    ``horizon``: ``None`` evaluates the polynomial at the epoch index, as the official code (fitted on epochs
    0-199; later epochs use 199, where the official run ends). An int ``H`` stretches the 200 fitted epochs over a
    run of ``H`` epochs (``t = epoch · 200 / H``). The polynomial exceeds 1 near its end (``α_cls(180) ≈ 1.008``), so
    ``α_align`` is slightly negative there, as in the official code.
    """
    if horizon is not None and (not isinstance(horizon, int) or horizon <= 0):
        raise ValueError(f"horizon must be None or an int > 0, got {horizon!r}.")
    t = float(epoch) if horizon is None else float(epoch) * FITTED_EPOCHS / horizon
    t = min(max(t, 0.0), FITTED_EPOCHS - 1.0)
    cls = sum(c * t ** i for i, c in enumerate(FITTED_ALPHA_CLS))
    return cls, 1.0 - cls


def lfm_hypergradient(total_loss: Tensor, cls_loss: Tensor, params: Sequence[Tensor], index: int = 0) -> Tensor:
    """The official hyper-gradient: the mean of entry ``index`` of the Hessian-vector product
    ``∇²_θ L_tot · ∇_θ L_cls`` over ``params`` (official: every model parameter, entry 0 = the first tensor).

    ``total_loss`` and ``cls_loss`` must be built from ``params`` with a graph (twice differentiable). Parameters a
    loss does not reach count as zero gradients. Returns a 0-d float32 tensor.
    """
    params = list(params)
    if not 0 <= index < len(params):
        raise ValueError(f"index {index} is outside the {len(params)} parameters.")
    theta = torch.autograd.grad(total_loss, params, create_graph=True, allow_unused=True)
    cls = torch.autograd.grad(cls_loss, params, allow_unused=True, retain_graph=True)  # the vector: no graph
    pairs = [(t, c if c is not None else torch.zeros_like(p), p)
             for t, c, p in zip(theta, cls, params) if t is not None and t.requires_grad]
    if not any(p is params[index] for _, _, p in pairs):
        return torch.zeros((), dtype=torch.float32, device=params[index].device)
    hvp = torch.autograd.grad([t for t, _, _ in pairs], [p for _, _, p in pairs],
                              grad_outputs=[c.detach() for _, c, _ in pairs], allow_unused=True)
    for (_, _, p), h in zip(pairs, hvp):
        if p is params[index]:
            return torch.zeros((), dtype=torch.float32, device=p.device) if h is None else h.float().mean()
    raise AssertionError("unreachable")


def lfm_alpha_step(alpha_align: float, lr_alpha: float, hypergradient: float, epoch: int,
                   low: float = 0.05, high: float = 0.95, halve_every: int = 20) -> tuple[float, float, float]:
    """One epoch's update of the learnable schedule (official ``getAlpha_Learnable``): the learning rate is halved
    at every ``halve_every``-th epoch but the first, then ``α_align ← clip(α_align − η h, low, high)``.

    Returns ``(α_cls, α_align, η)``.
    """
    if halve_every > 0 and epoch % halve_every == 0 and epoch != 0:
        lr_alpha = lr_alpha / 2
    alpha_align = max(low, min(high, alpha_align - lr_alpha * hypergradient))
    return 1.0 - alpha_align, alpha_align, lr_alpha
