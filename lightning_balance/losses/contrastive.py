"""Contrastive alignment between modalities as a loss term (CLIP-style symmetric InfoNCE)."""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_balance._distributed import global_batch_rows
from lightning_balance.functional.contrastive import symmetric_info_nce
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(LossTerm):
    r"""Symmetric InfoNCE between per-modality projections, averaged over modality pairs.

    .. math:: L = \frac{1}{|P|}\sum_{(a,b) \in P} \tfrac12\big[\mathrm{CE}(e^{t}\hat p_a \hat p_b^\top, I) +
              \mathrm{CE}(e^{t}\hat p_b \hat p_a^\top, I)\big]

    with ``p_m = proj_m(v_m)`` (a linear projection per modality, or the vectors themselves), rows
    L2-normalised, the learnable temperature ``t`` initialised to ``log(1/0.07)`` and the scale ``e^t``
    clamped at 100 (open_clip's bound, applied in the forward pass), and ``P`` all pairs of modalities.
    ``v_m`` is one vector per sample: the step's features pooled by the module's ``pool_features``
    (token sequences ``(N, T, D)`` are averaged over the tokens; ``feature_dims`` gives ``D``).

    Under DDP the embeddings of every rank are gathered (their counts first, so per-rank batches may
    differ in size), negatives come from the global batch, and every rank computes the loss of the
    whole global batch with gradient through its own rows. The value is that loss, identical on every
    rank, and what is logged; the gradient reaching this rank's rows is multiplied by the number of
    ranks, because DDP averages. The result equals single-process training on the global batch, with
    no collective inside the backward pass (a gather with gradient would communicate there, concurrently
    with DDP's own gradient reduction).

    The temperature is excluded from weight decay, as in the CLIP recipe, when the optimizer is built
    from the mixin's ``parameter_groups`` (:meth:`no_weight_decay` lists it).

    Args:
        feature_dims: modality → feature width ``D``, to build the projections; ``None``: no projection
            (all modalities must have one width).
        projection_dim: width of the projections.
        init_temperature: initial temperature (0.07).
        max_scale: clamp of ``e^t`` (100).
        weight, start_epoch, end_epoch: see :class:`LossTerm`.

    Standalone: ``ContrastiveLoss()({"audio": v_a, "visual": v_v})`` with ``(N, D)`` vectors.
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

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.logit_scale]

    def embed(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        bad = {m: tuple(v.shape) for m, v in vectors.items() if v.ndim != 2}
        if bad:
            raise ModalityContractError(
                f"ContrastiveLoss takes one (N, D) vector per sample and modality, got shapes {bad}. Pool token "
                f"sequences first (inside a LightningModule the term pools them with self.pool_features)."
            )
        if self.projections:
            missing = [m for m in vectors if m not in self.projections]
            if missing:
                raise ModalityContractError(f"ContrastiveLoss has no projection for {missing}; pass feature_dims for them.")
            wrong = {m: (v.shape[-1], self.projections[m].in_features) for m, v in vectors.items()
                     if v.shape[-1] != self.projections[m].in_features}
            if wrong:
                raise ModalityContractError(
                    f"ContrastiveLoss: feature widths (got, feature_dims) differ for {wrong}; feature_dims gives the "
                    f"width D of each modality's features (the last dimension, after pooling tokens)."
                )
            return {m: self.projections[m](v) for m, v in vectors.items()}
        widths = {m: v.shape[-1] for m, v in vectors.items()}
        if len(set(widths.values())) != 1:
            raise ModalityContractError(
                f"ContrastiveLoss without projections needs equal feature widths, got {widths}; pass feature_dims."
            )
        return dict(vectors)

    def forward(self, vectors: dict[str, Tensor], present: Optional[dict[str, Tensor]] = None) -> Tensor:
        """The mean over modality pairs of the symmetric InfoNCE of the global batch; with ``present``
        (modality → ``(N,)`` bool), each pair over the samples that have both modalities (an absent
        modality's features are the fill: no positive, and no negative either), and the mean over the pairs
        that have such samples."""
        if len(vectors) < 2:
            raise ModalityContractError("ContrastiveLoss needs at least two modalities.")
        emb = self.embed(vectors)
        names = list(emb)
        n = emb[names[0]].shape[0]
        if n == 0:
            raise ModalityContractError("ContrastiveLoss got an empty batch.")
        scale = self.scale()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            # The exact global-batch loss without any collective in the backward pass (which would race with
            # DDP's gradient all-reduce): gather every rank's embeddings without gradient (counts first, so
            # ranks may hold different numbers of rows), put this rank's own rows (with gradient) in their
            # slot, and compute the loss over the whole global batch on every rank. DDP averages parameter
            # gradients over ranks, so the gradient reaching this rank's rows is multiplied by the world size;
            # the value is unchanged (e + (W-1)(e - e) is e), and the temperature, used identically on every
            # rank, gets the exact gradient from every rank.
            mask = torch.stack([present[m] if present is not None else torch.ones(n, dtype=torch.bool,
                                device=emb[m].device) for m in names], 1).to(emb[names[0]].dtype)
            local = torch.cat([*[emb[m] for m in names], mask], dim=1)  # one gather: every modality and the mask
            full = global_batch_rows(local)
            *columns, mask = full.split([*[emb[m].shape[1] for m in names], len(names)], dim=1)
            emb = dict(zip(names, columns))
            present = {m: mask[:, i].detach() > 0.5 for i, m in enumerate(names)}
        losses = []
        for a, b in itertools.combinations(names, 2):
            if present is None:
                losses.append(symmetric_info_nce(emb[a], emb[b], scale))
                continue
            both = present[a] & present[b]
            if bool(both.any()):  # one host sync per pair, only when the batch has absent modalities
                losses.append(symmetric_info_nce(emb[a][both], emb[b][both], scale))
        # every projection stays in the graph (a modality that shares no sample with another gets a zero
        # gradient, not none, in one process as under DDP)
        keep = 0.0 * (scale + sum(e.sum() for e in emb.values()))
        if not losses:  # no sample has two modalities: nothing to align
            return keep
        return torch.stack(losses).mean() + keep

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(record.vectors(detach=False), record.present), {"scale": self.scale().detach()}
