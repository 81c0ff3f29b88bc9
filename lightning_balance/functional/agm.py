"""AGM math (Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023). Pure tensor functions, no Lightning.

Subsets of the M modalities are bit masks ``1 .. 2^M - 1`` (bit ``u`` set: modality ``u`` present);
``F(S)`` is the fused output with the modalities outside ``S`` removed, and ``F(∅) := 0`` as in the
official code.
"""

from __future__ import annotations

from math import factorial

import torch
from torch import Tensor

__all__ = ["shapley_weights", "sampled_shapley_weights", "shapley_responses", "agm_scores", "agm_coefficients"]


def shapley_weights(num_modalities: int) -> Tensor:
    r"""``(M, 2^M - 1)`` matrix ``W`` with :math:`m_u = \sum_S W[u, S-1] F(S)` the Shapley response of ``u``:

    :math:`m_u = \sum_{S \subseteq M \setminus u} \frac{|S|!(M-|S|-1)!}{M!} [F(S \cup u) - F(S)]`,
    with ``F(∅) = 0``. For M = 2: ``m_a = ½[F(a,v) − F(0,v) + F(a,0)]``. Columns sum to 1 for the full
    set and to 0 for every other subset, so ``Σ_u m_u = F(all)``.
    """
    m = num_modalities
    if m < 2:
        raise ValueError(f"AGM needs at least 2 modalities, got {m}.")

    def weight(size: int) -> float:
        return factorial(size) * factorial(m - size - 1) / factorial(m)

    w = torch.zeros(m, 2**m - 1, dtype=torch.float64)
    for subset in range(1, 2**m):
        size = bin(subset).count("1")
        for u in range(m):
            if subset >> u & 1:
                w[u, subset - 1] += weight(size - 1)  # F(S ∪ u) with |S| = size - 1
            else:
                w[u, subset - 1] -= weight(size)  # -F(S)
    return w.float()


def sampled_shapley_weights(num_modalities: int, permutations: int,
                            generator: torch.Generator | None = None) -> tuple[list[int], Tensor]:
    r"""A sampled-permutation estimate of :func:`shapley_weights` whose cost grows linearly in ``M``.

    With ``P`` orders :math:`\pi_1..\pi_P` of the modalities drawn uniformly (``torch.randperm`` from
    ``generator``), :math:`\hat m_u = \frac1P \sum_p [F(\mathrm{pre}_p(u) \cup u) - F(\mathrm{pre}_p(u))]`, with
    :math:`\mathrm{pre}_p(u)` the modalities before ``u`` in :math:`\pi_p` and ``F(∅) = 0`` (Castro, Gómez, Tejada,
    "Polynomial calculation of the Shapley value based on sampling", Computers & Operations Research 2009). The
    responses are unbiased (the exact value is their mean over all ``M!`` orders; a function of them, such as a
    score, is not), keep ``Σ_u m̂_u = F(all)`` exactly, and needs
    the ``F(S)`` of at most ``P·(M − 1)`` proper subsets (each order's prefixes) instead of ``2^M − 2``.

    Returns ``(subsets, W)``: the bit masks of the subsets it reads, in increasing order with the full set last,
    and the ``(M, len(subsets))`` weights with :math:`\hat m_u = \sum_k W[u, k] F(\text{subsets}[k])`.
    """
    m = num_modalities
    if m < 2:
        raise ValueError(f"AGM needs at least 2 modalities, got {m}.")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}.")
    acc: dict[int, list[float]] = {}
    for _ in range(permutations):
        prev = 0
        for u in torch.randperm(m, generator=generator).tolist():
            cur = prev | (1 << u)
            acc.setdefault(cur, [0.0] * m)[u] += 1.0 / permutations
            if prev:
                acc.setdefault(prev, [0.0] * m)[u] -= 1.0 / permutations
            prev = cur
    full = 2**m - 1
    subsets = sorted(k for k in acc if k != full) + [full]
    w = torch.tensor([acc[k] for k in subsets], dtype=torch.float64).T
    return subsets, w.float()


def shapley_responses(subset_logits: Tensor, weights: Tensor) -> Tensor:
    """Mono-modal responses ``(M, N, C)`` from the stacked ``(2^M - 1, N, C)`` subset outputs."""
    return torch.einsum("us,snc->unc", weights.to(subset_logits), subset_logits)


def agm_scores(responses: Tensor, targets: Tensor, floor: float = 1e-8, valid: Tensor | None = None) -> Tensor:
    """Per-modality batch **sums** of ``-log max(σ(m_u)[y], floor)`` (the official score, lower = better),
    over the samples in ``valid`` if given (the others' targets must still be valid indices, e.g. 0)."""
    p = torch.softmax(responses.float(), dim=-1)
    index = targets.reshape(1, -1, 1).expand(responses.shape[0], -1, 1)
    per_sample = -torch.log(p.gather(-1, index).squeeze(-1).clamp_min(floor))
    if valid is not None:  # not a product: a left-out row may be NaN
        per_sample = torch.where(valid, per_sample, torch.zeros((), device=per_sample.device))
    return per_sample.sum(dim=-1)


#: cap of the exponent of κ: exp(80) ≈ 5.5e34 is finite in float32 (whose exp overflows above ≈ 88.7)
KAPPA_EXPONENT_CAP = 80.0


def agm_coefficients(
    losses: Tensor, running: Tensor, alpha: float, clamp: float | None = 10.0
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Modulation coefficients from the current mean scores and the running means before this step.

    .. math::
        r_u = \exp\big(\tfrac{M}{M-1}(\bar\ell - \ell_u)\big), \quad
        \bar r_u = \exp\big(\tfrac{M}{M-1}(\bar L - L_u)\big), \quad
        \kappa_u = \exp\big(\min(\alpha \min(\bar r_u - r_u, \text{clamp}),\ 80)\big)

    For M = 2, ``r_a = exp(ℓ_v − ℓ_a)`` as in the official code. The cap at 80 (ours) keeps ``κ`` finite in
    float32; the official code has none and gives ``inf`` for ``α·(r̄ − r) > 88.7`` (with its clamp of 10:
    ``α > 8.87``).

    Returns:
        ``(kappa, r, r_bar)``, each ``(M,)``.
    """
    m = losses.numel()
    scale = m / (m - 1)
    losses = losses.float()
    running = running.float().to(losses.device)
    r = torch.exp(scale * (losses.mean() - losses))
    r_bar = torch.exp(scale * (running.mean() - running))
    diff = r_bar - r
    if clamp is not None:
        diff = diff.clamp(max=clamp)
    return torch.exp((alpha * diff).clamp(max=KAPPA_EXPONENT_CAP)), r, r_bar
