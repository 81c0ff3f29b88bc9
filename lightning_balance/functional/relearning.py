"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024): the diagnosis and the soft re-initialisation.

Pure tensor functions, no Lightning:

* :func:`minmax_scale` — per-column scaling to ``[-1, 1]`` (scikit-learn's ``MinMaxScaler(feature_range=(-1, 1))``);
* :func:`kmeans` — k-means++ seeding (greedy, scikit-learn's) and Lloyd iterations, vectorised;
* :func:`cluster_purity` — ``P = (1/n) Σ_clusters max_class |cluster ∩ class|``;
* :func:`relearning_strength` — ``α = tanh(λ · |P_train − P_holdout|)``;
* :func:`soft_reinit_` — ``θ ← α θ⁰ + (1 − α) θ`` in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = ["cluster_purity", "kmeans", "minmax_scale", "relearning_strength", "soft_reinit_", "canonical_order"]


def minmax_scale(features: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Each column of ``(n, d)`` ``features`` mapped linearly onto ``[low, high]`` (its minimum to ``low``, its
    maximum to ``high``); a constant column (range below ``10 · eps`` of the dtype) becomes ``low``, as
    scikit-learn's ``MinMaxScaler`` does."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"minmax_scale expects (n, d) features with n > 0, got shape {tuple(features.shape)}.")
    lo, hi = features.amin(0), features.amax(0)
    span = hi - lo
    span = torch.where(span > 10 * torch.finfo(span.dtype).eps, span, torch.ones_like(span))
    return (features - lo) / span * (high - low) + low


def _squared_distances(x: Tensor, centres: Tensor, x_sq: Tensor) -> Tensor:
    """``(n, k)`` squared Euclidean distances, ``‖x‖² − 2 x·c + ‖c‖²`` clamped at 0."""
    return (x_sq[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]).clamp_min_(0.0)


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator, x_sq: Optional[Tensor] = None) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; scikit-learn's variant with ``2 + ⌊ln k⌋`` candidate
    draws per centre, keeping the candidate that lowers the potential most): ``(k, d)`` initial centres."""
    n = x.shape[0]
    x_sq = (x * x).sum(1) if x_sq is None else x_sq
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    closest = _squared_distances(x, x[first : first + 1], x_sq)[:, 0]
    potential = closest.sum()
    for _ in range(1, k):
        # the draw on the CPU (a floating cumsum on CUDA is not deterministic): n numbers per centre
        draws = torch.rand(trials, generator=generator, dtype=torch.float64) * float(potential)
        cumulative = closest.double().cpu().cumsum(0)
        candidates = torch.searchsorted(cumulative, draws).clamp_max_(n - 1).to(x.device)
        to_candidates = torch.minimum(closest[None, :], _squared_distances(x, x[candidates], x_sq).T)  # (trials, n)
        potentials = to_candidates.sum(1)
        best = int(potentials.argmin())
        potential, closest = potentials[best], to_candidates[best]
        centres.append(x[candidates[best]])
    return torch.stack(centres)


def kmeans(x: Tensor, k: int, seed: int = 0, n_init: int = 1, max_iter: int = 300, tol: float = 1e-4,
           init: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``(n, d)`` rows (in float64): ``(labels (n,), centres (k, d))`` of the run with the lowest
    inertia.

    As scikit-learn's ``KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol)``: k-means++ seeding from
    a generator seeded with ``seed`` (``init`` gives the centres instead, for one run), assignment to the nearest
    centre, centres moved to their cluster means, an empty cluster re-seeded with the point farthest from its
    centre, stop when no label changes or the centres move by less than ``tol`` × the mean column variance
    (squared shift summed over centres), and a final assignment to the last centres. (scikit-learn also moves the
    re-seeding point out of its old cluster's mean in that iteration; here the donor's mean is updated at the next
    iteration.) The stream of random
    numbers differs from scikit-learn's, so clusters agree with it where the data decides them, not draw for draw.
    """
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"kmeans needs (n, d) rows with n >= k >= 1, got shape {tuple(x.shape)} and k={k}.")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"kmeans needs n_init >= 1 and max_iter >= 1, got {n_init} and {max_iter}.")
    x = x.double()  # distances by ‖x‖² − 2x·c + ‖c‖² lose precision in float32 (and TF32)
    x_sq = (x * x).sum(1)
    threshold = tol * float(x.var(0, unbiased=False).mean())
    generator = torch.Generator().manual_seed(int(seed))
    best: Optional[tuple[float, Tensor, Tensor]] = None
    for _ in range(1 if init is not None else n_init):
        centres = init.to(x).clone() if init is not None else kmeans_plusplus(x, k, generator, x_sq)
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for _ in range(max_iter):
            distances = _squared_distances(x, centres, x_sq)
            new_labels = distances.argmin(1)
            counts = torch.bincount(new_labels, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, new_labels, x)
            new_centres = sums / counts.clamp_min(1)[:, None].to(x)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():  # re-seed empty clusters with the points farthest from their centres
                far = distances.gather(1, new_labels[:, None])[:, 0].argsort(descending=True)[: empty.numel()]
                new_centres[empty] = x[far]
            converged = bool((new_labels == labels).all())
            shift = float(((new_centres - centres) ** 2).sum())
            centres, labels = new_centres, new_labels
            if converged or shift <= threshold:
                break
        distances = _squared_distances(x, centres, x_sq)
        labels = distances.argmin(1)
        inertia = float(distances.gather(1, labels[:, None]).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    assert best is not None
    return best[1], best[2]


def cluster_purity(targets: Tensor, clusters: Tensor) -> float:
    """``(1/n) Σ_c max_y |{i: cluster_i = c, target_i = y}|``: the accuracy of labelling each cluster with its
    majority class."""
    if targets.shape != clusters.shape or targets.ndim != 1 or targets.numel() == 0:
        raise ValueError(f"cluster_purity expects two (n,) tensors with n > 0, got {tuple(targets.shape)} and "
                         f"{tuple(clusters.shape)}.")
    _, y = torch.unique(targets, return_inverse=True)
    _, c = torch.unique(clusters, return_inverse=True)
    table = torch.zeros(int(c.max()) + 1, int(y.max()) + 1, dtype=torch.long, device=targets.device)
    table.index_put_((c, y), torch.ones_like(c), accumulate=True)
    return float(table.amax(1).sum()) / targets.numel()


def relearning_strength(purity_train: float, purity_holdout: float, strength: float) -> float:
    """``α = tanh(λ · |P_train − P_holdout|)``: the gap is absolute (a held-out purity above the training one
    re-initialises too, as in the official code)."""
    return math.tanh(strength * abs(purity_train - purity_holdout))


def canonical_order(features: Tensor) -> Tensor:
    """A permutation of the rows that depends on their values only (their projection on a fixed direction, in
    float64): the same set of rows in any order gives the same sequence, so a clustering seeded by row position
    is the same in one process and under DDP, where the ranks' shards arrive in another order."""
    direction = torch.linspace(1.0, 2.0, features.shape[1], dtype=torch.float64, device=features.device)
    direction = direction * (1.0 + 1e-3 * torch.arange(features.shape[1], device=features.device).double().sin())
    return (features.double() @ direction).argsort(stable=True)


@torch.no_grad()
def soft_reinit_(params: Sequence[Tensor], initial: Sequence[Tensor], alpha: float) -> None:
    """``θ ← α θ⁰ + (1 − α) θ`` in place for every parameter (``torch.lerp``; ``α = 0`` leaves ``θ``, ``α = 1``
    restores the initialisation)."""
    if len(params) != len(initial):
        raise ValueError(f"soft_reinit_: {len(params)} parameters but {len(initial)} initial values.")
    bad = [i for i, (p, t) in enumerate(zip(params, initial)) if p.shape != t.shape]
    if bad:
        raise ValueError(f"soft_reinit_: parameter {bad[0]} has shape {tuple(params[bad[0]].shape)} but its initial "
                         f"value {tuple(initial[bad[0]].shape)}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"soft_reinit_: alpha must be in [0, 1], got {alpha}.")
    if alpha == 0.0 or not params:
        return
    torch._foreach_lerp_(list(params), [t.to(p.device, p.dtype) for p, t in zip(params, initial)], float(alpha))
