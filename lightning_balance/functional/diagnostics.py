r"""Collapse and imbalance diagnostics on tensors (no Lightning): ranks, similarity, multicollinearity and
Shapley modality contribution, each accuracy and contribution with its standard error. Definitions from the
standard references named in each docstring.

Uncertainty. Every accuracy-like quantity is a mean of per-sample outcomes, so it has a standard error (SE):

* accuracies, missing-modality accuracies, their drops and the Shapley contributions: a **bootstrap over
  samples**. The per-sample correctness of every subset's prediction is computed once (``2^M`` fusion
  passes); each of ``B`` replicates resamples the samples with replacement (seeded generator on the CPU: the
  same numbers on every call and every DDP rank), which only reweights that matrix, so all replicates are one
  matrix product. The SE is the standard deviation over the replicates; a difference (the lead of the
  dominant modality, an accuracy drop) gets the SE of its own replicates, which keeps the correlation of its
  two terms.
* linear-probe accuracies: the **binomial** SE :math:`\sqrt{p(1-p)/K}` of the ``K`` out-of-fold predictions
  (each sample is predicted once, by the probe fitted on the other folds; the variability of the fit
  itself is not included).

:func:`imbalance_verdict` reports a gap only when its 95% normal interval, ``estimate ± 1.96 SE``, excludes 0
and the gap exceeds ``tolerance``; :func:`diagnostics_table` prints the ``± 1.96 SE`` half-widths.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_balance.functional.agm import shapley_weights
from lightning_balance.functional.probe import linear_probe_outcomes

__all__ = ["effective_rank", "numerical_rank", "linear_cka", "variance_inflation", "shapley_contributions"]

#: the normal quantile of a two-sided 95% interval (``estimate ± Z95 · SE``)
Z95 = 1.96

#: an ``alone_probe`` reference: an accuracy, or ``(accuracy, standard error)``
Reference = Union[float, Sequence[float]]


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


_HALF = (torch.float16, torch.bfloat16)


def numerical_rank(features: Tensor, rtol: float | None = None, precision: Optional[torch.dtype] = None) -> int:
    """Number of singular values of the centred features above ``rtol · σ_max``.

    The default ``rtol`` follows the precision the features were computed in (``precision``, default their
    dtype): numpy's ``max(N, d) · eps`` for float32/float64; for fp16/bf16 features, ``(√N + √d) · eps``, the
    relative size of the largest singular value of their rounding noise (numpy's rule would exceed 1 there
    for a few hundred samples and give rank 0). Features stored in float32 after being computed in half
    precision (under AMP) need ``precision`` set, or their rounding noise counts as rank."""
    z = _centred(features)
    s = torch.linalg.svdvals(z)
    if s.numel() == 0 or s[0] == 0:
        return 0
    dtype = precision or (features.dtype if features.is_floating_point() else torch.float64)
    eps = torch.finfo(dtype).eps
    if rtol is None:
        n, d = z.shape
        rtol = (math.sqrt(n) + math.sqrt(d)) * eps if dtype in _HALF else max(n, d) * eps
    return int((s > rtol * s[0]).sum())


def lowest_precision(dtypes: Collection[torch.dtype]) -> Optional[torch.dtype]:
    """The floating dtype with the largest machine epsilon among ``dtypes`` (``None`` if there is none)."""
    floating = [d for d in dtypes if d.is_floating_point]
    return max(floating, key=lambda d: torch.finfo(d).eps) if floating else None


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


def variance_inflation(features: Tensor, ridge: float = 1e-6, name: str = "features") -> Tensor:
    r"""Variance inflation factor of every feature: :math:`\mathrm{VIF}_j = [C^{-1}]_{jj}` with ``C`` the
    feature correlation matrix (ridge-regularised by ``ridge`` on the diagonal), i.e. ``1/(1 − R_j²)`` with
    ``R_j²`` from regressing feature ``j`` on all others. Constant features are dropped. Values above 5–10
    signal multicollinearity. Returns ``(d',)`` float64.

    The regression of one of ``d'`` features on the others has ``d'`` parameters (with the intercept): with
    ``d' ≥ N`` every ``R_j²`` is 1 up to the ridge and the factors measure the ridge, not the features (pure
    noise at N = 40, d = 64 gives VIFs of ~10^5), and at ``d' = N − 1`` one residual degree of freedom is
    left, so the factors are finite but set by noise (hundreds on pure noise). For ``d' ≥ N − 1`` a warning
    is issued and the factors are NaN.
    """
    z = _centred(features)
    n = z.shape[0]
    std = z.std(0) if n > 1 else torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    kept = std > 0
    d = int(kept.sum())
    if d == 0:
        return z.new_zeros(0)
    if d >= n - 1:
        warnings.warn(
            f"variance_inflation({name}): {d} non-constant features from {n} samples. A VIF regresses each feature "
            f"on the {d - 1} others, which needs at least {d + 2} samples; with fewer every factor is meaningless, "
            f"so they are NaN. Diagnose more samples (several times the feature width) or pass vif=False.",
            stacklevel=2,
        )
        return torch.full((d,), math.nan, dtype=z.dtype, device=z.device)
    z = z[:, kept] / std[kept]
    corr = (z.T @ z) / (n - 1)
    corr = corr + ridge * torch.eye(d, dtype=corr.dtype, device=corr.device)
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


def _subset(names: Sequence[str], mask: int) -> frozenset[str]:
    return frozenset(m for b, m in enumerate(names) if mask >> b & 1)


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


def subset_correctness(fuse_subset: Callable[[Mapping[str, Tensor], Collection[str]], Tensor],
                       features: Mapping[str, Tensor], targets: Tensor,
                       modalities: Optional[Sequence[str]] = None) -> Tensor:
    """``(2^M, N)`` bool: row ``S`` says whether ``fuse_subset(features, S)`` (the modalities outside ``S``
    removed) classifies each sample correctly. Subsets are bit masks in ``modalities`` order (bit ``b``:
    ``modalities[b]`` present): row 0 is the empty set, row ``2^M − 1`` the full model. ``2^M`` fusion passes,
    without gradients; the features reach ``fuse_subset`` in their own shape."""
    names = list(modalities) if modalities is not None else list(features)
    rows = []
    with torch.no_grad():
        for mask in range(2 ** len(names)):
            rows.append(fuse_subset(features, _subset(names, mask)).argmax(-1) == targets)
    return torch.stack(rows)


def bootstrap_means(values: Tensor, groups: Optional[Tensor] = None, replicates: int = 1000, seed: int = 0,
                    max_elements: int = 1 << 22) -> Tensor:
    r"""``(B, R)`` bootstrap replicates of the means of the ``R`` rows of ``values`` ``(R, N)`` (per-sample
    outcomes, e.g. correctness of ``R`` predictions).

    Replicate ``b`` draws ``K`` sample groups with replacement (``groups``: ``(N,)`` ids, columns of one id are
    drawn together, e.g. two views of one sample; default: every column is its own group) and takes the
    weighted mean :math:`\sum_i w_{bi} x_{ri} / \sum_i w_{bi}`, ``w_{bi}`` the number of times column ``i``'s
    group was drawn. All replicates are a few matrix products (in chunks of at most ``max_elements`` weights),
    on the CPU with a generator seeded by ``seed``: identical on every call and every DDP rank.
    """
    x = values.detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"values must be (R, N) with N >= 1 samples, got {tuple(values.shape)}.")
    n = x.shape[1]
    if groups is None:
        inverse, k = torch.arange(n), n
    else:
        _, inverse = torch.unique(groups.detach().cpu(), return_inverse=True)
        k = int(inverse.max()) + 1
    generator = torch.Generator().manual_seed(int(seed))
    chunk = max(1, min(replicates, max_elements // (n + k)))
    out = []
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        draws = torch.randint(0, k, (b, k), generator=generator)
        counts = torch.zeros(b, k, dtype=torch.float64).scatter_add_(1, draws, torch.ones(b, k, dtype=torch.float64))
        weights = counts[:, inverse]
        out.append((weights @ x.T) / weights.sum(1, keepdim=True))
    return torch.cat(out)


def _group_ids(groups: Optional[Tensor], n: int, device: torch.device) -> tuple[Tensor, int]:
    if groups is None:
        return torch.arange(n, device=device), n
    _, inverse = torch.unique(groups.to(device), return_inverse=True)
    return inverse, (int(inverse.max()) + 1 if n else 0)


def cross_validated_probe_outcomes(features: Tensor, targets: Tensor, num_classes: int, folds: int = 2,
                                   weight_decay: float = 1e-4, groups: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(correct, loss)``, both ``(N,)``: the out-of-fold outcome of a linear probe on frozen features, and its
    cross-entropy (float64; the semantic loss by linear evaluation,
    :func:`~lightning_balance.functional.linear_probe_outcomes`): sample ``i`` is predicted by the probe
    (:func:`~lightning_balance.functional.fit_linear_probe`) fitted on the other folds. Sample group ``g``
    (``groups``, e.g. the two views of one sample; default: each sample its own group, in order) is in fold
    ``g mod folds``, so no group is on both sides. Deterministic (L-BFGS, no sampling)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}.")
    z = features.reshape(features.shape[0], -1)
    n = z.shape[0]
    ids, k = _group_ids(groups, n, z.device)
    if k < 2 * folds:
        raise ValueError(f"A {folds}-fold probe needs at least {2 * folds} samples, got {k}; "
                         f"validate on more samples or lower probe_folds.")
    fold = ids % folds
    correct = torch.zeros(n, dtype=torch.bool, device=z.device)
    loss = torch.zeros(n, dtype=torch.float64, device=z.device)
    for f in range(folds):
        train, test = fold != f, fold == f
        hit, nll = linear_probe_outcomes(z[train], targets[train], z[test], targets[test], num_classes, weight_decay)
        correct[test], loss[test] = hit.to(z.device), nll.to(z.device)
    return correct, loss


def cross_validated_probe_correct(features: Tensor, targets: Tensor, num_classes: int, folds: int = 2,
                                  weight_decay: float = 1e-4, groups: Optional[Tensor] = None) -> Tensor:
    """``(N,)`` bool, the out-of-fold outcome of a linear probe on frozen features (the first half of
    :func:`cross_validated_probe_outcomes`)."""
    return cross_validated_probe_outcomes(features, targets, num_classes, folds, weight_decay, groups)[0]


def cross_validated_probe_accuracy(features: Tensor, targets: Tensor, num_classes: int, folds: int = 2,
                                   weight_decay: float = 1e-4, groups: Optional[Tensor] = None) -> float:
    """Linear-probe accuracy of frozen features by ``folds``-fold cross-validation on one set of samples
    (sample ``i`` is in fold ``i mod folds``): how much linearly readable class information an encoder
    carries, measured on validation data alone. Deterministic (L-BFGS, no sampling). Its binomial standard
    error is :func:`probe_standard_error` ``(accuracy, N)``; :func:`cross_validated_probe_correct` gives the
    per-sample outcomes."""
    correct = cross_validated_probe_correct(features, targets, num_classes, folds, weight_decay, groups)
    return float(correct.double().mean())


def probe_standard_error(accuracy: float, samples: int) -> float:
    r"""Binomial standard error :math:`\sqrt{p(1-p)/K}` of an accuracy ``p`` measured on ``K`` independent
    predictions (e.g. the out-of-fold predictions of a cross-validated probe)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / samples) if samples > 0 else math.nan


def contribution_summary(contributions: Mapping[str, float]) -> dict[str, float]:
    r"""Imbalance of Shapley contributions :math:`\phi`: ``ratio`` = max φ / min φ (``inf`` when
    min φ ≤ 0, i.e. a modality adds nothing), ``gap`` = max φ − min φ, and ``imbalance`` =
    (max φ − min φ) / Σ|φ| in [0, 1] (0: equal contributions; 1: one modality does everything)."""
    phi = list(contributions.values())
    hi, lo = max(phi), min(phi)
    total = sum(abs(p) for p in phi)
    return {"ratio": hi / lo if lo > 0 else math.inf, "gap": hi - lo,
            "imbalance": (hi - lo) / total if total > 0 else 0.0}


def _mean_pool(modality: str, z: Tensor) -> Tensor:
    # MultimodalMixin.pool_features' default: (N, D) as is, (N, T, D) averaged over the tokens
    return z if z.ndim <= 2 else z.mean(dim=tuple(range(1, z.ndim - 1)))


def _run(errors: str, what: str, fn: Callable[[], Any], default: Any) -> Any:
    if errors == "raise":
        return fn()
    try:
        return fn()
    except Exception as err:  # a failed measurement must not end the caller's run (errors="warn")
        warnings.warn(f"Modality diagnostics: {what} failed ({type(err).__name__}: {err}); it is reported as NaN "
                      f"and the other measurements go on.", stacklevel=3)
        return default


def diagnostics_from_correctness(
    correct: Tensor,
    modalities: Sequence[str],
    *,
    vectors: Optional[Mapping[str, Tensor]] = None,
    targets: Optional[Tensor] = None,
    num_classes: Optional[int] = None,
    unimodal_correct: Optional[Mapping[str, Tensor]] = None,
    groups: Optional[Tensor] = None,
    probe: bool = True,
    probe_folds: int = 2,
    vif: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
    errors: str = "raise",
    precisions: Optional[Mapping[str, torch.dtype]] = None,
    semantic_weight_decay: Optional[float] = 1e-2,
) -> dict[str, float]:
    r""":func:`collapse_diagnostics` from what it computes first: the per-sample correctness of every subset's
    prediction and one vector per sample and modality (what :class:`~lightning_balance.ModalityDiagnostics`
    collects batch by batch and gathers across ranks).

    Args:
        correct: ``(2^M, N)`` bool, row = subset bit mask in ``modalities`` order (:func:`subset_correctness`).
        modalities: the modality names, in the order of the bit masks.
        vectors: ``{m: (N, D_m)}`` one vector per sample (pooled token features), for the ranks, CKA, VIF and
            probes; ``None`` skips them.
        targets, num_classes: for the probes.
        unimodal_correct: optional ``{m: (N,)}`` bool correctness of the unimodal logits (``acc/<m>``).
        groups: optional ``(N,)`` sample ids: rows with one id (views of one sample) are resampled together and
            kept in one probe fold. ``samples`` counts the groups.
        probe, probe_folds, vif: see :func:`collapse_diagnostics`.
        bootstrap: bootstrap replicates for the standard errors (0: none, and no ``*_se`` keys).
        seed: seed of the bootstrap's generator.
        errors: ``"raise"``, or ``"warn"``: a measurement that fails is NaN, with a warning naming it and why.
        precisions: optional ``{m: dtype}``, the precision each modality's features were computed in (for the
            numerical rank's tolerance, :func:`numerical_rank`); ``vectors`` may be stored in a wider dtype.
        semantic_weight_decay: weight decay of the probe whose out-of-fold cross-entropy is ``semantic_loss/<m>``
            (a second fit per fold; ``None``: no semantic loss). The accuracy probe's 1e-4 lets the weights grow
            on nearly separable folds, and its loss then ranks a wider representation as worse; 1e-2 keeps the
            loss in the order of the accuracy on our checks. Compare losses only at equal samples, folds and
            weight decay.
    """
    names = list(modalities)
    m_count = len(names)
    full = 2**m_count - 1
    if correct.ndim != 2 or correct.shape[0] != 2**m_count:
        raise ValueError(f"correct must be (2^M, N) = ({2 ** m_count}, N) for {m_count} modalities, "
                         f"got {tuple(correct.shape)}.")
    n = correct.shape[1]
    if n == 0:
        raise ValueError("No samples to diagnose (every target is ignore_index, or no sample was given).")
    if errors not in ("raise", "warn"):
        raise ValueError(f"errors must be 'raise' or 'warn', got {errors!r}.")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"bootstrap must be 0 (no standard errors) or an integer >= 2 (e.g. 1000), got {bootstrap!r}.")
    group_ids, k = _group_ids(groups, n, correct.device)
    out: dict[str, float] = {"samples": float(k)}
    clock = time.perf_counter()
    rows = [correct.double().cpu()]
    if unimodal_correct is not None:
        rows.append(torch.stack([unimodal_correct[m].double().cpu() for m in names]))
    table = torch.cat(rows)  # (2^M [+ M], N) per-sample outcomes
    acc = table.mean(1)
    phi = shapley_contributions(lambda s: float(acc[sum(1 << names.index(m) for m in s)]), names)
    out["acc_fused"] = float(acc[full])
    if targets is not None and targets.numel():
        out["acc_majority"] = float(torch.bincount(targets.reshape(-1).long()).max()) / targets.numel()
    for b, m in enumerate(names):
        out[f"contribution/{m}"] = phi[m]
        out[f"acc_without/{m}"] = float(acc[full ^ (1 << b)])
        out[f"drop/{m}"] = out["acc_fused"] - out[f"acc_without/{m}"]
        if unimodal_correct is not None:
            out[f"acc/{m}"] = float(acc[full + 1 + b])
    for key, val in contribution_summary(phi).items():
        out[f"contribution_{key}"] = val
    ranked = sorted(range(m_count), key=lambda b: phi[names[b]], reverse=True)
    first, second = ranked[0], ranked[1]
    out["contribution_lead"] = phi[names[first]] - phi[names[second]]
    if bootstrap:
        rep = bootstrap_means(table, group_ids.cpu(), bootstrap, seed)  # (B, rows)
        phi_rep = (rep[:, 1: full + 1] - rep[:, :1]) @ shapley_weights(m_count).double().T  # (B, M)
        out["acc_fused_se"] = float(rep[:, full].std())
        for b, m in enumerate(names):
            out[f"contribution_se/{m}"] = float(phi_rep[:, b].std())
            out[f"acc_without_se/{m}"] = float(rep[:, full ^ (1 << b)].std())
            out[f"drop_se/{m}"] = float((rep[:, full] - rep[:, full ^ (1 << b)]).std())
            if unimodal_correct is not None:
                out[f"acc_se/{m}"] = float(rep[:, full + 1 + b].std())
        out["contribution_lead_se"] = float((phi_rep[:, first] - phi_rep[:, second]).std())
    out["seconds/contribution"] = time.perf_counter() - clock
    if vectors is None:
        return out

    clock = time.perf_counter()
    flat = {m: vectors[m].detach().reshape(n, -1) for m in names}
    finite = {}
    for m, z in flat.items():
        finite[m] = bool(torch.isfinite(z).all())
        if not finite[m]:
            bad = int((~torch.isfinite(z)).any(1).sum())
            warnings.warn(f"Modality diagnostics: the features of {m!r} are not finite (NaN/inf) in {bad} of {n} "
                          f"samples, so the rank, CKA, VIF and probe of {m!r} and of the fused representation are "
                          f"NaN. Check the encoder of {m!r} (a diverged run, a log of 0, fp16 overflow).",
                          stacklevel=2)
    all_finite = all(finite.values())
    fused = torch.cat([flat[m] for m in names], dim=1) if all_finite else None
    keys = [*names, "fused"]
    matrices: dict[str, Optional[Tensor]] = {**flat, "fused": fused}
    for key in keys:
        zk = matrices[key]
        ok = zk is not None and (key == "fused" or finite[key])
        if not ok or zk is None:
            for name in ("erank", "erank_norm", "nrank", *(("cka",) if key != "fused" else ())):
                out[f"{name}/{key}"] = math.nan
            continue
        vec: Tensor = zk
        er = _run(errors, f"the effective rank of {key!r}", lambda: effective_rank(vec), math.nan)
        out[f"erank/{key}"] = er
        out[f"erank_norm/{key}"] = er / max(1, min(zk.shape))
        precision = (lowest_precision(list(precisions.values())) if key == "fused" else precisions.get(key)) \
            if precisions else None
        out[f"nrank/{key}"] = (float(_run(errors, f"the numerical rank of {key!r}",
                                          lambda: numerical_rank(vec, precision=precision), math.nan)))
        if key != "fused":
            whole = fused
            out[f"cka/{key}"] = (_run(errors, f"the CKA of {key!r}", lambda: linear_cka(whole, vec), math.nan)
                                 if whole is not None else math.nan)
    out["seconds/rank_cka"] = time.perf_counter() - clock
    if vif:
        clock = time.perf_counter()
        for key in keys:
            zk = matrices[key]
            ok = zk is not None and (key == "fused" or finite[key])
            factors = (_run(errors, f"the VIF of {key!r}", lambda: variance_inflation(zk, name=repr(key)), None)
                       if ok and zk is not None else None)
            usable = factors is not None and factors.numel() > 0
            out[f"vif_mean/{key}"] = float(factors.mean()) if factors is not None and usable else math.nan
            out[f"vif_max/{key}"] = float(factors.max()) if factors is not None and usable else math.nan
        out["seconds/vif"] = time.perf_counter() - clock
    if probe:
        if targets is None or num_classes is None:
            raise ValueError("probe=True needs targets and num_classes.")
        clock = time.perf_counter()
        enough = k >= 2 * probe_folds
        if not enough:
            warnings.warn(f"Modality diagnostics: the {probe_folds}-fold linear probes need at least "
                          f"{2 * probe_folds} labelled samples, got {k}; they are skipped (NaN). Validate on more "
                          f"samples or lower probe_folds.", stacklevel=2)
        for m in names:
            outcome = semantic = None
            if enough and finite[m]:
                outcome = _run(errors, f"the linear probe of {m!r}",
                               lambda: cross_validated_probe_outcomes(flat[m], targets, num_classes, probe_folds,
                                                                      groups=group_ids), None)
                if outcome is not None and semantic_weight_decay is not None:
                    # the loss from a more regularised probe: the accuracy probe's weights grow without bound on
                    # nearly separable folds, so its out-of-fold cross-entropy measures overfitting more than
                    # decodability (a wider, more accurate representation can get a higher loss)
                    semantic = _run(errors, f"the semantic-loss probe of {m!r}",
                                    lambda: cross_validated_probe_outcomes(flat[m], targets, num_classes, probe_folds,
                                                                           semantic_weight_decay, group_ids), None)
            if outcome is None:
                out[f"probe/{m}"] = out[f"probe_se/{m}"] = math.nan
                out[f"semantic_loss/{m}"] = out[f"semantic_loss_se/{m}"] = math.nan
                continue
            hit = outcome[0]
            if semantic is None:
                p = float(hit.double().mean())
                out[f"probe/{m}"], out[f"probe_se/{m}"] = p, probe_standard_error(p, k)
                if semantic_weight_decay is not None:
                    out[f"semantic_loss/{m}"] = out[f"semantic_loss_se/{m}"] = math.nan
                continue
            nll = semantic[1]
            p = float(hit.double().mean())
            out[f"probe/{m}"] = p
            out[f"probe_se/{m}"] = probe_standard_error(p, k)
            # the collapse paper's semantic loss by linear evaluation (Fig. 4): the probe's out-of-fold cross-entropy;
            # its SE from the per-group means (the views of one sample are not independent)
            per_group = torch.zeros(k, dtype=torch.float64, device=nll.device).index_add_(
                0, group_ids.to(nll.device), nll) / torch.bincount(group_ids.to(nll.device), minlength=k).double()
            out[f"semantic_loss/{m}"] = float(per_group.mean())  # each sample once, its views averaged
            out[f"semantic_loss_se/{m}"] = float(per_group.std() / math.sqrt(k))
        out["seconds/probe"] = time.perf_counter() - clock
    return out


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
    bootstrap: int = 1000,
    seed: int = 0,
    ignore_index: int = -100,
    pool: Optional[Callable[[str, Tensor], Tensor]] = None,
    groups: Optional[Tensor] = None,
    errors: str = "raise",
) -> dict[str, float]:
    """Every imbalance and collapse measurement on one set of samples, as a flat ``{name: value}`` dict, with
    standard errors (module docstring: bootstrap over samples for accuracies and contributions, binomial for
    probes).

    Args:
        features: ``{modality: (N, D) or (N, T, D)}`` features of the same N samples. ``fuse_subset`` receives
            them in their own shape; the ranks, CKA, VIF and probes use one ``(N, D)`` vector per sample, from
            ``pool`` (default: token sequences averaged over the tokens, as
            :meth:`MultimodalMixin.pool_features <lightning_balance.MultimodalMixin.pool_features>`), so the
            widths are ``D``, not ``T·D``.
        targets: ``(N,)`` class indices; samples whose target is ``ignore_index`` are left out of everything.
        fuse_subset: ``(features, present) -> logits`` with the modalities outside ``present`` removed
            (:meth:`MultimodalMixin.fuse_subset <lightning_balance.MultimodalMixin.fuse_subset>`).
        num_classes: number of classes.
        unimodal_logits: optional ``{modality: (N, C)}`` unimodal logits, scored as ``acc/<m>``.
        probe: fit a cross-validated linear probe on each modality's features (the costly part).
        probe_folds: folds of the probe's cross-validation.
        vif: compute variance inflation factors (one ``d × d`` inverse per modality and for the fusion input).
        bootstrap: bootstrap replicates of the standard errors (0: none).
        seed: seed of the bootstrap (a seeded CPU generator: the same values on every call).
        ignore_index: target value of unlabelled samples.
        pool: ``(modality, features) -> (N, D)``, one vector per sample.
        groups: optional ``(N,)`` sample ids (views of one sample share one id; see
            :func:`diagnostics_from_correctness`).
        errors: ``"raise"`` or ``"warn"`` (a failing measurement is NaN, with a warning).

    Returns (``<m>`` each modality; ``fused`` is the fusion's input, the concatenation of the pooled vectors):
        ``samples``; ``acc_fused``; ``acc/<m>``; ``acc_without/<m>`` (modality missing) and ``drop/<m>``
        (``acc_fused − acc_without/<m>``); ``contribution/<m>`` (dataset-level Shapley contribution to accuracy,
        ``v(S)`` = accuracy with the modalities outside ``S`` zeroed, ``v(∅)`` included); ``contribution_ratio``,
        ``contribution_gap``, ``contribution_imbalance`` (:func:`contribution_summary`); ``contribution_lead``
        (largest − second largest φ); the standard errors ``acc_fused_se``, ``acc_se/<m>``, ``acc_without_se/<m>``,
        ``drop_se/<m>``, ``contribution_se/<m>``, ``contribution_lead_se``, ``probe_se/<m>``; ``probe/<m>``;
        ``erank/<m|fused>``, ``erank_norm/<m|fused>`` (effective rank / min(N, d)), ``nrank/<m|fused>``;
        ``cka/<m>`` (linear CKA of fused vs ``m``); ``vif_mean/<m|fused>``, ``vif_max/<m|fused>``;
        ``seconds/<group>``, the time each group took.
    """
    names = list(features)
    if not names:
        raise ValueError("features is empty: pass one (N, ...) tensor per modality.")
    n = targets.shape[0]
    for m, z in features.items():
        if z.shape[0] != n:
            raise ValueError(f"features[{m!r}] has {z.shape[0]} samples but targets has {n}.")
    valid = targets != ignore_index
    if not bool(valid.all()):
        features = {m: z[valid] for m, z in features.items()}
        targets = targets[valid]
        if unimodal_logits is not None:
            unimodal_logits = {m: o[valid] for m, o in unimodal_logits.items()}
        if groups is not None:
            groups = groups[valid]
    pool = pool or _mean_pool
    correct = subset_correctness(fuse_subset, features, targets, names)
    vectors = {m: pool(m, z.detach()).reshape(targets.shape[0], -1) for m, z in features.items()}
    uni = None if unimodal_logits is None else {m: unimodal_logits[m].argmax(-1) == targets for m in names}
    return diagnostics_from_correctness(correct, names, vectors=vectors, targets=targets, num_classes=num_classes,
                                        unimodal_correct=uni, groups=groups, probe=probe, probe_folds=probe_folds,
                                        vif=vif, bootstrap=bootstrap, seed=seed, errors=errors)


def _reference(value: Reference) -> tuple[float, float]:
    """An ``alone_probe`` entry as ``(accuracy, standard error)``; a bare number has no uncertainty."""
    if isinstance(value, (int, float)):
        return float(value), 0.0
    mean, se = value
    return float(mean), float(se)


# The project's own evidence behind the verdict's "Next step:" line. Source: docs/which_method.md (§1 and §2; the
# numbers are fused test accuracies of docs/results.md, means over 5 seeds, small MLPs on CPU). Measurements on two
# benchmarks, quoted as such, not a promise for another model or data set.
_EVIDENCE: dict[str, dict[str, float]] = {
    # AV-Digits: the audio encoder is under-learned by joint training (probe 0.47 vs 0.62 trained alone)
    "av_digits": {"baseline": 0.924, "ensemble": 0.938, "unimodal_losses_split_head": 0.946, "cml": 0.951,
                  "lfm": 0.962, "umt": 0.942},
    # synthetic: no encoder under-learned and the joint model level with the unimodal ensemble; no method moved
    # fused accuracy beyond the seed spread
    "synthetic": {"baseline": 0.692, "ensemble": 0.687},
}

#: a contribution or standard error this close to 0 is 0 (floating-point residue of a difference of accuracies)
_ZERO = 1e-12


#: the kinds of the verdict's next step (:func:`next_step`), in the order the verdict checks them
NEXT_STEPS = ("train", "ensemble", "own_signal", "ensemble_or_own_signal", "nothing", "need_ensemble",
              "need_references")


def next_step(values: Mapping[str, float], modalities: Sequence[str], *args: Any, **kwargs: Any) -> tuple[str, str]:
    """The verdict's suggested next step as ``(kind, text)``: the arguments of :func:`imbalance_verdict`; ``kind`` is
    one of :data:`NEXT_STEPS` (``"train"``: not above chance yet; ``"ensemble"``: the fused model is clearly below
    the best modality alone; ``"own_signal"``: an encoder is under-learned, or an informative modality ignored;
    ``"ensemble_or_own_signal"``: the ensemble beats the fused model, no encoder clearly under-learned;
    ``"nothing"``: probably nothing to gain; ``"need_ensemble"`` / ``"need_references"``: a reference is missing),
    ``text`` its line without the ``"Next step: "`` prefix."""
    lines, kind = _verdict(values, modalities, *args, **kwargs)
    return kind, lines[-1][len("Next step: "):]


def imbalance_verdict(values: Mapping[str, float], modalities: Sequence[str],
                      alone_probe: Optional[Mapping[str, Reference]] = None, tolerance: float = 0.02,
                      z: float = Z95, alone_semantic_loss: Optional[Mapping[str, Reference]] = None,
                      semantic_tolerance: float = 0.05, *, alone_accuracy: Optional[Mapping[str, Reference]] = None,
                      ensemble_accuracy: Optional[Reference] = None) -> list[str]:
    r"""A short verdict a person can act on, from :func:`collapse_diagnostics` values, that reports a finding
    only when it is clearly larger than the noise of the samples it was measured on, and ends with one line
    ``"Next step: ..."``: what to try, from the project's own evidence (docs/which_method.md), with the
    interval of the finding it rests on.

    With ``I(x) = [x − z·SE, x + z·SE]`` the 95% normal interval (``z`` = 1.96) of a quantity and its standard
    error (``*_se`` keys; missing or NaN ones count as 0, and a line says so):

    * **chance**: a first line warns when the fused accuracy's interval reaches down to the accuracy of always
      predicting the most frequent class (``acc_majority``): the model has not learned the task, so the
      dominance, ignored and contribution lines (they would describe noise) are left out, and the next step is
      to train it.
    * **dominates**: the modality with the largest contribution dominates when ``I(contribution_lead)``, the
      interval of its lead over the second largest (from the bootstrap replicates of the difference), excludes
      0; otherwise "no modality clearly dominates". When every contribution and its SE are 0 (the fused accuracy
      equals the accuracy with every modality removed: the predictions do not depend on the inputs) a line says
      so instead, and the next step is to train; a non-finite contribution is reported as undefined, with no
      dominance line.
    * **ignored**: ``m`` is ignored when the upper ends of ``I(contribution/m)`` and ``I(drop/m)`` (the accuracy
      lost without ``m``) are both ``≤ tolerance``: even the largest contribution compatible with the samples
      is negligible. A contribution whose interval includes 0 but reaches above ``tolerance`` is reported as
      not distinguishable from 0.
    * **under-learned**: for each modality in ``alone_probe`` (an accuracy, or ``(accuracy, SE)`` e.g. the
      ``probe_se`` of the trained-alone run), the gap ``alone − probe`` with
      :math:`SE = \sqrt{SE_{probe}^2 + SE_{alone}^2}` (independent samples; a bare number has SE 0, i.e. it is
      taken as exact and only the joint probe's noise counts). Under-learned when ``I(gap)`` excludes 0 **and**
      ``gap > tolerance`` (clearly below, by more than a negligible amount); learned as well as alone when the
      upper end of ``I(gap)`` is ``≤ tolerance``; otherwise no clear gap.
    * **semantic loss** (the collapse paper's Fig. 4): the probe line also gives ``semantic_loss/<m>``, the probe's
      out-of-fold cross-entropy, and, for each modality in ``alone_semantic_loss`` (a loss, or ``(loss, SE)``: the
      same encoder trained with its own unimodal loss), the excess ``joint − alone`` with its interval; "higher"
      (or "lower") than with its own loss only when that interval excludes 0 **and** the excess is larger than
      ``semantic_tolerance`` nats in size; otherwise no clear difference, with the reason.
    * **against training alone**: ``alone_accuracy`` (each modality's model trained alone: its accuracy on the
      same samples, an accuracy or ``(accuracy, SE)``) and ``ensemble_accuracy`` (the unimodal ensemble of those
      models, the product of their probabilities, on the same samples) are compared with ``acc_fused``: the
      best modality alone (named) and the ensemble each get the gap ``fused − reference`` with
      :math:`SE = \sqrt{SE_{fused}^2 + SE_{ref}^2}`. That formula treats the two accuracies as measured on
      independent samples; on the same samples their errors are positively correlated, so the true SE of the gap
      is smaller and the interval is conservative (a gap it calls clear is clear). "clearly above" (or "clearly
      below") when ``I(gap)`` excludes 0 **and** ``|gap| > tolerance``; otherwise "level with (no clear
      difference)", with the reason.

    The next step, first that applies: not clearly above chance (or every contribution 0) → train further;
    fused clearly below the best modality alone → the unimodal ensemble or ``UMTLoss``
    (:func:`~lightning_balance.losses.choose_ume_or_umt` chooses on validation) before balancing; an encoder
    under-learned, or a modality ignored although alone it is clearly above ``acc_majority`` → its own learning
    signal (unimodal losses; ``CMLLoss`` when modalities can be missing at test); fused clearly below the ensemble
    → ``UMTLoss`` or unimodal losses (weaker evidence); level with or above the ensemble → probably nothing to
    gain from balancing; without these references the verdict says it cannot tell (train the references with
    ``lightning_balance.fit_alone``).
    """
    return _verdict(values, modalities, alone_probe, tolerance, z, alone_semantic_loss, semantic_tolerance,
                    alone_accuracy=alone_accuracy, ensemble_accuracy=ensemble_accuracy)[0]


def _verdict(values: Mapping[str, float], modalities: Sequence[str],
                      alone_probe: Optional[Mapping[str, Reference]] = None, tolerance: float = 0.02,
                      z: float = Z95, alone_semantic_loss: Optional[Mapping[str, Reference]] = None,
                      semantic_tolerance: float = 0.05, *, alone_accuracy: Optional[Mapping[str, Reference]] = None,
                      ensemble_accuracy: Optional[Reference] = None) -> tuple[list[str], str]:
    """:func:`imbalance_verdict`'s lines and the kind of its next step (:data:`NEXT_STEPS`)."""
    names = list(modalities)
    phi = {m: float(values.get(f"contribution/{m}", math.nan)) for m in names}
    missing_se: list[str] = []

    def se(key: str) -> float:
        val = values.get(key)
        if val is None or not math.isfinite(val):
            missing_se.append(key)
            return 0.0
        return float(val)

    def pm(x: float, err: float) -> str:
        return f"{x:.3f} ± {z * err:.3f}" if err > 0 else f"{x:.3f}"

    def signed(x: float, err: float) -> str:
        return f"{x:+.3f} ± {z * err:.3f}" if err > 0 else f"{x:+.3f}"

    def listing(items: Sequence[str]) -> str:
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    lines = []
    acc = float(values.get("acc_fused", math.nan))
    majority = values.get("acc_majority")
    chance_known = majority is not None and math.isfinite(majority)
    references = bool(alone_accuracy) or ensemble_accuracy is not None
    acc_err = se("acc_fused_se") if chance_known or references else 0.0
    untrained = False
    if majority is not None and chance_known and acc - z * acc_err <= majority:
        untrained = True
        lines.append(f"The fused model is not clearly above chance yet (accuracy {pm(acc, acc_err)} vs {majority:.3f} "
                     f"for always predicting the most frequent class): it has not learned the task, so its modality "
                     f"contributions would describe noise and are left out.")
    finite = [m for m in names if math.isfinite(phi[m])]
    zero = False
    ignored: list[str] = []
    if not untrained:
        contrib = {m: pm(phi[m], se(f"contribution_se/{m}")) for m in finite}
        zero = len(finite) == len(names) and all(
            abs(phi[m]) <= _ZERO and abs(se(f"contribution_se/{m}")) <= _ZERO for m in names)
        if len(finite) < len(names):
            undefined = [m for m in names if m not in finite]
            of = f"contribution of {undefined[0]} is" if len(undefined) == 1 else f"contributions of {listing(undefined)} are"
            lines.append(f"The Shapley {of} undefined (not finite): which modality dominates cannot be read from "
                         f"these values.")
        elif zero:
            listed = ", ".join(f"{m} {contrib[m]}" for m in names)
            lines.append(f"Every Shapley contribution is 0 ({listed}): the fused accuracy equals the accuracy with "
                         f"every modality removed, so the predictions do not depend on the inputs; no modality "
                         f"dominates or is singled out as ignored.")
        elif len(names) > 1:
            ranked = sorted(names, key=phi.__getitem__, reverse=True)
            lead, second = ranked[0], ranked[1]
            diff = float(values.get("contribution_lead", math.nan))
            if not math.isfinite(diff):
                diff = phi[lead] - phi[second]
            diff_se = se("contribution_lead_se")
            if diff - z * diff_se > 0 and diff > _ZERO:
                others = ", ".join(f"{m} {contrib[m]}" for m in names if m != lead)
                ratio = values.get("contribution_ratio", math.inf)
                ratio_text = f"ratio {ratio:.1f}" if math.isfinite(ratio) else "ratio unbounded"
                lines.append(f"{lead} dominates: Shapley contribution to accuracy {contrib[lead]} vs {others} "
                             f"({ratio_text}; lead {pm(diff, diff_se)}).")
            else:
                listed = ", ".join(f"{m} {contrib[m]}" for m in names)
                lines.append(f"No modality clearly dominates: Shapley contributions to accuracy {listed}; the lead of "
                             f"{lead} over {second}, {pm(diff, diff_se)}, is not clearly above 0 (its 95% interval "
                             f"includes 0).")
        for m in finite if not zero else ():
            phi_se = se(f"contribution_se/{m}")
            drop = values.get(f"drop/{m}", acc - values.get(f"acc_without/{m}", math.nan))
            drop_se = se(f"drop_se/{m}")
            if phi[m] + z * phi_se <= tolerance and drop + z * drop_se <= tolerance:
                ignored.append(m)
                lines.append(f"{m} is IGNORED: contribution {pm(phi[m], phi_se)}, accuracy without it drops only "
                             f"{pm(drop, drop_se)}.")
            elif phi[m] - z * phi_se <= 0 < phi[m] + z * phi_se:
                lines.append(f"{m}: contribution {pm(phi[m], phi_se)} is not distinguishable from 0 with these "
                             f"samples, nor shown to be below the tolerance {tolerance:g}; more samples would tell.")
    under: list[tuple[str, float, float]] = []
    checked: set[str] = set()
    for m in names:
        if f"probe/{m}" not in values or not math.isfinite(values[f"probe/{m}"]):
            continue
        probe = values[f"probe/{m}"]
        probe_se = se(f"probe_se/{m}")
        if alone_probe and m in alone_probe:
            checked.add(m)
            ref, ref_se = _reference(alone_probe[m])
            gap = ref - probe
            gap_se = math.sqrt(probe_se**2 + ref_se**2)
            low, high = gap - z * gap_se, gap + z * gap_se
            if low > 0 and gap > tolerance:
                under.append((m, gap, gap_se))
                state = f"UNDER-LEARNED by joint training ({pm(gap, gap_se)} below)"
            elif high <= tolerance:
                state = "learned as well as alone"
            else:
                why = "its 95% interval includes 0" if low <= 0 else f"within the tolerance {tolerance:g}"
                state = f"no clear gap ({pm(gap, gap_se)} below; {why})"
            lines.append(f"{m} encoder: linear probe {pm(probe, probe_se)} after joint training vs {pm(ref, ref_se)} "
                         f"trained alone -> {state}.")
        else:
            lines.append(f"{m} encoder: linear probe {pm(probe, probe_se)} (no trained-alone reference given).")
        loss = values.get(f"semantic_loss/{m}")
        if loss is not None and math.isfinite(loss):
            loss_se = se(f"semantic_loss_se/{m}")
            text = f"{m} encoder: semantic loss by linear evaluation (the probe's cross-entropy) {pm(loss, loss_se)}"
            if alone_semantic_loss and m in alone_semantic_loss:
                ref, ref_se = _reference(alone_semantic_loss[m])
                excess, excess_se = loss - ref, math.sqrt(loss_se**2 + ref_se**2)
                if excess - z * excess_se > 0 and excess > semantic_tolerance:
                    state = "higher than with its own loss: the fusion's gradient leaves it less decodable"
                elif excess + z * excess_se < 0 and -excess > semantic_tolerance:
                    state = "lower than with its own loss"
                else:
                    why = ("its 95% interval includes 0" if excess - z * excess_se <= 0 <= excess + z * excess_se
                           else f"within the tolerance {semantic_tolerance:g} nats")
                    state = f"no clear difference ({why})"
                text += f" vs {pm(ref, ref_se)} with its own loss ({pm(excess, excess_se)}: {state})"
            lines.append(text + ".")

    def compare(ref: float, ref_se: float) -> tuple[str, float, float, str]:
        """``(state, gap, SE, text)`` of ``fused − ref``; state "above", "below" or "level"."""
        gap, gap_se = acc - ref, math.sqrt(acc_err**2 + ref_se**2)
        low, high = gap - z * gap_se, gap + z * gap_se
        if low > 0 and gap > tolerance:
            return "above", gap, gap_se, "clearly above"
        if high < 0 and -gap > tolerance:
            return "below", gap, gap_se, "clearly below"
        why = "its 95% interval includes 0" if low <= 0 <= high else f"within the tolerance {tolerance:g}"
        return "level", gap, gap_se, f"level with (no clear difference: {why})"

    alone = {m: _reference(v) for m, v in (alone_accuracy or {}).items()}
    alone = {m: r for m, r in alone.items() if math.isfinite(r[0])}
    ensemble = _reference(ensemble_accuracy) if ensemble_accuracy is not None else None
    vs_alone: Optional[tuple[str, float, float, str]] = None
    vs_ensemble: Optional[tuple[str, float, float, str]] = None
    best = max(alone, key=lambda m: alone[m][0]) if alone else ""
    if (alone or ensemble is not None) and not math.isfinite(acc):
        lines.append("The fused accuracy is not in these values: no comparison with the trained-alone references.")
    elif alone:
        vs_alone = compare(*alone[best])
        of = "" if set(names) <= set(alone) else ", of those given"
        lines.append(f"Fused model vs the best modality trained alone ({best}{of}): accuracy {pm(acc, acc_err)} vs "
                     f"{pm(*alone[best])}, gap {signed(vs_alone[1], vs_alone[2])} -> {vs_alone[3]}.")
    if ensemble is not None and math.isfinite(acc) and math.isfinite(ensemble[0]):
        vs_ensemble = compare(*ensemble)
        lines.append(f"Fused model vs the unimodal ensemble (product of the alone models' probabilities): accuracy "
                     f"{pm(acc, acc_err)} vs {pm(*ensemble)}, gap {signed(vs_ensemble[1], vs_ensemble[2])} -> "
                     f"{vs_ensemble[3]}.")
    if missing_se:
        lines.append("(Some standard errors are missing from these values, e.g. "
                     f"{missing_se[0]!r}: those gaps are compared with the tolerance only, not with their noise.)")

    # the next step: the first case that applies, in the order of docs/which_method.md
    av, syn = _EVIDENCE["av_digits"], _EVIDENCE["synthetic"]
    informative: list[tuple[str, str]] = []  # ignored by the fusion, yet clearly above chance alone
    for m in ignored:
        ref_value = (alone_accuracy or {}).get(m, (alone_probe or {}).get(m))
        if ref_value is not None and majority is not None and chance_known:
            ref, ref_se = _reference(ref_value)
            if ref - z * ref_se > majority:
                informative.append((m, f"{m} is ignored, yet alone scores {pm(ref, ref_se)} vs {majority:.3f} for "
                                       f"the most frequent class"))
    if untrained or zero:
        why = (f"the fused accuracy {pm(acc, acc_err)} is not clearly above {majority:.3f}, and the imbalance "
               f"diagnosis needs a model above chance" if untrained else
               "the model's predictions do not depend on the inputs (every contribution 0), and the imbalance diagnosis "
               "needs a model that uses them")
        kind = "train"
        step = f"train further (more epochs; check the learning rate): {why}."
    elif vs_alone is not None and vs_alone[0] == "below":
        kind = "ensemble"
        step = (f"joint training loses to {best} alone (gap {signed(vs_alone[1], vs_alone[2])}): use the unimodal "
                f"ensemble or UMTLoss (lightning_balance.losses.choose_ume_or_umt chooses between them on "
                f"validation) before any balancing method.")
    elif under or informative:
        targets = [m for m, _, _ in under] + [m for m, _ in informative]
        findings = [f"{m} probe {pm(gap, gap_se)} below trained alone" for m, gap, gap_se in under]
        findings += [text for _, text in informative]
        who = f"the {targets[0]} encoder" if len(targets) == 1 else f"each of the {listing(targets)} encoders"
        kind = "own_signal"
        step = (f"give {who} its own learning signal "
                f"({'; '.join(findings)}): start with unimodal losses (`return self.add_unimodal_losses(loss)`, or "
                f"`self.balance_unimodal_losses = True` with `balanced_loss`), or "
                f"CMLLoss if modalities can be missing at test{'; check the fusion capacity' if informative else ''}. "
                f"On AV-Digits (5 seeds) fused accuracy went from {av['baseline']:.3f} to "
                f"{av['unimodal_losses_split_head']:.3f} with unimodal losses through the split head, "
                f"{av['cml']:.3f} with CML and {av['lfm']:.3f} with LFMLoss (docs/which_method.md §2).")
    elif vs_ensemble is not None and vs_ensemble[0] == "below":
        kind = "ensemble_or_own_signal"
        step = (f"the unimodal ensemble beats the fused model (gap {signed(vs_ensemble[1], vs_ensemble[2])}) though "
                f"no encoder is clearly under-learned: try UMTLoss or unimodal losses (`add_unimodal_losses`), or "
                f"use the ensemble itself; weaker evidence than an under-learned encoder (on AV-Digits, where one was, "
                f"UMT reached {av['umt']:.3f} and split-head unimodal losses {av['unimodal_losses_split_head']:.3f} "
                f"from {av['baseline']:.3f}).")
    elif vs_ensemble is not None:
        unchecked = [m for m in names if m not in checked]
        no_under = ("no encoder is clearly under-learned" if not unchecked else
                    f"no encoder is shown under-learned (no alone_probe for {listing(unchecked)}: pass it to check)")
        where = "level with" if vs_ensemble[0] == "level" else "clearly above"
        kind = "nothing"
        step = (f"probably nothing to gain from balancing: {no_under} and the fused model is {where} the unimodal "
                f"ensemble (gap {signed(vs_ensemble[1], vs_ensemble[2])}). That is the synthetic setting of "
                f"docs/which_method.md (joint {syn['baseline']:.3f} vs ensemble {syn['ensemble']:.3f}), where no "
                f"method changed fused accuracy beyond the seed spread.")
    elif vs_alone is not None:
        where = "level with" if vs_alone[0] == "level" else "clearly above"
        kind = "need_ensemble"
        step = (f"the fused model is {where} {best} alone (gap {signed(vs_alone[1], vs_alone[2])}); whether "
                f"balancing can gain more needs the unimodal ensemble: pass ensemble_accuracy (the product of the "
                f"alone models' probabilities, on the same samples).")
    else:
        probes = "" if alone_probe else " (and alone_probe)"
        kind = "need_references"
        step = ("without trained-alone references the verdict cannot tell whether there is anything to gain: train "
                "each modality alone (lightning_balance.fit_alone) and pass alone_accuracy and "
                f"ensemble_accuracy{probes}.")
    lines.append("Next step: " + step)
    return lines, kind


def diagnostics_table(values: Mapping[str, float], modalities: Sequence[str],
                      alone_probe: Optional[Mapping[str, Reference]] = None, z: float = Z95, *,
                      alone_accuracy: Optional[Mapping[str, Reference]] = None) -> str:
    """Markdown table of :func:`collapse_diagnostics` values, one row per modality and one for the fusion.
    Accuracies, contributions and probes show ``value ± z·SE`` (their 95% interval) when the values carry
    standard errors, and a line under the table says how they were obtained. ``alone_probe`` and
    ``alone_accuracy`` (each modality trained alone: its probe, its accuracy) add the columns "probe alone" and
    "alone acc"."""
    columns = [("contribution", "contribution"), ("acc_without", "acc without it"), ("acc", "unimodal acc"),
               ("alone_acc", "alone acc"), ("probe", "probe"), ("alone", "probe alone"), ("erank", "eff. rank"),
               ("cka", "CKA to fused"), ("vif_mean", "mean VIF")]
    with_se = {"contribution", "acc_without", "acc", "probe"}
    shown_se = []

    def fmt(val: float, err: Optional[float]) -> str:
        if err is not None and math.isfinite(err) and err > 0:
            shown_se.append(True)
            return f"{val:.3f} ± {z * err:.3f}"
        return f"{val:.3f}"

    def cell(key: str, m: str) -> str:
        err: Optional[float] = None
        val: Optional[float]
        if key in ("alone", "alone_acc"):
            ref = ((alone_probe if key == "alone" else alone_accuracy) or {}).get(m)
            if ref is None:
                return "–"
            val, err = _reference(ref)
        else:
            val = values.get(f"{key}/{m}")
            if key in with_se:
                err = values.get(f"{key}_se/{m}")
        if val is None or (isinstance(val, float) and math.isnan(val)):
            return "–"
        return f"{val:.1f}" if key in ("erank", "vif_mean") else fmt(val, err)

    used = [(k, t) for k, t in columns if any(cell(k, m) != "–" for m in [*modalities, "fused"])]
    lines = ["| | " + " | ".join(t for _, t in used) + " |", "|---" * (len(used) + 1) + "|"]
    for m in [*modalities, "fused"]:
        label = f"fused (acc {fmt(values['acc_fused'], values.get('acc_fused_se'))})" if m == "fused" else m
        lines.append(f"| {label} | " + " | ".join(cell(k, m) for k, _ in used) + " |")
    if shown_se:
        lines.append(f"(± : {z:g} standard errors, a 95% interval; bootstrap over samples for accuracies and "
                     f"contributions, binomial for probes)")
    return "\n".join(lines)


__all__ += ["masked_accuracy_value", "subset_correctness", "bootstrap_means", "cross_validated_probe_correct",
            "cross_validated_probe_accuracy", "probe_standard_error", "contribution_summary",
            "diagnostics_from_correctness", "collapse_diagnostics", "imbalance_verdict", "diagnostics_table", "Z95", "NEXT_STEPS", "next_step"]
