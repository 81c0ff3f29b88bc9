"""Linear probe of frozen features: how much class information an encoder carries (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fit_linear_probe", "linear_probe_accuracy"]


def fit_linear_probe(
    features: Tensor, targets: Tensor, num_classes: int, weight_decay: float = 1e-4, max_iter: int = 200
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multinomial logistic regression on standardised features, fitted full-batch with L-BFGS.

    Deterministic (no sampling). Returns ``(weight, bias, mean, std)``; predict with
    ``((x - mean) / std) @ weight.T + bias``.
    """
    if features.ndim != 2 or targets.shape != (features.shape[0],):
        raise ValueError(
            f"features must be (N, D) and targets (N,), got {tuple(features.shape)} and {tuple(targets.shape)}."
        )
    # usable from Lightning's validation loop, which runs under inference mode
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().double().clone()
        targets = targets.clone()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
        x = (x - mean) / std
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, targets) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, std


def linear_probe_accuracy(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
) -> float:
    """Accuracy on ``test`` of a linear probe fitted on ``train`` (frozen features)."""
    weight, bias, mean, std = fit_linear_probe(train_features, train_targets, num_classes, weight_decay)
    logits = ((test_features.detach().double() - mean) / std) @ weight.T + bias
    return float((logits.argmax(-1) == test_targets).double().mean())
