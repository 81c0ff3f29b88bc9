"""Gradient taps: identity forward; the backward edit the callback put in the tap, or none."""

import torch

from lightning_balance._taps import GradientTap, add_gradient, mix_gradients


def test_mix_gradients_routes_scaled_gradient_to_every_input():
    f = torch.tensor([1.0, 2.0], requires_grad=True)
    a = torch.tensor([3.0, 4.0], requires_grad=True)
    tap = GradientTap()
    out = mix_gradients(tap, f, a)
    assert torch.equal(out, f.detach())
    tap.coefficients = torch.tensor([0.5, -2.0])
    (out * torch.tensor([1.0, 10.0])).sum().backward()
    assert f.grad.tolist() == [0.5, 5.0] and a.grad.tolist() == [-2.0, -20.0]


def test_empty_taps_are_the_identity():
    f = torch.tensor([1.0, 2.0], requires_grad=True)
    a = torch.tensor([3.0, 4.0], requires_grad=True)
    (mix_gradients(GradientTap(), f, a) * 3).sum().backward()
    assert f.grad.tolist() == [3.0, 3.0] and a.grad is None
    z = torch.ones(2, requires_grad=True)
    (add_gradient(GradientTap(), z) * 2).sum().backward()
    assert z.grad.tolist() == [2.0, 2.0]


def test_add_gradient_adds_the_extra_term():
    z = torch.ones(2, 3, requires_grad=True)
    tap = GradientTap()
    out = add_gradient(tap, z)
    tap.extra = torch.full((2, 3), 0.25, dtype=torch.float64)  # cast to the gradient's dtype
    out.sum().backward()
    assert z.grad.dtype == torch.float32 and torch.allclose(z.grad, torch.full((2, 3), 1.25))
