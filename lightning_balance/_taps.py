"""Gradient taps: identity in the forward pass, a callback-controlled edit in the backward pass.

They let a callback change how gradient flows through the fused logits or the per-modality features
of the current step, inside the user's single ``backward()`` (so DDP's gradient reduction and AMP's
loss scaling see the edited gradient as an ordinary one), without changing the user's loss.
The callback fills the tap in ``on_before_backward``; a tap left empty passes the gradient unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["GradientTap", "mix_gradients", "add_gradient"]


class GradientTap:
    """Holder of the backward-pass edit of one recorded step.

    Attributes:
        coefficients: for :func:`mix_gradients`: ``(K,)`` tensor, the gradient reaching the output is
            passed to input ``k`` multiplied by ``coefficients[k]``.
        extra: for :func:`add_gradient`: a tensor added to the gradient reaching the output.
    """

    __slots__ = ("coefficients", "extra")

    def __init__(self) -> None:
        self.coefficients: Optional[Tensor] = None
        self.extra: Optional[Tensor] = None


class _MixGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tap: GradientTap, output: Tensor, *others: Tensor) -> Tensor:
        ctx.tap = tap
        ctx.count = len(others)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        coefficients = ctx.tap.coefficients
        if coefficients is None:
            return (None, grad) + (None,) * ctx.count
        c = coefficients.to(device=grad.device, dtype=grad.dtype)
        return (None, grad * c[0]) + tuple(grad * c[k] for k in range(1, ctx.count + 1))


class _AddGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tap: GradientTap, x: Tensor) -> Tensor:
        ctx.tap = tap
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        extra = ctx.tap.extra
        if extra is None:
            return None, grad
        return None, grad + extra.to(device=grad.device, dtype=grad.dtype)


def mix_gradients(tap: GradientTap, output: Tensor, *others: Tensor) -> Tensor:
    """Return ``output`` unchanged; in backward, send ``c[0]·g`` to ``output`` and ``c[k]·g`` to ``others[k-1]``,
    with ``g`` the incoming gradient and ``c = tap.coefficients`` (identity while it is ``None``)."""
    return _MixGradients.apply(tap, output, *others)


def add_gradient(tap: GradientTap, x: Tensor) -> Tensor:
    """Return ``x`` unchanged; in backward, add ``tap.extra`` to the gradient reaching ``x``."""
    return _AddGradient.apply(tap, x)
