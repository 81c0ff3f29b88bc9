r"""Cross-modal polysemanticity of a fusion head's neurons: **our** estimator, not the collapse paper's.

Chaudhuri et al. (ICML 2025) explain collapse by *cross-modal polysemantic* neurons of the fusion head, neurons
that respond to features of several modalities, through which one modality's noise masks another's signal;
their Table 9 measures polysemanticity, but the estimator is not given in the text we could read. This module
measures it by ablation attribution:

* :math:`a_{k,m} = \mathbb{E}_x\,|h_k(x) - h_k(x \setminus m)|`: how much neuron ``k`` of a chosen layer moves when
  modality ``m`` is removed (through the contract's ``fuse_subset``, so with the model's own fill);
* :math:`p_{k,m} = a_{k,m} / \sum_{m'} a_{k,m'}`: the neuron's share of each modality;
* :math:`\mathrm{score}_k = H(p_k) / \log M \in [0, 1]`: 0 when one modality drives the neuron (monosemantic
  across modalities), 1 when all drive it equally.

A neuron that no ablation moves (dead, or a constant) has no score (NaN) and is left out of the summaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["polysemanticity_scores", "polysemanticity_summary", "layer_ablation_changes",
           "fusion_polysemanticity"]


def polysemanticity_scores(attributions: Tensor, eps: float = 1e-12) -> Tensor:
    """``(K,)`` normalised entropy of each neuron's modality shares (NaN for a neuron no ablation moves)."""
    k, m = attributions.shape
    if m < 2:
        raise ValueError("polysemanticity needs at least two modalities.")
    total = attributions.sum(1, keepdim=True)
    p = attributions / total.clamp_min(eps)
    entropy = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(1) / math.log(m)
    return torch.where(total.squeeze(1) > eps, entropy, torch.full_like(entropy, math.nan))


def polysemanticity_summary(scores: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """``mean`` score of the live neurons, ``fraction`` of live neurons above ``threshold``, and ``live`` (how many)."""
    live = scores[~torch.isnan(scores)]
    if live.numel() == 0:
        return {"mean": math.nan, "fraction": math.nan, "live": 0.0}
    return {"mean": float(live.mean()), "fraction": float((live > threshold).double().mean()), "live": float(live.numel())}


@torch.no_grad()
def layer_ablation_changes(module: Any, features: dict[str, Tensor], layer: nn.Module, present: Optional[Any] = None,
                           modalities: Optional[Sequence[str]] = None) -> Tensor:
    """``(M, N, K)``: ``|h_k(x) − h_k(x without m)|`` for each modality ``m``, sample and neuron of ``layer`` (a
    layer of ``module``'s fusion with output ``(N, K)`` or ``(N, ..., K)``, averaged over the middle dimensions),
    removing each modality through ``module.fuse_subset``."""
    names = list(modalities or module.modalities)
    captured: list[Tensor] = []

    def grab(_: nn.Module, __: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(out.detach().reshape(out.shape[0], -1, out.shape[-1]).mean(1).double())

    handle = layer.register_forward_hook(grab)
    try:
        module.fuse_subset(features, names, present=present)
        for m in names:
            module.fuse_subset(features, [k for k in names if k != m], present=present)
    finally:
        handle.remove()
    if len(captured) != len(names) + 1:
        raise ValueError(f"the layer ran {len(captured)} times in {len(names) + 1} fusion passes; choose a layer "
                         f"of the fusion that runs once per pass.")
    return (torch.stack(captured[1:]) - captured[0].unsqueeze(0)).abs()


@torch.no_grad()
def fusion_polysemanticity(module: Any, features: dict[str, Tensor], layer: nn.Module,
                           present: Optional[Any] = None, modalities: Optional[Sequence[str]] = None,
                           threshold: float = 0.5) -> dict[str, Any]:
    """The scores of the neurons of ``layer`` on a batch of ``features`` (:func:`layer_ablation_changes`, averaged
    over the samples). Returns ``{"attributions": (K, M), "scores": (K,), "mean", "fraction", "live"}``."""
    attributions = layer_ablation_changes(module, features, layer, present, modalities).mean(1).T
    scores = polysemanticity_scores(attributions)
    return {"attributions": attributions, "scores": scores, **polysemanticity_summary(scores, threshold)}
