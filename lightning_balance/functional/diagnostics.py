"""Collapse and imbalance diagnostics on tensors (no Lightning): ranks, similarity, multicollinearity and
Shapley modality contribution. Definitions from the standard references named in each docstring."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_balance.functional.agm import shapley_weights
from lightning_balance.functional.probe import linear_probe_accuracy

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


def masked_accuracy_value(fuse_subset: Callable[[Mapping[str, Tensor], Collection[str]], Tensor],
                          features: Mapping[str, Tensor], targets: Tensor,
                          chance: float | None = None) -> Callable[[frozenset[str]], float]:
    """``v(S)`` = accuracy of ``fuse_subset(features, S)``, the fused prediction with the modalities outside
    ``S`` removed (:meth:`MultimodalMixin.fuse_subset <lightning_balance.MultimodalMixin.fuse_subset>`, or any
    function with that signature); ``v(∅)`` is the accuracy with everything removed (or ``chance`` if given).
    Each subset is evaluated once and cached."""
    cache: dict[frozenset[str], float] = {}

    def value(subset: frozenset[str]) -> float:
        if not subset and chance is not None:
            return chance
        if subset not in cache:
            with torch.no_grad():
                logits = fuse_subset(features, subset)
            cache[subset] = float((logits.argmax(-1) == targets).double().mean())
        return cache[subset]

    return value


def cross_validated_probe_accuracy(features: Tensor, targets: Tensor, num_classes: int, folds: int = 2,
                                   weight_decay: float = 1e-4) -> float:
    """Linear-probe accuracy of frozen features by ``folds``-fold cross-validation on one set of samples
    (sample ``i`` is in fold ``i mod folds``): how much linearly readable class information an encoder
    carries, measured on validation data alone. Deterministic (L-BFGS, no sampling)."""
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}.")
    z = features.reshape(features.shape[0], -1)
    n = z.shape[0]
    if n < 2 * folds:
        raise ValueError(f"A {folds}-fold probe needs at least {2 * folds} samples, got {n}; "
                         f"validate on more samples or lower probe_folds.")
    fold = torch.arange(n, device=z.device) % folds
    correct = 0.0
    for k in range(folds):
        train, test = fold != k, fold == k
        acc = linear_probe_accuracy(z[train], targets[train], z[test], targets[test], num_classes, weight_decay)
        correct += acc * int(test.sum())
    return correct / n


def contribution_summary(contributions: Mapping[str, float]) -> dict[str, float]:
    r"""Imbalance of Shapley contributions :math:`\phi`: ``ratio`` = max φ / min φ (``inf`` when
    min φ ≤ 0, i.e. a modality adds nothing), ``gap`` = max φ − min φ, and ``imbalance`` =
    (max φ − min φ) / Σ|φ| in [0, 1] (0: equal contributions; 1: one modality does everything)."""
    phi = list(contributions.values())
    hi, lo = max(phi), min(phi)
    total = sum(abs(p) for p in phi)
    return {"ratio": hi / lo if lo > 0 else math.inf, "gap": hi - lo,
            "imbalance": (hi - lo) / total if total > 0 else 0.0}


def collapse_diagnostics(
    features: Mapping[str, Tensor],
    targets: Tensor,
    fuse_subset: Callable[[Mapping[str, Tensor], Collection[str]], Tensor],
    num_classes: int,
    *,
    unimodal_logits: Optional[Mapping[str, Tensor]] = None,
    probe: bool = True,
    probe_folds: int = 2,
    vif: bool = True,
) -> dict[str, float]:
    """Every imbalance and collapse measurement on one set of samples, as a flat ``{name: value}`` dict.

    Args:
        features: ``{modality: (N, ...)}`` features of the same N samples (flattened per sample).
        targets: ``(N,)`` class indices.
        fuse_subset: ``(features, present) -> logits`` with the modalities outside ``present`` removed
            (:meth:`MultimodalMixin.fuse_subset <lightning_balance.MultimodalMixin.fuse_subset>`).
        num_classes: number of classes.
        unimodal_logits: optional ``{modality: (N, C)}`` unimodal logits, scored as ``acc/<m>``.
        probe: fit a cross-validated linear probe on each modality's features (the costly part).
        probe_folds: folds of the probe's cross-validation.
        vif: compute variance inflation factors (one ``d × d`` inverse per modality and for the fusion input).

    Returns (``<m>`` each modality; ``fused`` is the fusion's input, the concatenation of all features):
        ``acc_fused``; ``acc/<m>``; ``acc_without/<m>`` (modality missing); ``contribution/<m>`` (dataset-level
        Shapley contribution to accuracy, ``v(S)`` = accuracy with the modalities outside ``S`` zeroed, ``v(∅)``
        included); ``contribution_ratio``, ``contribution_gap``, ``contribution_imbalance``
        (:func:`contribution_summary`); ``probe/<m>``; ``erank/<m|fused>``, ``erank_norm/<m|fused>``
        (effective rank / min(N, d)), ``nrank/<m|fused>``; ``cka/<m>`` (linear CKA of fused vs ``m``);
        ``vif_mean/<m|fused>``, ``vif_max/<m|fused>``; ``seconds/<group>``, the time each group took.
    """
    names = list(features)
    if not names:
        raise ValueError("features is empty: pass one (N, ...) tensor per modality.")
    n = targets.shape[0]
    for m, z in features.items():
        if z.shape[0] != n:
            raise ValueError(f"features[{m!r}] has {z.shape[0]} samples but targets has {n}.")
    out: dict[str, float] = {}
    clock = time.perf_counter()
    v = masked_accuracy_value(fuse_subset, features, targets)
    full = frozenset(names)
    out["acc_fused"] = v(full)
    phi = shapley_contributions(v, names)
    for m in names:
        out[f"contribution/{m}"] = phi[m]
        out[f"acc_without/{m}"] = v(full - {m})
        if unimodal_logits is not None:
            out[f"acc/{m}"] = float((unimodal_logits[m].argmax(-1) == targets).double().mean())
    for key, val in contribution_summary(phi).items():
        out[f"contribution_{key}"] = val
    out["seconds/contribution"] = time.perf_counter() - clock

    clock = time.perf_counter()
    flat = {m: features[m].detach().reshape(n, -1) for m in names}
    fused = torch.cat([flat[m] for m in names], dim=1)
    for key, z in [*flat.items(), ("fused", fused)]:
        er = effective_rank(z)
        out[f"erank/{key}"] = er
        out[f"erank_norm/{key}"] = er / max(1, min(z.shape))
        out[f"nrank/{key}"] = float(numerical_rank(z))
        if key != "fused":
            out[f"cka/{key}"] = linear_cka(fused, z)
    out["seconds/rank_cka"] = time.perf_counter() - clock
    if vif:
        clock = time.perf_counter()
        for key, z in [*flat.items(), ("fused", fused)]:
            factors = variance_inflation(z)
            out[f"vif_mean/{key}"] = float(factors.mean()) if factors.numel() else math.nan
            out[f"vif_max/{key}"] = float(factors.max()) if factors.numel() else math.nan
        out["seconds/vif"] = time.perf_counter() - clock
    if probe:
        clock = time.perf_counter()
        for m in names:
            out[f"probe/{m}"] = cross_validated_probe_accuracy(flat[m], targets, num_classes, probe_folds)
        out["seconds/probe"] = time.perf_counter() - clock
    return out


def imbalance_verdict(values: Mapping[str, float], modalities: Sequence[str],
                      alone_probe: Optional[Mapping[str, float]] = None, tolerance: float = 0.02) -> list[str]:
    """A short verdict a person can act on, from :func:`collapse_diagnostics` values: which modality
    dominates and by how much, which modalities the model ignores, and, for each modality whose probe
    accuracy when trained alone is given in ``alone_probe``, whether joint training under-learns its
    encoder (probe after joint training below the alone reference by more than ``tolerance``)."""
    names = list(modalities)
    phi = {m: values[f"contribution/{m}"] for m in names}
    lines = []
    if len(names) > 1:
        dominant = max(names, key=phi.__getitem__)
        others = ", ".join(f"{m} {phi[m]:.3f}" for m in names if m != dominant)
        ratio = values.get("contribution_ratio", math.inf)
        ratio_text = f"ratio {ratio:.1f}" if math.isfinite(ratio) else "ratio unbounded"
        lines.append(f"{dominant} dominates: Shapley contribution to accuracy {phi[dominant]:.3f} vs {others} "
                     f"({ratio_text}).")
    for m in names:
        drop = values["acc_fused"] - values[f"acc_without/{m}"]
        if phi[m] <= tolerance and drop <= tolerance:
            lines.append(f"{m} is IGNORED: contribution {phi[m]:.3f}, accuracy without it drops only {drop:.3f}.")
    for m in names:
        if f"probe/{m}" not in values:
            continue
        probe = values[f"probe/{m}"]
        if alone_probe and m in alone_probe:
            gap = alone_probe[m] - probe
            state = (f"UNDER-LEARNED by joint training ({gap:.3f} below)" if gap > tolerance
                     else "learned as well as alone")
            lines.append(f"{m} encoder: linear probe {probe:.3f} after joint training vs {alone_probe[m]:.3f} "
                         f"trained alone -> {state}.")
        else:
            lines.append(f"{m} encoder: linear probe {probe:.3f} (no trained-alone reference given).")
    return lines


def diagnostics_table(values: Mapping[str, float], modalities: Sequence[str],
                      alone_probe: Optional[Mapping[str, float]] = None) -> str:
    """Markdown table of :func:`collapse_diagnostics` values, one row per modality and one for the fusion."""
    columns = [("contribution", "contribution"), ("acc_without", "acc without it"), ("acc", "unimodal acc"),
               ("probe", "probe"), ("alone", "probe alone"), ("erank", "eff. rank"), ("cka", "CKA to fused"),
               ("vif_mean", "mean VIF")]
    def cell(key: str, m: str) -> str:
        if key == "alone":
            val = (alone_probe or {}).get(m)
        else:
            val = values.get(f"{key}/{m}")
        if val is None or (isinstance(val, float) and math.isnan(val)):
            return "–"
        return f"{val:.1f}" if key in ("erank", "vif_mean") else f"{val:.3f}"
    used = [(k, t) for k, t in columns if any(cell(k, m) != "–" for m in [*modalities, "fused"])]
    lines = ["| | " + " | ".join(t for _, t in used) + " |", "|---" * (len(used) + 1) + "|"]
    for m in [*modalities, "fused"]:
        label = f"fused (acc {values['acc_fused']:.3f})" if m == "fused" else m
        lines.append(f"| {label} | " + " | ".join(cell(k, m) for k, _ in used) + " |")
    return "\n".join(lines)


__all__ += ["masked_accuracy_value", "cross_validated_probe_accuracy", "contribution_summary",
            "collapse_diagnostics", "imbalance_verdict", "diagnostics_table"]
