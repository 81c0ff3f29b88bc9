"""AMCo: adaptive masking of the dependent modality's share of the fused logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_balance._distributed import all_reduce_sum, broadcast_seed, shared_generator
from lightning_balance._errors import ModalityContractError
from lightning_balance.callbacks.base import ForwardPassMethod, is_number
from lightning_balance.functional.amco import amco_class_mask, amco_dependence_mass, amco_mask_logits, amco_mask_ratio
from lightning_balance.modality import MultimodalMixin

__all__ = ["AMCo"]


class AMCo(ForwardPassMethod):
    r"""AMCo, adaptive mask co-optimisation (Zhou et al., "Adaptive Mask Co-Optimization for Modal Dependence in
    Multimodal Learning", ICASSP; no official code was found: the recipe is BalanceBenchmark's ``AMCoTrainer``).

    The fused logits of a concat + linear head are the sum of the per-modality logits :math:`o_m` (the head split
    by modality, :math:`b/M` each). In every training batch, for each modality flagged *dependent*, a class mask
    :math:`\mu` removes part of :math:`o_m` from the fused logits:

    .. math::
        f' = f - \sum_{m:\,d_m} (1 - \mu) \odot o_m, \qquad
        p_t = \sin\Big(\frac\pi2 \frac{\min(\varepsilon, \ell_t)}{\varepsilon}\Big)

    with :math:`\lfloor p_t C \rfloor` zeros in :math:`\mu` (random positions, one mask per batch, from a stream
    identical on all ranks and checkpointed) and :math:`\ell_t` reset to 0 at each epoch and raised by
    ``epoch / 10`` after each batch (so nothing is masked in epoch 0, and from epoch 1 on the ratio reaches 1
    within a few batches). The flags come from the previous batch: one softmax over the concatenated unimodal
    logits, :math:`d_m = \operatorname{mean}_i \text{mass}_{m,i} > \sigma` (summed over the ranks under DDP: one
    all-reduce of ``M + 1`` numbers per ``fuse`` call); they reset at each epoch.

    The curriculum (``ℓ_t``, the mask stream) advances only on batches inside the method's window (the benchmark
    advances it on every batch; the same with epoch windows). With several ``fuse`` calls in one batch the last
    call's mass sets the flags, and every rank must make the same number of calls (each reduces across ranks).

    AMCo's objective adds each modality's cross-entropy on its (masked) unimodal logits: return
    ``self.add_unimodal_losses(loss)`` from ``training_step``, which uses the masked logits of the step (it warns
    once when the unimodal losses are missing).

    Only for fusions whose logits are the sum of per-modality logits (a concat + linear head,
    ``unimodal="split"``); other fusions are refused in ``setup`` (use :class:`OPM` or
    :class:`ModalityDropout`, which act on the features). BalanceBenchmark also passes the masked sum through an
    extra learnable ``C × C`` linear layer; that is an architecture change and is left out (add it to your head if
    you want it).

    Args:
        sigma: :math:`\sigma`, the dependence threshold on the mean softmax mass (official 0.5).
        eps: :math:`\varepsilon`, the curriculum length (official 0.3).
        seed: of the masks; ``None`` draws one on rank 0 and broadcasts it.
        modalities, start_epoch, end_epoch, start_step, end_step, epoch_length, log_metrics: see
            :class:`~lightning_balance.GradientBalancingCallback` (``modalities``: the ones that may be flagged).

    Logged: ``balance/amco/ratio`` (:math:`p_t` of the batch), ``balance/amco/dependent/<m>`` (the flags in force)
    and ``balance/amco/mass/<m>`` (the last call's mean mass).
    """

    method = "amco"

    def __init__(self, sigma: float = 0.5, eps: float = 0.3, seed: Optional[int] = None,
                 modalities: Optional[Sequence[str]] = None, start_epoch: int = 0, end_epoch: Optional[int] = None,
                 start_step: int = 0, end_step: Optional[int] = None, epoch_length: Optional[int] = None,
                 log_metrics: bool = True) -> None:
        super().__init__(modalities=modalities, start_epoch=start_epoch, end_epoch=end_epoch, start_step=start_step,
                         end_step=end_step, epoch_length=epoch_length, log_metrics=log_metrics)
        if not (is_number(sigma) and 0.0 < sigma < 1.0):
            raise ValueError(f"sigma must be in (0, 1), got {sigma!r}.")
        if not (is_number(eps) and eps > 0.0):
            raise ValueError(f"eps must be a number > 0, got {eps!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}.")
        self.sigma, self.eps, self.seed = float(sigma), float(eps), seed
        self.draws = 0  # masks drawn so far (checkpointed): the position in the stream
        self.progress = 0.0  # ℓ_t within the current epoch
        self._dependent: Optional[Tensor] = None  # (M,) bool flags for the next batch, on the device (no host sync)
        self.state_epoch: Optional[int] = None  # the epoch `progress` and `dependent` belong to
        self._mask: Optional[Tensor] = None
        self._ratio = 0.0
        self._now: Optional[Tensor] = None  # the flags in force in this batch
        self._draw = 0
        self._last_mass: Optional[Tensor] = None
        self._names: tuple[str, ...] = ()
        self._warned = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        spec = cast(MultimodalMixin, pl_module).modality_spec  # super().setup checked the contract
        if spec.unimodal != "split":
            raise ModalityContractError(
                f"AMCo masks a modality's share of the fused logits, which exists only when the fused logits are the "
                f"sum of per-modality logits: a concat + linear head, configure_modalities(..., head=...) with "
                f"unimodal='split'. {type(pl_module).__name__} declares unimodal={spec.unimodal!r}. For other fusions "
                f"use OPM or ModalityDropout, which act on the features."
            )
        self._names = tuple(cast(MultimodalMixin, pl_module).modalities)
        self._eligible = torch.tensor([m in self.active_modalities for m in self._names])  # may be flagged
        if self.seed is None:
            self.seed = broadcast_seed(trainer.strategy)

    def begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self.state_epoch != epoch:  # a new epoch (not a resume inside this one): the curriculum restarts
            self.state_epoch = epoch
            self.progress = 0.0
            self._dependent = None  # no modality flagged

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._mask = None
        if not self._enabled:
            return
        self._ratio = amco_mask_ratio(self.progress, self.eps)
        self._draw = self.draws
        self.draws += 1
        self.progress += self.method_epoch(trainer) / 10
        self._now = self._dependent

    # ------------------------------------------------------------------ the forward pass
    def tap_logits(self, module: MultimodalMixin, features: dict[str, Tensor], targets: Optional[Tensor],
                   logits: Tensor, extras: dict[str, Any]) -> Tensor:
        if not self._enabled:
            return logits
        names = module.modalities
        if self._mask is None:  # the batch's mask, drawn at its first fuse call (the class count from the logits)
            generator = shared_generator(self.seed or 0, self._draw, torch.device("cpu"))
            self._mask = amco_class_mask(logits.shape[-1], self._ratio, generator).to(logits.device)
        unimodal = module.compute_unimodal_logits(features)
        stacked = torch.stack([unimodal[m] for m in names])
        flags = (self._now.to(logits.device) if self._now is not None
                 else torch.zeros(len(names), dtype=torch.bool, device=logits.device))
        fused, masked = amco_mask_logits(logits, stacked, flags, self._mask)
        extras["unimodal_logits"] = {m: masked[i] for i, m in enumerate(names)}  # add_unimodal_losses uses them
        with torch.no_grad():
            flat = torch.cat([amco_dependence_mass(masked), torch.tensor([float(logits.shape[0])], device=logits.device)])
            trainer = getattr(module, "_trainer", None)
            if trainer is not None:
                flat = all_reduce_sum(flat, trainer.strategy)
            mean = flat[:-1] / flat[-1].clamp_min(1.0)
        self._last_mass = mean
        self._dependent = (mean > self.sigma) & self._eligible.to(logits.device)  # the next batch's flags
        return fused

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        record = cast(MultimodalMixin, pl_module).balance_record
        if (self._enabled and not self._warned and record is not None and record.training
                and "objective" not in record.extras):
            from lightning.pytorch.utilities import rank_zero_warn

            self._warned = True
            rank_zero_warn("AMCo's objective adds each modality's cross-entropy on its masked unimodal logits: return "
                           "self.add_unimodal_losses(loss) from training_step (it uses the masked logits).",
                           category=UserWarning)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log_metrics or not self._enabled or self._last_mass is None:
            return
        names = cast(MultimodalMixin, pl_module).modalities
        metrics = {"balance/amco/ratio": torch.tensor(self._ratio)}
        now = self._now if self._now is not None else torch.zeros(len(names), dtype=torch.bool)
        metrics.update({f"balance/amco/dependent/{m}": now[names.index(m)].float() for m in self.active_modalities})
        metrics.update({f"balance/amco/mass/{m}": self._last_mass[names.index(m)] for m in self.active_modalities})
        self.log_step(trainer, pl_module, metrics)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        dependent = [] if self._dependent is None else [bool(v) for v in self._dependent.tolist()]
        return {**super().state_dict(), "seed": self.seed, "draws": self.draws, "progress": self.progress,
                "dependent": dependent, "state_epoch": self.state_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self.draws = int(state_dict.get("draws", 0))
        self.progress = float(state_dict.get("progress", 0.0))
        dependent = list(state_dict.get("dependent", []))
        self._dependent = torch.tensor(dependent, dtype=torch.bool) if dependent else None
        self.state_epoch = state_dict.get("state_epoch")

    @property
    def dependent(self) -> dict[str, bool]:
        """The flags for the next batch, by modality (a host copy)."""
        if self._dependent is None:
            return {m: False for m in self._names}
        return dict(zip(self._names, (bool(v) for v in self._dependent.tolist())))
