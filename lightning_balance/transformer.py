"""A token-fusion transformer for the modality contract: each modality's features become tokens, a transformer
encoder attends over all of them with a CLS token, and an absent modality is masked out of the attention (never
zero-filled).

The design follows the late-fusion transformer baseline of "Fusion or Confusion?" (SimBaMM: one encoder per
modality, a linear projection to one token per modality, a transformer over the tokens with a CLS token and an
attention mask for missing modalities); the module is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["TokenFusionTransformer"]


class TokenFusionTransformer(nn.Module):
    r"""Token fusion: per-modality tokens, a CLS token, transformer encoder layers, the CLS output classified.

    For modality ``m`` with features ``z_m``:

    * ``(N, D_m)``: a linear projection to ``tokens_per_modality`` tokens of width ``d_model``;
    * ``(N, T, D_m)`` (token features): the same projection on each token, ``T · tokens_per_modality`` tokens
      (``T`` may differ between calls).

    Every token gets its modality's learned type embedding; a learned CLS token is prepended; the encoder
    (``num_layers`` pre-norm :class:`torch.nn.TransformerEncoderLayer`, ``batch_first``) runs with a key padding
    mask that hides the tokens of each sample's absent modalities, so the CLS token and the other tokens never
    attend to them: removing a modality (``present``, the contract's ``fuse_subset``, :class:`ModalityDropout`,
    the diagnosis) is masking, and the absent features' values cannot change the output. The CLS token is never
    masked, so every row has a key. Logits: ``head(LayerNorm(h_CLS))``.

    Declare it as the fusion, ``self.configure_modalities(encoders, fusion=TokenFusionTransformer([d_a, d_v], C))``:
    its ``forward`` takes ``present``, so the contract's ``missing="auto"`` becomes ``"none"`` (the mask reaches
    it) and the per-modality logits come from masking (``unimodal="mask"``).

    Args:
        in_features: each modality's feature width ``D_m``, in declared order.
        num_classes: the number of classes.
        d_model: the token width.
        tokens_per_modality: tokens made from each feature vector (or each input token).
        num_layers: transformer encoder layers.
        num_heads: attention heads (``d_model`` must be divisible by it).
        dim_feedforward: the layers' feed-forward width (default ``4 · d_model``).
        dropout: dropout inside the encoder layers.
    """

    def __init__(self, in_features: Sequence[int], num_classes: int, d_model: int = 64, tokens_per_modality: int = 1,
                 num_layers: int = 2, num_heads: int = 4, dim_feedforward: Optional[int] = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        widths = list(in_features)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"in_features must list each modality's positive feature width, got {in_features!r}.")
        for name, value, low in (("num_classes", num_classes, 2), ("d_model", d_model, 1),
                                 ("tokens_per_modality", tokens_per_modality, 1), ("num_layers", num_layers, 1),
                                 ("num_heads", num_heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}).")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.widths = widths
        self.d_model = d_model
        self.tokens_per_modality = tokens_per_modality
        # one projection per modality: a vector (N, D) gives k tokens, each token of (N, T, D) gives k tokens
        self.projections = nn.ModuleList([nn.Linear(w, tokens_per_modality * d_model) for w in widths])
        self.type_embeddings = nn.Parameter(torch.zeros(len(widths), d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.normal_(self.type_embeddings, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward or 4 * d_model, dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def tokens(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        """``(tokens (N, 1 + Σ T_m, d_model), owner (Σ T_m,))``: the CLS token then every modality's tokens, and
        the modality index of each non-CLS token."""
        if len(features) != len(self.widths):
            raise ValueError(f"TokenFusionTransformer expects {len(self.widths)} feature tensors (one per modality, "
                             f"in declared order), got {len(features)}.")
        parts, owner = [], []
        for i, z in enumerate(features):
            if z.ndim not in (2, 3) or z.shape[-1] != self.widths[i]:
                raise ValueError(f"modality {i}: features of shape (N, {self.widths[i]}) or (N, T, {self.widths[i]}) "
                                 f"expected, got {tuple(z.shape)}.")
            tokens_in = z if z.ndim == 3 else z.unsqueeze(1)  # (N, T, D), T = 1 for a vector
            t = self.projections[i](tokens_in).reshape(z.shape[0], -1, self.d_model)  # (N, T·k, d_model)
            parts.append(t + self.type_embeddings[i])
            owner.append(torch.full((t.shape[1],), i, dtype=torch.long, device=z.device))
        first = parts[0]
        cls = self.cls.expand(first.shape[0], 1, self.d_model).to(first.dtype)
        return torch.cat([cls, *parts], dim=1), torch.cat(owner)

    def forward(self, *features: Tensor, present: Optional[Tensor] = None) -> Tensor:
        """Logits ``(N, num_classes)``; ``present``: ``(N, M)`` bool, ``False`` where a sample lacks a modality."""
        tokens, owner = self.tokens(*features)
        n = tokens.shape[0]
        if present is None:
            pad = torch.zeros(n, tokens.shape[1], dtype=torch.bool, device=tokens.device)
        else:
            if present.shape != (n, len(self.widths)):
                raise ValueError(f"present must be (N, M) = ({n}, {len(self.widths)}), got {tuple(present.shape)}.")
            absent = ~present.bool()[:, owner]  # (N, Σ T_m)
            pad = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=tokens.device), absent], dim=1)
        # absent tokens hold zeros (their features may be anything, even NaN) and are hidden from every query
        tokens = tokens.masked_fill(pad[..., None], 0.0)
        h = self.encoder(tokens, src_key_padding_mask=pad)
        return self.head(self.norm(h[:, 0]))
