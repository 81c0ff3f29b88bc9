r"""Robustness to absent and noisy modalities at test time (pure tensor functions).

A collapsed model fails when its dominant modality is absent. These functions build the test-time masks
of a missing-rate sweep and summarise a curve by its area:

* :func:`position_uniform`: a uniform number per (sample position, stream), a hash of ``(seed, stream,
  position)``: the same sample gets the same draw in any batch order and on any DDP rank, so a sweep
  under DDP equals one process.
* :func:`sweep_presence`: the presence mask of one point of a sweep: ``which`` = one modality absent at
  ``rate``, or ``"all"``: every modality absent independently at ``rate`` (MUSE-style), never all of a
  sample's (the one with the largest draw is kept); intersected with the samples' own presence.
* :func:`curve_area`: the normalised area under an accuracy curve (trapezoid rule divided by the range
  of rates: the mean accuracy over the sweep).
* :func:`uniform_noise`: additive uniform noise of standard deviation ``rate × σ`` per feature, our reading
  of the "noise rate" of the collapse paper's denoising experiment (Chaudhuri et al., ICML 2025, §5: "additive
  random uniform noise over a range of noise rates (from 5–50%)"; the paper gives no formula).
* :func:`position_noise`: the same noise on a batch of **features**, scaled by each sample's own feature RMS and
  drawn from each element's (sample position, index) hash, so that it needs no dataset statistics and a sweep
  under DDP equals one process (what :class:`~lightning_balance.ModalityDiagnostics` uses).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = ["position_uniform", "sweep_presence", "curve_area", "uniform_noise", "position_noise"]

_MASK64 = (1 << 64) - 1


def _to_signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def position_uniform(positions: Tensor, stream: int, seed: int = 0) -> Tensor:
    """``(N,)`` float64 in ``[0, 1)``: splitmix64 of ``(seed, stream, position)`` for each integer position."""
    x = positions.to(torch.int64) * _to_signed(0x9E3779B97F4A7C15)
    x = x + _to_signed(seed * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB + 0x2545F4914F6CDD1D)
    x = (x ^ _shr(x, 30)) * _to_signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _to_signed(0x94D049BB133111EB)
    x = x ^ _shr(x, 31)
    return _shr(x, 11).to(torch.float64) / float(1 << 53)


def sweep_presence(positions: Tensor, names: Sequence[str], rate: float, which: str, seed: int = 0,
                   present: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """The presence mask ``{m: (N,) bool}`` of one sweep point (see the module docstring)."""
    if which != "all" and which not in names:
        raise ValueError(f"which must be 'all' or one of {list(names)}, got {which!r}.")
    draws = torch.stack([position_uniform(positions, 1 + i, seed) for i in range(len(names))], 1)  # (N, M)
    own = (torch.ones(len(positions), len(names), dtype=torch.bool, device=positions.device) if present is None
           else torch.stack([present[m] for m in names], 1))
    if which == "all":
        kept = own & (draws >= rate)
        lost = own.any(1) & ~kept.any(1)
        best = torch.where(own, draws, torch.full_like(draws, -1.0)).argmax(1)
        rescue = torch.nn.functional.one_hot(best, len(names)).bool() & lost[:, None]
        kept = kept | rescue
    else:
        col = list(names).index(which)
        kept = own.clone()
        drop = draws[:, col] < rate
        # a sample whose only modality is `which` keeps it (a prediction needs one)
        only = own[:, col] & (own.sum(1) == 1)
        kept[:, col] = own[:, col] & (~drop | only)
    return {m: kept[:, i] for i, m in enumerate(names)}


def curve_area(rates: Sequence[float], values: Sequence[float]) -> float:
    """Normalised area under ``values`` over ``rates`` (trapezoid rule ÷ the range; one point: its value)."""
    if len(rates) != len(values) or not rates:
        raise ValueError(f"rates and values must be non-empty and of one length, got {len(rates)} and {len(values)}.")
    if len(rates) == 1:
        return float(values[0])
    area = sum((rates[i + 1] - rates[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(rates) - 1))
    return float(area / (rates[-1] - rates[0]))


def uniform_noise(x: Tensor, rate: float, std: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``x + ε``, ``ε ~ U(−a, a)`` per element with ``a = √3 · rate · std`` (noise std = ``rate × std``;
    ``std`` broadcasts over the samples, e.g. the training features' per-feature standard deviation)."""
    a = math.sqrt(3.0) * rate * std.to(x.dtype)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device) * 2 - 1
    return x + a * u


def position_noise(z: Tensor, positions: Tensor, rate: float, stream: int, seed: int = 0) -> Tensor:
    r"""``z + ε`` for a batch of features ``z`` ``(N, ...)``: ``ε ~ U(−a_i, a_i)`` per element with
    :math:`a_i = \sqrt{3}\,\mathrm{rate}\cdot\mathrm{RMS}(z_i)`, so the noise of sample ``i`` has standard deviation
    ``rate`` times the root mean square of its own features (its noise-to-signal ratio is ``rate``). Each
    element's draw is :func:`position_uniform` of ``position × K + k`` (``K`` elements per sample) on ``stream``:
    the same sample gets the same noise in any batch, on any rank. (``position × K`` wraps around in int64 beyond
    2⁶³, e.g. rank-local positions ``rank · 2⁴⁰ + i`` with over a million elements per sample: the draws stay
    uniform, but two samples may then share a stream.)"""
    n = z.shape[0]
    k = math.prod(z.shape[1:])
    if n == 0 or k == 0:
        return z.clone()
    flat = z.reshape(n, k)
    index = positions.to(torch.int64).reshape(n, 1) * k + torch.arange(k, device=positions.device)
    u = position_uniform(index.reshape(-1), stream, seed).reshape(n, k).to(device=z.device, dtype=torch.float32)
    rms = flat.float().pow(2).mean(1, keepdim=True).sqrt()
    return (flat.float() + math.sqrt(3.0) * rate * rms * (2 * u - 1)).to(z.dtype).reshape(z.shape)
