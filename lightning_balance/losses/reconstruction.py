"""Reconstruction auxiliary loss: each modality's input is reconstructed from its encoding, alone (a
per-modality autoencoder) or with the multimodal representation (MultiBench's MFM objective)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["ReconstructionLoss"]

Form = Literal["autoencoder", "mfm"]


class ReconstructionLoss(LossTerm):
    r"""Decoders reconstruct each modality's input from the features, with mean-squared error:

    .. math:: L = \sum_m w_m \, \mathrm{MSE}\big(\mathrm{dec}_m(u_m), x_m\big)

    ``form="autoencoder"`` (default): ``u_m = v_m``, the modality's own features; a per-modality
    autoencoder, whose gradient reaches only that modality's encoder.

    ``form="mfm"``: ``u_m = [v_m ; h]`` with ``h = [v_1 ; … ; v_M]`` the multimodal representation, after
    MultiBench's MFM objective (Tsai et al., "Learning Factorized Multimodal Representations", ICLR 2019;
    ``objective_functions/objectives_for_supervised_learning.py::MFM_objective`` decodes
    ``dec_m([ints_m(rep_m) ; fused])``). Each reconstruction also depends on the other modalities, so every
    encoder receives gradient from every modality's reconstruction. ``h`` is the concatenation of all
    modalities' vectors, in ``feature_dims`` order: the contract's fusion returns logits, not a
    representation, so the term cannot read the model's own fused representation; the concatenation is
    exactly what a concat head (``head=``) receives, i.e. MultiBench's ``Concat`` fusion output; and a
    decoder with a hidden layer learns its own mixing of it. Deviations: no "intermediate" network
    ``ints_m`` before the decoder (the decoder's first layer takes ``v_m``), and MSE instead of
    MultiBench's per-dataset losses (sigmoid cross-entropy on avMNIST).

    ``v_m`` is one vector per sample: the step's features pooled by the module's ``pool_features``
    (token sequences ``(N, T, D)`` averaged over the tokens), so ``feature_dims`` gives ``D``. Inputs of any
    shape are flattened: ``input_dims`` gives each input's number of elements per sample. An encoder
    whose modality must be reconstructed from its features cannot collapse to ignore that modality. The
    inputs come from the step record: call ``self.fuse(features, targets, inputs={m: x_m})``. A sample
    that lacks a modality (``fuse(..., present=...)``) is not reconstructed for it: its input is not data.

    Args:
        feature_dims: modality → feature width ``D`` (with ``"mfm"``: every modality of the model).
        input_dims: modality → flattened input width, for each modality to reconstruct.
        hidden: hidden width of each two-layer decoder (0: a linear decoder).
        modality_weights: modality → ``w_m`` (default 1 each).
        form: ``"autoencoder"`` or ``"mfm"``.
        weight, start_epoch, end_epoch: see :class:`LossTerm`.
    """

    name = "reconstruction"

    def __init__(self, feature_dims: dict[str, int], input_dims: dict[str, int], hidden: int = 256,
                 modality_weights: Optional[dict[str, float]] = None, form: Form = "autoencoder",
                 weight: float = 1.0, start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        if form not in ("autoencoder", "mfm"):
            raise ValueError(f"form must be 'autoencoder' (per-modality) or 'mfm' (MultiBench's MFM), got {form!r}.")
        if not input_dims:
            raise ValueError("input_dims must name at least one modality to reconstruct.")
        unknown = set(input_dims) - set(feature_dims)
        if unknown:
            raise ValueError(f"input_dims names modalities without a feature width in feature_dims: {sorted(unknown)}.")
        self.form = form
        self.feature_dims = dict(feature_dims)
        fused = sum(self.feature_dims.values()) if form == "mfm" else 0

        def decoder(d: int, out: int) -> nn.Module:
            if hidden <= 0:
                return nn.Linear(d, out)
            return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, out))

        self.decoders = nn.ModuleDict({m: decoder(feature_dims[m] + fused, input_dims[m]) for m in input_dims})
        self.modality_weights = {m: 1.0 for m in input_dims} if modality_weights is None else dict(modality_weights)
        unknown = set(self.modality_weights) - set(input_dims)
        if unknown:
            raise ValueError(f"modality_weights names modalities that are not reconstructed: {sorted(unknown)}.")

    def forward(self, vectors: dict[str, Tensor], inputs: dict[str, Tensor],
                present: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(L, {m: MSE_m})`` from ``(N, D)`` vectors and the inputs; with ``present`` (modality → ``(N,)``
        bool), a sample that lacks modality ``m`` adds 0 to ``MSE_m`` (an absent input is not a target), which
        stays a mean over the batch (DDP and accumulation then equal one process)."""
        bad = {m: tuple(v.shape) for m, v in vectors.items() if v.ndim != 2}
        if bad:
            raise ModalityContractError(
                f"ReconstructionLoss decodes one (N, D) vector per sample, got shapes {bad}. Pool token sequences "
                f"first (inside a LightningModule the term pools them with self.pool_features)."
            )
        needed = self.feature_dims if self.form == "mfm" else self.decoders
        missing = [m for m in needed if m not in vectors]
        if missing:
            raise ModalityContractError(f"ReconstructionLoss ({self.form}) needs the features of {missing}.")
        if self.form == "mfm":
            fused = torch.cat([vectors[m] for m in self.feature_dims], dim=-1)
        per = {}
        for m, dec in self.decoders.items():
            if m not in inputs:
                raise ModalityContractError(f"ReconstructionLoss needs the input of {m!r}.")
            x = inputs[m].reshape(inputs[m].shape[0], -1).float()
            u = vectors[m] if self.form == "autoencoder" else torch.cat([vectors[m], fused], dim=-1)
            mask = None if present is None else present.get(m)
            if mask is None:
                per[m] = F.mse_loss(dec(u).float(), x)
            else:
                err = (dec(u).float() - torch.where(mask[:, None], x, torch.zeros_like(x))).pow(2).mean(1)
                err = torch.where(mask, err, torch.zeros((), device=err.device))  # absent samples add 0
                per[m] = err.sum() / max(len(mask), 1)  # a batch mean
        total = torch.stack([self.modality_weights.get(m, 1.0) * v for m, v in per.items()]).sum()
        return total, per

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        if record.inputs is None:
            raise ModalityContractError(
                "ReconstructionLoss needs the raw inputs: call self.fuse(features, targets, inputs={modality: x})."
            )
        if self.form == "mfm" and set(self.feature_dims) != set(record.features):
            raise ModalityContractError(
                f"ReconstructionLoss(form='mfm') decodes from every modality's features: feature_dims names "
                f"{sorted(self.feature_dims)}, the model declares {sorted(record.features)}."
            )
        total, per = self.forward(record.vectors(detach=False), record.inputs, record.present)
        return total, {f"mse/{m}": v.detach() for m, v in per.items()}

    def extra_repr(self) -> str:
        return f"form={self.form!r}"
