"""CML math (Ma et al., "Calibrating Multimodal Learning", ICML 2023). Pure tensor functions, no Lightning."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cml_ranking_penalty", "removal_chains"]


def removal_chains(num_modalities: int, batch_size: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """Per sample, a random removal order of the modalities: ``(N, M)`` permutations; subset ``S_j`` of
    sample ``i`` keeps every modality except the first ``j`` of its order."""
    keys = torch.rand(batch_size, num_modalities, generator=generator, device="cpu")
    return keys.argsort(dim=1).to(device)


def cml_ranking_penalty(chain_logits: Tensor, targets: Tensor, margin: float = 0.0,
                        gate: Literal["larger_correct", "all"] = "larger_correct") -> Tensor:
    r"""Per-sample ranking penalty of nested subsets, ``(N,)``:

    .. math::
        R_i = \sum_{j=0}^{M-2} g^{(j)}_i \max\big(0, \mathrm{Conf}^{(j+1)}_i - \mathrm{Conf}^{(j)}_i - \epsilon\big),
        \quad \mathrm{Conf}^{(j)}_i = \max_c \sigma(f(x_i^{S_j}))_c

    where ``S_0 ⊃ S_1 ⊃ …`` is each sample's chain of subsets (``chain_logits[j]`` are the logits on
    ``S_j``), the confidence is that of the **predicted** class, and the gate ``g`` is
    ``1[the larger subset predicts y_i]`` (``"larger_correct"``, the official MIWAE variant) or 1 (``"all"``).

    Args:
        chain_logits: ``(M, N, C)``, ``chain_logits[0]`` on all modalities.
        targets: ``(N,)``.
    """
    if chain_logits.ndim != 3 or chain_logits.shape[0] < 2:
        raise ValueError(f"chain_logits must have shape (M >= 2, N, C), got {tuple(chain_logits.shape)}.")
    if gate not in ("larger_correct", "all"):
        raise ValueError(f"gate must be 'larger_correct' or 'all', got {gate!r}.")
    probs = F.softmax(chain_logits.float(), dim=-1)
    conf = probs.max(dim=-1).values  # (M, N)
    hinge = (conf[1:] - conf[:-1] - margin).clamp_min(0)  # (M-1, N)
    if gate == "larger_correct":
        correct = (chain_logits[:-1].argmax(dim=-1) == targets.unsqueeze(0)).float()
        hinge = hinge * correct
    return hinge.sum(dim=0)
