"""Sample-level and modality-level modality valuation (Wei, Feng, Wang, Hu, CVPR 2024, "Enhancing Multimodal
Cooperation via Sample-level Modality Valuation"): the per-sample Shapley values and the re-sampling rules.

Pure tensor functions, no Lightning:

* :func:`sample_shapley_values` — per sample ``i`` and modality ``m``, the Shapley value of the game
  ``v_i(S) = |S| · 1[the prediction with only the modalities in S is correct]`` (``v(∅) = 0``; the grand coalition is
  worth ``|M|``, as in the official code's ``value_all = 2`` for two modalities);
* :func:`sample_level_copies` — the official number of extra copies per sample and modality (the copy keeps only
  that modality): 1 if ``0.4 < φ < 1``, 2 if ``−0.1 < φ < 0.4``, 3 if ``φ < −0.1``, else 0;
* :func:`modality_level_copies` — the official modality-level count ``int(f(α · (2/3) |γ_a − γ_v|) · N)`` with
  ``γ_u = 1 − φ̄_u``, keeping the modality with the larger gap.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor


__all__ = ["modality_level_copies", "sample_level_copies", "sample_shapley_values"]


def _scaled_shapley_weights(m: int, device: torch.device) -> Tensor:
    """``(M, 2^M − 1)`` int64: ``M! · W[u, S−1]``, the weight of ``v(S)`` in ``φ_u`` (``+w(|S|−1)`` if ``u ∈ S``,
    ``−w(|S|)`` if not, ``w(s) = s!(M−s−1)!/M!``) times ``M!``, integers, so that ``φ`` is computed exactly
    (``φ = 1`` and ``φ = 0`` stay on their thresholds)."""
    def w(size: int) -> int:
        return math.factorial(size) * math.factorial(m - size - 1)

    rows = [[w(bin(s).count("1") - 1) if s >> u & 1 else -w(bin(s).count("1")) for s in range(1, 2 ** m)]
            for u in range(m)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _popcount(masks: Tensor, bits: int) -> Tensor:
    return sum(((masks >> b) & 1) for b in range(bits))  # type: ignore[return-value]


def sample_shapley_values(correct: Tensor, present: Optional[Tensor] = None) -> Tensor:
    """``(N, M)`` per-sample Shapley values from ``correct``, the ``(2^M, N)`` bool correctness of every subset
    (row = bit mask, bit ``b`` = modality ``b``; :func:`~lightning_balance.functional.subset_correctness`).

    ``v_i(S) = |S ∩ P_i| · correct_i(S)`` with ``P_i`` the modalities sample ``i`` has (``present``, ``(N, M)`` bool;
    ``None``: all): a modality the sample lacks is a null player (its value is 0) and the others share the game of
    the modalities it has. With two complete modalities: ``φ_a = (v_a + v_av − v_v) / 2`` with ``v_a, v_v ∈ {0, 1}``
    and ``v_av ∈ {0, 2}``, the official values ``{−0.5, 0, 0.5, 1, 1.5}``.
    """
    subsets, n = correct.shape
    m = int(round(math.log2(subsets)))
    if 2 ** m != subsets or m < 1:
        raise ValueError(f"correct must have 2^M rows (one per subset), got {subsets}.")
    masks = torch.arange(subsets, device=correct.device)
    if present is None:
        sizes = _popcount(masks, m)[:, None].expand(subsets, n)
    else:
        if present.shape != (n, m):
            raise ValueError(f"present must be (N, M) = ({n}, {m}), got {tuple(present.shape)}.")
        bits = (present.long() << torch.arange(m, device=present.device)).sum(1)  # (N,) mask of each sample
        sizes = _popcount(masks[:, None] & bits[None, :], m)
    value = sizes.long() * correct.long()  # (2^M, N) integers
    gains = value[1:] - value[0]  # v(S) − v(∅), v(∅) = 0
    weights = _scaled_shapley_weights(m, gains.device)
    scaled = (weights[:, :, None] * gains[None]).sum(1)  # M! · φ, exact (no integer matmul: CUDA has none)
    return (scaled.double() / math.factorial(m)).T  # (N, M)


def sample_level_copies(phi: Tensor) -> Tensor:
    """``(N, M)`` long: extra copies of sample ``i`` that keep only modality ``m`` (the official thresholds, strict
    on both sides): 1 if ``0.4 < φ < 1``, 2 if ``−0.1 < φ < 0.4``, 3 if ``φ < −0.1``, 0 otherwise (``φ ≥ 1``, or a
    value exactly on a threshold)."""
    out = torch.zeros(phi.shape, dtype=torch.long, device=phi.device)
    out[(phi > 0.4) & (phi < 1.0)] = 1
    out[(phi > -0.1) & (phi < 0.4)] = 2
    out[phi < -0.1] = 3
    return out


def modality_level_copies(mean_phi: Tensor, alpha: float, num_samples: int,
                          func: Literal["linear", "tanh", "square"] = "linear") -> tuple[int, int]:
    """``(count, keep)``: how many extra copies to draw (``int(d · N)``) and which modality they keep (index into
    ``mean_phi``, two modalities), with ``γ_u = 1 − φ̄_u`` and

    ``d = α · (2/3) |γ_0 − γ_1|`` (linear), ``tanh(α · (2/3) |γ_0 − γ_1|)`` (tanh), ``((2/3) |γ_0 − γ_1|)^1.5 · α``
    (square), as in the official ``AV_KS_Dataset_modality_level``. The copies keep modality 0 when ``γ_0 > γ_1``,
    else modality 1 (the official tie goes to modality 1)."""
    if mean_phi.numel() != 2:
        raise ValueError(f"the modality-level rule compares two modalities; got {mean_phi.numel()}.")
    gap = (1.0 - mean_phi.double()).tolist()
    base = abs(gap[0] - gap[1]) / 3 * 2
    if func == "linear":
        d = base * alpha
    elif func == "tanh":
        d = math.tanh(base * alpha)
    elif func == "square":
        d = base ** 1.5 * alpha
    else:
        raise ValueError(f"func must be 'linear', 'tanh' or 'square', got {func!r}.")
    return int(d * num_samples), 0 if gap[0] > gap[1] else 1
