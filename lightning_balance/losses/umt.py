"""UMT (uni-modal teacher) and UME (uni-modal ensemble): Du et al., "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["UMTLoss", "UnimodalEnsemble", "choose_ume_or_umt", "fit_unimodal_teachers"]


class UMTLoss(LossTerm):
    r"""Uni-Modal Teacher: distil each encoder's features toward a frozen, separately trained unimodal teacher.

    .. math:: L = \sum_m \mathrm{MSE}\big(z_m, \phi^T_m(x_m)\big)

    (mean over batch and feature dimensions; the paper distils the encoder output that enters the fusion,
    BalanceBenchmark uses λ = 10). Teachers see the same inputs as the students: pass them with
    ``self.fuse(features, targets, inputs={m: x_m})``. Teachers are frozen (no gradient, so outside DDP's
    reduction), always in eval mode (their BatchNorm statistics never move) and run under ``no_grad``.
    A sample that lacks a modality (``fuse(..., present=...)``) is not distilled for it.

    Args:
        teachers: modality → teacher encoder (e.g. from :func:`fit_unimodal_teachers`, or your own module).
        checkpoints: optional modality → path of a ``state_dict`` (or a Lightning checkpoint whose
            ``state_dict`` entries start with ``state_prefix``) loaded into that teacher.
        state_prefix: prefix of the teacher's keys inside a Lightning checkpoint (e.g. ``"encoder."``).
        weight: λ (BalanceBenchmark 10).
        start_epoch, end_epoch: see :class:`LossTerm`.
    """

    name = "umt"

    def __init__(self, teachers: Mapping[str, nn.Module], checkpoints: Optional[Mapping[str, str]] = None,
                 state_prefix: str = "", weight: float = 10.0, start_epoch: int = 0,
                 end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        if not teachers:
            raise ValueError("UMTLoss needs at least one teacher: teachers={modality: encoder}.")
        self.teachers = nn.ModuleDict(dict(teachers))
        for m, path in (checkpoints or {}).items():
            if m not in self.teachers:
                raise ValueError(f"checkpoint given for {m!r}, which has no teacher.")
            state = torch.load(path, map_location="cpu", weights_only=False)
            state = state.get("state_dict", state)
            if state_prefix:
                state = {k[len(state_prefix):]: v for k, v in state.items() if k.startswith(state_prefix)}
            self.teachers[m].load_state_dict(state)
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.teachers.eval()

    def train(self, mode: bool = True) -> UMTLoss:
        super().train(mode)
        self.teachers.eval()  # teachers stay in eval mode
        return self

    def forward(self, features: Mapping[str, Tensor], inputs: Mapping[str, Tensor],
                present: Optional[Mapping[str, Tensor]] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(L, {m: MSE_m})``; with ``present`` (modality → ``(N,)`` bool) a sample that lacks the modality adds
        0 (the teacher of an absent input has nothing to teach) to a mean over the batch."""
        per = {}
        for m, teacher in self.teachers.items():
            if m not in features or m not in inputs:
                raise ModalityContractError(f"UMTLoss needs the features and the input of {m!r}.")
            with torch.no_grad():
                target = teacher(inputs[m])
            z = features[m]
            if target.shape != z.shape:
                raise ModalityContractError(
                    f"UMTLoss: the teacher of {m!r} outputs features of shape {tuple(target.shape)}, the student's "
                    f"encoder {tuple(z.shape)}; teacher and student encoders must output the same width."
                )
            mask = None if present is None else present.get(m)
            if mask is None:
                per[m] = F.mse_loss(z.float(), target.float())
            else:
                keep = mask.reshape(-1, *([1] * (z.ndim - 1)))
                err = torch.where(keep, z.float() - target.float(), torch.zeros((), device=z.device)).pow(2)
                per[m] = err.reshape(len(z), -1).mean(1).sum() / max(len(z), 1)  # batch mean, absent rows 0
        return torch.stack(list(per.values())).sum(), per

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        if record.inputs is None:
            raise ModalityContractError(
                "UMTLoss needs the raw inputs for the teachers: call self.fuse(features, targets, inputs={modality: x})."
            )
        total, per = self.forward(record.features, record.inputs, record.present)
        return total, {f"mse/{m}": v.detach() for m, v in per.items()}


class UnimodalEnsemble(nn.Module):
    """UME: predict with separately trained unimodal models and combine their predictions.

    Args:
        models: modality → a module mapping that modality's input to logits.
        combine: ``"mean"`` (average of the probabilities; the algorithm card recalls this as the paper's
            ensemble, which could not be checked in the paper) or ``"product"`` (sum of
            log-probabilities).

    ``forward(inputs, present=None)`` takes ``{modality: x}`` and returns log-probabilities ``(N, C)``; with
    ``present`` (``{modality: (N,) bool}``) each sample combines the models of the modalities it has.
    """

    def __init__(self, models: Mapping[str, nn.Module], combine: Literal["mean", "product"] = "mean") -> None:
        super().__init__()
        if combine not in ("mean", "product"):
            raise ValueError(f"combine must be 'mean' or 'product', got {combine!r}.")
        if not models:
            raise ValueError("UnimodalEnsemble needs at least one model.")
        self.models = nn.ModuleDict(dict(models))
        self.combine = combine

    def forward(self, inputs: Mapping[str, Tensor], present: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        log_p = torch.stack([F.log_softmax(self.models[m](inputs[m]).float(), -1) for m in self.models])
        if present is not None:  # (K, N, 1): an absent modality's model has no say
            have = torch.stack([present[m] for m in self.models]).unsqueeze(-1)
            if self.combine == "product":
                return torch.log_softmax(torch.where(have, log_p, torch.zeros_like(log_p)).sum(0), -1)
            masked = torch.where(have, log_p, torch.full_like(log_p, -math.inf))
            return torch.logsumexp(masked, 0) - torch.log(have.sum(0).clamp_min(1).float())
        if self.combine == "product":
            return torch.log_softmax(log_p.sum(0), -1)
        return torch.logsumexp(log_p, 0) - torch.log(torch.tensor(float(len(self.models))))


def choose_ume_or_umt(ensemble_val_accuracy: float, joint_val_accuracy: float) -> str:
    """The paper's rule, on **validation** data: if the unimodal ensemble is at least as good as naive
    joint training, uni-modal features dominate and UME is the choice; otherwise paired (cross-modal)
    features matter and UMT is."""
    return "UME" if ensemble_val_accuracy >= joint_val_accuracy else "UMT"


class _UnimodalModel(pl.LightningModule):
    """One encoder and a linear head trained on its own cross-entropy (also the base of ``distill_encoder``'s
    student). ``pool(modality, z)``: one vector per sample (default: the mean of token sequences)."""

    def __init__(self, encoder: nn.Module, width: int, num_classes: int, modality: str, lr: float, momentum: float,
                 ignore_index: int = -100, index: int = 0, pool: Optional[Any] = None) -> None:
        super().__init__()
        self.encoder, self.head, self.modality = encoder, nn.Linear(width, num_classes), modality
        self.lr, self.momentum, self.ignore_index, self.index = lr, momentum, ignore_index, index
        self.pool = pool

    def features(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        if self.pool is not None:
            return self.pool(self.modality, z)
        return z.mean(dim=tuple(range(1, z.ndim - 1))) if z.ndim > 2 else z  # the contract's default pooling

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def has(self, batch: Any, modality: str, index: int, n: int, device: torch.device) -> Tensor:
        """``(N,)`` bool: the samples of ``batch`` that have ``modality`` (all without a ``"present"`` mask)."""
        present = batch.get("present") if isinstance(batch, Mapping) else None
        if present is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        return (present[modality] if isinstance(present, Mapping) else present[:, index]).bool()

    def own_targets(self, batch: Any) -> Tensor:
        """The targets, ``ignore_index`` where the sample lacks this modality (it teaches nothing about it)."""
        targets = batch["target"]
        have = self.has(batch, self.modality, self.index, len(targets), targets.device)
        return torch.where(have, targets, torch.full_like(targets, self.ignore_index))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[self.modality]), self.own_targets(batch), ignore_index=self.ignore_index)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def fit_unimodal_teachers(module: MultimodalMixin, datamodule: pl.LightningDataModule, num_classes: int,
                          max_epochs: int = 40, lr: float = 0.02, momentum: float = 0.9, *, inputs: Any = None,
                          target_key: Any = "target", present_key: Optional[str] = "present",
                          **trainer_kwargs: Any) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Train one unimodal model per modality from the module's own encoders (fresh copies, parameters
    re-initialised) and a linear head, with SGD on the cross-entropy for ``max_epochs`` (the last epoch kept):
    :func:`lightning_balance.fit_alone` with ``select="last"`` (use that one to keep the best validation epoch).
    Where the batches keep each modality, the targets and the mask: ``inputs`` (``None``: ``batch[m]``; a mapping
    ``{modality: key}``; a function ``(batch, modality) -> input``), ``target_key``, ``present_key``. Samples that
    lack the modality or carry the module's ``ignore_index`` are left out. Token features ``(N, T, D)`` are
    pooled as the module pools them before the head.

    Returns ``(teachers, models)``: the trained encoders (for :class:`UMTLoss`) and the full unimodal
    models (encoder + head, for :class:`UnimodalEnsemble`).
    """
    from lightning_balance.references import fit_alone

    refs = fit_alone(module, datamodule, inputs=inputs, target_key=target_key, present_key=present_key,
                     num_classes=num_classes, max_epochs=max_epochs, lr=lr, momentum=momentum, select="last",
                     seed=None, **trainer_kwargs)
    return refs.encoders, dict(refs.models)
