"""Symmetric InfoNCE (CLIP-style) between modality embeddings. Pure tensor functions, no Lightning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["symmetric_info_nce"]


def symmetric_info_nce(a: Tensor, b: Tensor, scale: Tensor | float, a_all: Tensor | None = None,
                       b_all: Tensor | None = None, offset: int = 0) -> Tensor:
    r""":math:`\tfrac12[\mathrm{CE}(s\,\hat a \hat b_{all}^\top, y) + \mathrm{CE}(s\,\hat b \hat a_{all}^\top, y)]`
    with L2-normalised rows and positives on the diagonal (``y_i = offset + i``).

    ``a``, ``b``: this process's ``(N, d)`` embeddings (the anchors); ``a_all``, ``b_all``: the embeddings of the
    global batch (negatives from every rank; default: ``a``, ``b``); ``offset``: where this process's rows sit
    in them. Computed in float32, with autocast off (under AMP too).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must both have shape (N, d), got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[0] == 0:
        raise ValueError("symmetric_info_nce needs a non-empty batch.")
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    with torch.autocast(a.device.type, enabled=False):  # float32 also under AMP: the logits reach 100 × a cosine
        an, bn = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
        an_all, bn_all = F.normalize(a_all.float(), dim=-1), F.normalize(b_all.float(), dim=-1)
        labels = torch.arange(offset, offset + a.shape[0], device=a.device)
        scale = scale.float() if isinstance(scale, Tensor) else scale
        return 0.5 * (F.cross_entropy(scale * an @ bn_all.T, labels) + F.cross_entropy(scale * bn @ an_all.T, labels))
