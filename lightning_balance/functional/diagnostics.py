"""Collapse and imbalance diagnostics on tensors (no Lightning): ranks, similarity, multicollinearity and
Shapley modality contribution. Definitions from the standard references named in each docstring."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import torch
from torch import Tensor

from lightning_balance.functional.agm import shapley_weights

__all__ = ["effective_rank", "numerical_rank", "linear_cka", "variance_inflation", "shapley_contributions"]


def _centred(z: Tensor) -> Tensor:
    z = z.reshape(z.shape[0], -1).double()
    return z - z.mean(0, keepdim=True)


def effective_rank(features: Tensor) -> float:
    r"""Effective rank (Roy & Vetterli 2007; RankMe, Garrido et al. 2023) of centred ``(N, d)`` features:
    :math:`\exp(-\sum_k p_k \log p_k)`, :math:`p_k = \sigma_k / \sum_j \sigma_j`; in ``[1, min(N, d)]``
    (0 for all-constant features)."""
    s = torch.linalg.svdvals(_centred(features))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(features: Tensor, rtol: float | None = None) -> int:
    """Number of singular values of the centred features above ``rtol · σ_max`` (default: numpy's
    ``max(N, d) · eps``, with the machine epsilon of the input's dtype)."""
    z = _centred(features)
    s = torch.linalg.svdvals(z)
    if s.numel() == 0 or s[0] == 0:
        return 0
    eps = torch.finfo(features.dtype if features.is_floating_point() else torch.float64).eps  # the input's precision
    tol = (rtol if rtol is not None else max(z.shape) * eps) * s[0]
    return int((s > tol).sum())


def linear_cka(x: Tensor, y: Tensor) -> float:
    r"""Linear CKA (Kornblith et al. 2019) of two representations of the same N samples:
    :math:`\lVert Y^\top X\rVert_F^2 / (\lVert X^\top X\rVert_F \lVert Y^\top Y\rVert_F)` on centred ``X, Y``.
    1 for representations equal up to rotation and isotropic scale; ≈ 0 for independent ones."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same samples, got {x.shape[0]} and {y.shape[0]} rows.")
    xc, yc = _centred(x), _centred(y)
    num = (yc.T @ xc).square().sum()
    den = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    return float(num / den) if den > 0 else 0.0


def variance_inflation(features: Tensor, ridge: float = 1e-6) -> Tensor:
    r"""Variance inflation factor of every feature: :math:`\mathrm{VIF}_j = [C^{-1}]_{jj}` with ``C`` the
    feature correlation matrix (ridge-regularised by ``ridge`` on the diagonal), i.e. ``1/(1 − R_j²)`` with
    ``R_j²`` from regressing feature ``j`` on all others. Constant features are dropped. Values above 5–10
    signal multicollinearity. Returns ``(d',)`` float64."""
    z = _centred(features)
    std = z.std(0)
    z = z[:, std > 0] / std[std > 0]
    corr = (z.T @ z) / max(z.shape[0] - 1, 1)
    corr = corr + ridge * torch.eye(corr.shape[0], dtype=corr.dtype)
    return torch.linalg.inv(corr).diagonal()


def shapley_contributions(value: Callable[[frozenset[str]], float], modalities: Sequence[str]) -> dict[str, float]:
    r"""Shapley contribution of each modality to a set function ``v`` (e.g. accuracy with the modalities
    outside ``S`` removed): :math:`\phi_m = \sum_{S \subseteq M \setminus m} \frac{|S|!(M-|S|-1)!}{M!}
    [v(S \cup m) - v(S)]`. ``v`` is called once per subset (``2^M`` calls), including the empty set; the
    weights are AGM's :func:`~lightning_balance.functional.agm.shapley_weights` applied to ``v(S) − v(∅)``."""
    names = list(modalities)
    empty = float(value(frozenset()))
    # subsets as bit masks 1 .. 2^M - 1 (bit b: names[b] present), the order of shapley_weights
    gains = torch.tensor([float(value(frozenset(n for b, n in enumerate(names) if mask >> b & 1))) - empty
                          for mask in range(1, 2 ** len(names))], dtype=torch.float64)
    phi = shapley_weights(len(names)).double() @ gains
    return dict(zip(names, phi.tolist()))


def masked_accuracy_value(fuse: Callable[[Mapping[str, Tensor]], Tensor], features: Mapping[str, Tensor],
                          targets: Tensor, chance: float | None = None) -> Callable[[frozenset[str]], float]:
    """``v(S)`` = accuracy of ``fuse`` with the features of the modalities outside ``S`` zeroed; ``v(∅)`` is
    the accuracy with everything zeroed (or ``chance`` if given)."""

    def value(subset: frozenset[str]) -> float:
        if not subset and chance is not None:
            return chance
        kept = {k: (z if k in subset else torch.zeros_like(z)) for k, z in features.items()}
        with torch.no_grad():
            return float((fuse(kept).argmax(-1) == targets).float().mean())

    return value


__all__.append("masked_accuracy_value")
