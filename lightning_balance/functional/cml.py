r"""CML math (Ma et al., "Calibrating Multimodal Learning", ICML 2023). Pure tensor functions, no Lightning.

The official objective (``QingyangZhang/CML``, ``miwae/train.py``, the MIWAE experiments, lines 280-304) is,
for a batch of ``N`` samples and each sample's chain of ``M`` nested modality subsets ``S_0 ⊃ … ⊃ S_{M-1}``:

.. math::
    L = \frac1M \sum_{j=0}^{M-1} \mathrm{CE}\big(f(x^{S_j}), y\big) + \frac{\beta}{100} \sum_i \sum_{j=0}^{M-2}
        \Big[ c^{(j)}_i \,[\mathrm{Conf}^{(j+1)}_i - \mathrm{Conf}^{(j)}_i - \epsilon]_+
            + w^{(j)}_i \,[\mathrm{Conf}^{(j+1)}_i - \mathrm{sg}(\mathrm{Conf}^{(j)}_i) - \epsilon]_+ \Big]

with ``CE`` the batch mean, ``Conf`` the maximum softmax probability (of the predicted class),
``c = 1[S_j predicts y]`` ("trick 1"), ``w = 1[S_j and S_{j+1} both predict wrongly]`` ("trick 2", ``sg`` the
stop-gradient), the ranking terms **summed** over the batch, and ``β = 10`` in the README's command.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cml_objective", "cml_ranking_penalty", "removal_chains"]

Gate = Literal["larger_correct", "cpm", "all"]
_GATES = ("larger_correct", "cpm", "all")


def removal_chains(num_modalities: int, batch_size: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", present: Optional[Tensor] = None) -> Tensor:
    """Per sample, a random removal order of the modalities: ``(N, M)`` permutations (uniform, like the
    official ``random.shuffle`` per sample); subset ``S_j`` of sample ``i`` keeps every modality except the
    first ``j`` of its order. Drawn on the CPU from ``generator`` (torch's global stream if ``None``).

    With ``present`` (``(N, M)`` bool), a sample's absent modalities come first in its order (their removal
    changes nothing: those chain steps are no-ops, left out by :func:`chain_steps`), then its present ones in
    a uniformly random order. The draws are the same with or without the mask."""
    keys = torch.rand(batch_size, num_modalities, generator=generator, device="cpu").to(device)
    if present is not None:  # on the mask's device: no host sync
        keys = torch.where(present.to(keys.device), keys, torch.full_like(keys, -1.0))
    return keys.argsort(dim=1)


def chain_steps(present: Tensor) -> Tensor:
    """``(M - 1, N)`` bool: whether chain step ``j = 1 … M-1`` of each sample removes a modality it has (with
    the absent ones removed first, steps ``j <= a_i`` are no-ops, ``a_i`` = its number of absent modalities)."""
    m = present.shape[1]
    absent = (~present).sum(1)  # (N,)
    steps = torch.arange(1, m, device=present.device).unsqueeze(1)  # (M-1, 1)
    return steps > absent.unsqueeze(0)


def cml_ranking_penalty(chain_logits: Tensor, targets: Tensor, margin: float = 0.0, gate: Gate = "larger_correct",
                        both_wrong: bool = True, valid: Optional[Tensor] = None,
                        steps: Optional[Tensor] = None) -> Tensor:
    r"""Per-sample ranking penalty of nested subsets, ``(N,)``:

    .. math::
        R_i = \sum_{j=0}^{M-2} g^{(j)}_i \big[\mathrm{Conf}^{(j+1)}_i - \mathrm{Conf}^{(j)}_i - \epsilon\big]_+
              + w^{(j)}_i \big[\mathrm{Conf}^{(j+1)}_i - \mathrm{sg}(\mathrm{Conf}^{(j)}_i) - \epsilon\big]_+,
        \quad \mathrm{Conf}^{(j)}_i = \max_c \sigma(f(x_i^{S_j}))_c

    ``chain_logits[j]`` are the logits on ``S_j`` (``S_0 ⊃ S_1 ⊃ …``); the confidence is that of the
    **predicted** class. The gate ``g`` is ``1[S_j predicts y_i]`` (``"larger_correct"``: the official MIWAE
    code's "trick 1", ``miwae/train.py`` l. 296), ``1 − 1[S_j wrong and S_{j+1} right]`` (``"cpm"``: the
    official CPM-Nets code, ``cpm/CPM_Nets.py`` l. 122) or 1 (``"all"``). With ``both_wrong`` the second
    term (the MIWAE code's "trick 2", l. 298-302: ``w = 1[S_j and S_{j+1} both wrong]``, gradient into the
    smaller subset's confidence only) is added. Samples outside ``valid`` (e.g. targets equal to an
    ``ignore_index``) get 0.

    Args:
        chain_logits: ``(M, N, C)``, ``chain_logits[0]`` on all modalities.
        targets: ``(N,)`` class indices (any value where ``valid`` is False).
        valid: optional ``(N,)`` bool mask of the samples to score.
        steps: optional ``(M - 1, N)`` bool (:func:`chain_steps`): the pairs ``(S_{j-1}, S_j)`` to rank; a
            no-op step (a modality the sample lacks) ranks nothing.
    """
    if chain_logits.ndim != 3 or chain_logits.shape[0] < 2:
        raise ValueError(f"chain_logits must have shape (M >= 2, N, C), got {tuple(chain_logits.shape)}.")
    if gate not in _GATES:
        raise ValueError(f"gate must be one of {_GATES}, got {gate!r}.")
    probs = F.softmax(chain_logits.float(), dim=-1)
    conf = probs.max(dim=-1).values  # (M, N)
    correct = chain_logits.argmax(dim=-1) == targets.unsqueeze(0)  # (M, N)
    larger, smaller = correct[:-1], correct[1:]
    hinge = (conf[1:] - conf[:-1] - margin).clamp_min(0)  # (M-1, N)
    if gate == "larger_correct":
        hinge = hinge * larger
    elif gate == "cpm":
        hinge = hinge * ~(~larger & smaller)
    if both_wrong:
        hinge = hinge + (conf[1:] - conf[:-1].detach() - margin).clamp_min(0) * (~larger & ~smaller)
    if steps is not None:
        hinge = torch.where(steps, hinge, torch.zeros((), device=hinge.device))
    penalty = hinge.sum(dim=0)
    if valid is not None:
        penalty = penalty * valid
    return penalty


def cml_objective(chain_logits: Tensor, targets: Tensor, rank_weight: float = 0.1, subset_weight: float = 1.0,
                  margin: float = 0.0, gate: Gate = "larger_correct", both_wrong: bool = True,
                  reduction: Literal["sum", "mean"] = "sum", valid: Optional[Tensor] = None,
                  steps: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    r"""What CML adds to a loss that already holds the cross-entropy on all modalities, and the per-sample
    penalty ``R_i`` (:func:`cml_ranking_penalty`):

    .. math::
        \mathrm{value} = \mu \sum_{j=1}^{M-1} \mathrm{CE}\big(f(x^{S_j}), y\big) + M \lambda \,\mathrm{red}_i(R_i)

    With the defaults (``μ = 1``, ``red = Σ``, ``λ = β/100 = 0.1``), ``CE(f(x^{S_0}), y) + value`` is ``M``
    times the official objective (module docstring): the subsets' cross-entropies and the ranking term keep
    the official weights relative to each other and to the cross-entropy on all modalities, which the user's
    loss supplies with weight 1 instead of ``1/M``. The factor ``M`` is a learning-rate factor for SGD and
    changes nothing for Adam. ``reduction="mean"`` averages ``R_i`` over the samples instead (batch-size
    invariant; not the official objective). Cross-entropies and the reduction run over the ``valid``
    samples only; with none valid the value is 0 (still attached to the graph).

    Args:
        chain_logits: ``(M, N, C)``, ``chain_logits[0]`` on all modalities.
        targets: ``(N,)``.
        rank_weight: λ, the official ``β/100``.
        subset_weight: μ, each smaller subset's cross-entropy weight relative to the one on all modalities.
        reduction: ``"sum"`` (official) or ``"mean"`` over the samples.
        valid: optional ``(N,)`` bool mask (default: every sample).
        steps: optional ``(M - 1, N)`` bool (:func:`chain_steps`): the chain steps that remove a modality the
            sample has; the others add no cross-entropy and rank nothing (a sample with fewer modalities has
            a shorter chain).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    m, n = chain_logits.shape[0], chain_logits.shape[1]
    valid = torch.ones(n, dtype=torch.bool, device=chain_logits.device) if valid is None else valid
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    penalty = cml_ranking_penalty(chain_logits, safe, margin, gate, both_wrong, valid, steps)
    count = valid.sum().clamp_min(1)
    # (M-1, N) cross-entropies of the smaller subsets, averaged over the valid samples of each subset
    ce = F.cross_entropy(chain_logits[1:].float().flatten(0, 1), safe.repeat(m - 1), reduction="none").view(m - 1, n)
    counted = valid.unsqueeze(0) if steps is None else valid.unsqueeze(0) & steps
    subsets = torch.where(counted, ce, torch.zeros((), device=ce.device)).sum() / count
    ranked = penalty.sum() if reduction == "sum" else penalty.sum() / count
    return subset_weight * subsets + m * rank_weight * ranked, penalty
