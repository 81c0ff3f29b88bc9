"""Drop-in heads that replace the fusion's computation (not loss terms, not callbacks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CosineHead"]


class CosineHead(nn.Module):
    r"""MMCosine (Xu, Feng, Zhang, Hu, ICASSP 2023): per-modality cosine logits, summed.

    .. math:: o_c = \sum_m s \cdot \Big\langle \frac{z_m}{\lVert z_m\rVert}, \frac{w_{m,c}}{\lVert w_{m,c}\rVert}\Big\rangle

    It **replaces** a concat + linear head: declare it as the fusion,
    ``self.configure_modalities(encoders, fusion=CosineHead([d_a, d_v], num_classes))``, and call it with the
    features in declared order. There is no bias (the official code trains without it; its ``valid()`` scores
    the plain linear head instead, which we do not reproduce: docs/methods/mmcosine.md; and an
    unused parameter would trouble DDP). Each modality's unimodal logits are ``s·cos(z_m, W_m)``; the
    contract's masked mode gives exactly these (a zeroed feature contributes 0), so OGM-GE, the
    monitor and every other method see MMCosine's own unimodal predictions. Computed in float32.

    Token sequences ``(N, T, D)`` (any ``(N, ..., D)``) are averaged over the tokens first, as the
    contract's default ``pool_features`` does, so the head returns ``(N, C)``; for another pooling (a CLS
    token), pool before the head (e.g. in an overridden ``fuse_features``). A zeroed (removed) modality
    still contributes 0.

    Args:
        in_features: each modality's feature width, in declared order.
        num_classes: number of classes.
        scale: ``s`` (official 10; BalanceBenchmark 15).
        eps: floor of the norms.
    """

    def __init__(self, in_features: Sequence[int], num_classes: int, scale: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        widths = list(in_features)
        if len(widths) < 1 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"in_features must list positive feature widths, got {in_features!r}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
        if not isinstance(scale, (int, float)) or scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}.")
        self.widths = widths
        self.scale = float(scale)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(num_classes, sum(widths)))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def unimodal(self, *features: Tensor) -> list[Tensor]:
        """``s·cos(z_m, W_m)`` for each modality, ``(N, C)`` each."""
        if len(features) != len(self.widths):
            raise ValueError(f"CosineHead expects {len(self.widths)} feature tensors, got {len(features)}.")
        out = []
        for z, w in zip(features, torch.split(self.weight, self.widths, dim=1)):
            if z.ndim < 2:
                raise ValueError(f"CosineHead takes features of shape (N, D) or (N, T, D), got {tuple(z.shape)}.")
            if z.ndim > 2:  # token sequences: one vector per sample, the tokens' mean
                z = z.mean(dim=tuple(range(1, z.ndim - 1)))
            if z.shape[-1] != w.shape[1]:
                raise ValueError(f"feature width {z.shape[-1]} does not match the head's {w.shape[1]}.")
            with torch.autocast(z.device.type, enabled=False):  # float32 also under AMP (the product is a cosine)
                zn = F.normalize(z.float(), dim=-1, eps=self.eps)
                wn = F.normalize(w.float(), dim=-1, eps=self.eps)
                out.append(self.scale * zn @ wn.T)
        return out

    def forward(self, *features: Tensor) -> Tensor:
        return torch.stack(self.unimodal(*features)).sum(0)
