"""Contrastive alignment between modalities as a loss term (CLIP-style symmetric InfoNCE)."""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_balance.functional.contrastive import symmetric_info_nce
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(LossTerm):
    r"""Symmetric InfoNCE between per-modality projections, averaged over modality pairs.

    .. math:: L = \frac{1}{|P|}\sum_{(a,b) \in P} \tfrac12\big[\mathrm{CE}(e^{t}\hat p_a \hat p_b^\top, I) +
              \mathrm{CE}(e^{t}\hat p_b \hat p_a^\top, I)\big]

    with ``p_m = proj_m(z_m)`` (a linear projection per modality, or the features themselves), rows
    L2-normalised, the learnable temperature ``t`` initialised to ``log(1/0.07)`` and the scale ``e^t``
    clamped at 100 (open_clip's convention, applied in the forward pass), and ``P`` all pairs of
    modalities. Under DDP the embeddings of every rank are gathered, so negatives come from the global
    batch, and every rank computes the loss of the whole global batch with gradient through its own
    rows: the result equals single-process training on the global batch, with no collective inside
    the backward pass (a gather with gradient would communicate there, concurrently with DDP's own
    gradient reduction). Each rank's local batch must have the same size. The logged value is the
    global batch's loss.

    Args:
        feature_dims: modality → feature width, to build the projections; ``None``: no projection
            (all features must have one width).
        projection_dim: width of the projections.
        init_temperature: initial temperature (0.07).
        max_scale: clamp of ``e^t`` (100).
        weight, start_epoch, end_epoch: see :class:`LossTerm`.

    Standalone: ``ContrastiveLoss()({"audio": z_a, "visual": z_v})``.
    """

    name = "contrastive"

    def __init__(self, feature_dims: Optional[dict[str, int]] = None, projection_dim: int = 128,
                 init_temperature: float = 0.07, max_scale: float = 100.0, weight: float = 1.0,
                 start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        if not 0 < init_temperature < 1:
            raise ValueError(f"init_temperature must be in (0, 1), got {init_temperature!r}.")
        if max_scale <= 1:
            raise ValueError(f"max_scale must be > 1, got {max_scale!r}.")
        self.projections = nn.ModuleDict(
            {m: nn.Linear(d, projection_dim) for m, d in feature_dims.items()} if feature_dims else {}
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def embed(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.projections:
            missing = [m for m in features if m not in self.projections]
            if missing:
                raise ModalityContractError(f"ContrastiveLoss has no projection for {missing}; pass feature_dims for them.")
            return {m: self.projections[m](z.reshape(z.shape[0], -1)) for m, z in features.items()}
        widths = {m: z.reshape(z.shape[0], -1).shape[-1] for m, z in features.items()}
        if len(set(widths.values())) != 1:
            raise ModalityContractError(
                f"ContrastiveLoss without projections needs equal feature widths, got {widths}; pass feature_dims."
            )
        return {m: z.reshape(z.shape[0], -1) for m, z in features.items()}

    def forward(self, features: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        if len(features) < 2:
            raise ModalityContractError("ContrastiveLoss needs at least two modalities.")
        emb = self.embed(features)
        n = next(iter(emb.values())).shape[0]
        if n == 0:
            raise ModalityContractError("ContrastiveLoss got an empty batch.")
        scale = self.scale()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            # Exact global-batch loss without any collective in the backward pass (which would race with
            # DDP's gradient all-reduce): gather every rank's embeddings without gradient, put this rank's
            # own (with gradient) in its slot, and compute the loss over the whole global batch on every rank.
            # d(global loss)/d(local rows) is then exact; DDP averages parameter gradients over ranks, so the
            # loss is multiplied by the world size, and the temperature -- used identically on every rank --
            # sees its gradient divided by it again.
            rank = dist.get_rank()
            full = {}
            for m, e in emb.items():
                parts = [torch.empty_like(e) for _ in range(world)]
                dist.all_gather(parts, e.detach().contiguous())
                parts[rank] = e
                full[m] = torch.cat(parts, dim=0)
            emb = full
            scale = scale.detach() + (scale - scale.detach()) / world
        losses = [symmetric_info_nce(emb[a], emb[b], scale) for a, b in itertools.combinations(emb, 2)]
        return torch.stack(losses).mean() * world

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(record.features), {"scale": self.scale().detach()}
