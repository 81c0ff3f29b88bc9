"""Reconstruction auxiliary loss: each modality's encoding must reconstruct its input."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(LossTerm):
    r"""Per-modality decoders reconstruct each modality's input from its encoding (MultiBench's MFM
    objective, with mean-squared error):

    .. math:: L = \sum_m w_m \, \mathrm{MSE}(\mathrm{dec}_m(z_m), x_m)

    An encoder that its modality's reconstruction depends on cannot collapse to ignore that modality.
    The inputs come from the step record: call ``self.fuse(features, targets, inputs={m: x_m})``. Inputs
    of any shape are flattened.

    Args:
        feature_dims: modality → feature width.
        input_dims: modality → flattened input width.
        hidden: hidden width of each two-layer decoder (0: a linear decoder).
        modality_weights: modality → ``w_m`` (default 1 each).
        weight, start_epoch, end_epoch: see :class:`LossTerm`.
    """

    name = "reconstruction"

    def __init__(self, feature_dims: dict[str, int], input_dims: dict[str, int], hidden: int = 256,
                 modality_weights: Optional[dict[str, float]] = None, weight: float = 1.0,
                 start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        if set(feature_dims) != set(input_dims):
            raise ValueError(f"feature_dims {sorted(feature_dims)} and input_dims {sorted(input_dims)} must name the same modalities.")

        def decoder(d: int, out: int) -> nn.Module:
            if hidden <= 0:
                return nn.Linear(d, out)
            return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, out))

        self.decoders = nn.ModuleDict({m: decoder(feature_dims[m], input_dims[m]) for m in feature_dims})
        self.modality_weights = {m: 1.0 for m in feature_dims} if modality_weights is None else dict(modality_weights)
        unknown = set(self.modality_weights) - set(feature_dims)
        if unknown:
            raise ValueError(f"modality_weights names unknown modalities {sorted(unknown)}.")

    def forward(self, features: dict[str, Tensor], inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:  # type: ignore[override]
        per = {}
        for m, dec in self.decoders.items():
            if m not in inputs:
                raise ModalityContractError(f"ReconstructionLoss needs the input of {m!r}.")
            x = inputs[m].reshape(inputs[m].shape[0], -1).float()
            per[m] = F.mse_loss(dec(features[m].reshape(features[m].shape[0], -1)).float(), x)
        total = torch.stack([self.modality_weights.get(m, 1.0) * v for m, v in per.items()]).sum()
        return total, per

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        if record.inputs is None:
            raise ModalityContractError(
                "ReconstructionLoss needs the raw inputs: call self.fuse(features, targets, inputs={modality: x})."
            )
        total, per = self.forward(record.features, record.inputs)
        return total, {f"mse/{m}": v.detach() for m, v in per.items()}
