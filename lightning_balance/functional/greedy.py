r"""Greedy (Wu, Jastrzębski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in
Multi-modal Deep Neural Networks", ICML 2022): the math as pure tensor functions.

* :func:`squeeze`: the MMTM squeeze, the mean of a feature map over everything but the batch and channel axes.
* :func:`broadcast_gate`: an ``(N, C)`` gate shaped to multiply a feature map along its channel axis.
* :func:`speed_ratio`: the conditional-learning-speed increment :math:`\|\nabla\theta\|^2 / \|\theta\|^2` of a set
  of parameters (one optimizer step).
* :func:`greedy_update`: one step of the guided balanced training algorithm (``Bias_Mitigation_Strong``): the
  cumulative sums, :math:`\mathrm{BDR}_m = \log_{10}(M^{byp}_m / M^{main}_m)`, and the re-balancing window, as
  tensors (no host synchronisation).
* :func:`conditional_utilization_rate`: :math:`u(m_j \mid m_i) = (A(m_i, m_j) - A(m_i)) / A(m_i, m_j)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_balance._dtypes import accumulation_dtype

__all__ = ["GreedyState", "broadcast_gate", "conditional_utilization_rate", "greedy_update", "speed_ratio",
           "squeeze"]


def squeeze(x: Tensor, channel_dim: int = 1) -> Tensor:
    """``(N, C)``: ``x`` averaged over every axis but the batch axis (0) and ``channel_dim``.

    ``(N, C, H, W)`` and ``(N, C, L)`` with ``channel_dim=1`` (convolutional maps, the official layout);
    ``(N, T, D)`` token features with ``channel_dim=-1``; ``(N, C)`` is returned as is.
    """
    if x.ndim < 2:
        raise ValueError(f"MMTM expects features of shape (N, C, ...) with a batch axis, got shape {tuple(x.shape)}.")
    c = channel_dim % x.ndim
    if c == 0:
        raise ValueError("channel_dim must not be the batch axis (0).")
    moved = x.movedim(c, 1)
    return moved if moved.ndim == 2 else moved.reshape(moved.shape[0], moved.shape[1], -1).mean(-1)


def broadcast_gate(gate: Tensor, like: Tensor, channel_dim: int = 1) -> Tensor:
    """The ``(N, C)`` ``gate`` viewed as ``(N, 1, .., C, .., 1)`` with ``C`` at ``channel_dim`` of ``like``."""
    c = channel_dim % like.ndim
    shape = [1] * like.ndim
    shape[0], shape[c] = gate.shape[0], gate.shape[1]
    return gate.reshape(shape)


def speed_ratio(params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    r""":math:`\sum_p \|\nabla p\|^2 / \sum_p \|p\|^2` (0-dim, float64; float32 on MPS), from the parameters and
    their gradients (the official ``compute_BDR`` sums squared norms over a group, then divides). One
    ``_foreach_norm`` per list, accumulated in float32 whatever the parameters' dtype; no autograd graph."""
    if not params:
        raise ValueError("speed_ratio needs at least one parameter.")
    with torch.no_grad():
        params = [p.detach() for p in params]
        dtype = accumulation_dtype(params[0].device)
        wn = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)).to(dtype).pow(2).sum()
        if not grads:
            return wn * 0
        gn = torch.stack(torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float32)).to(dtype).pow(2).sum()
        return gn / wn


class GreedyState(NamedTuple):
    """The guided algorithm's state; every field a tensor on the training device (identical on every rank)."""

    bypass: Tensor  #: (M,) float64, cumulative ‖∇θ_byp‖²/‖θ_byp‖² (MMTM parameters of each modality)
    main: Tensor  #: (M,) float64, cumulative ‖∇θ_main‖²/‖θ_main‖² (each branch's own parameters)
    curating: Tensor  #: () bool, inside a re-balancing window
    window_step: Tensor  #: () int64, steps taken in the current window
    caring: Tensor  #: () int64, the modality whose cross-modal gate is replaced by its running average, -1 none

    @property
    def bdr(self) -> Tensor:
        """(M,) :math:`\\log_{10}(M^{byp}_m / M^{main}_m)` (NaN before the first step); the sums do not change inside a
        window, so this is also the value the window was opened on."""
        return torch.log10(self.bypass / self.main)


def initial_state(m: int, device: torch.device) -> GreedyState:
    """The state before the first step (``on_train_begin``: sums 0, not re-balancing)."""
    f64 = accumulation_dtype(device)
    return GreedyState(torch.zeros(m, dtype=f64, device=device), torch.zeros(m, dtype=f64, device=device),
                       torch.zeros((), dtype=torch.bool, device=device), torch.zeros((), dtype=torch.long, device=device),
                       torch.full((), -1, dtype=torch.long, device=device))


def greedy_update(state: GreedyState, bypass_ratio: Tensor, main_ratio: Tensor, epsilon: float, window: int,
                  unlocked: bool) -> GreedyState:
    r"""One optimizer step of ``Bias_Mitigation_Strong.on_backward_end``, vectorised.

    * Not ``unlocked`` (before ``starting_epoch``): add the step's ratios to the sums; no re-balancing.
    * Unlocked and not re-balancing: add the ratios; :math:`\mathrm{BDR}_m = \log_{10}(M^{byp}_m/M^{main}_m)`; if
      :math:`\max_m \mathrm{BDR}_m - \min_m \mathrm{BDR}_m > \varepsilon` (for two modalities
      :math:`|d_{BDR}| > \varepsilon`, :math:`d_{BDR} = \mathrm{BDR}_0 - \mathrm{BDR}_1`) start a window caring for
      :math:`\arg\max_m \mathrm{BDR}_m` (``caring = 0`` when :math:`d_{BDR} > 0`, else 1).
    * Re-balancing: the sums are left alone; after ``window`` such steps the window closes.

    A NaN BDR (zero sums) never starts a window, as ``abs(nan) > eps`` is false in the official code.
    """
    update = ~state.curating | (not unlocked)
    bypass = torch.where(update, state.bypass + bypass_ratio.to(state.bypass.dtype), state.bypass)
    main = torch.where(update, state.main + main_ratio.to(state.main.dtype), state.main)
    bdr = torch.log10(bypass / main)
    if not unlocked:
        return GreedyState(bypass, main, torch.zeros_like(state.curating), torch.zeros_like(state.window_step),
                           torch.full_like(state.caring, -1))
    spread = bdr.max() - bdr.min()
    enter = ~state.curating & (spread > epsilon)
    window_step = torch.where(state.curating, state.window_step + 1, torch.zeros_like(state.window_step))
    leave = state.curating & (window_step >= window)
    curating = (state.curating & ~leave) | enter
    caring = torch.where(enter, torch.argmax(torch.nan_to_num(bdr, nan=-torch.inf)), state.caring)
    caring = torch.where(curating, caring, torch.full_like(caring, -1))
    return GreedyState(bypass, main, curating, window_step, caring)


def conditional_utilization_rate(accuracy_joint: Tensor, accuracy_alone: Tensor) -> Tensor:
    r""":math:`u(m_j \mid m_i) = (A(m_i, m_j) - A(m_i)) / A(m_i, m_j)`: the share of branch :math:`i`'s accuracy that
    it owes to the cross-modal input from :math:`m_j`. ``accuracy_joint``: branch :math:`i`'s accuracy with the
    cross-modal flow; ``accuracy_alone``: with the other modalities' squeezed maps replaced by their training
    averages (:func:`lightning_balance.cross_modal_off`). Elementwise; the imbalance is
    :math:`d_{util} = u(m_0 \mid m_1) - u(m_1 \mid m_0)`."""
    accuracy_joint = torch.as_tensor(accuracy_joint, dtype=torch.float64)
    accuracy_alone = torch.as_tensor(accuracy_alone, dtype=torch.float64)
    return (accuracy_joint - accuracy_alone) / accuracy_joint
