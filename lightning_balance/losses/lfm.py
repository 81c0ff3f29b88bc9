"""LFM as a loss term (Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification via Dynamically Learning
Modality Gap", NeurIPS 2024)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_balance.functional.lfm import (
    Divergence,
    lfm_alignment,
    lfm_alpha_step,
    lfm_fitted_alpha,
    lfm_hypergradient,
)
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["LFMLoss"]

Schedule = Literal["fitted", "learnable"]


class LFMLoss(LossTerm):
    r"""LFM: the supervised loss mixed with a cross-modal matching loss whose weight moves from alignment to
    classification over training (Yang et al., NeurIPS 2024; official code ``njustkmg/NeurIPS24-LFM``).

    .. math::
        L = 2\,\alpha_{cls}(t)\, L_{task} + 2\,\alpha_{align}(t)\, D, \qquad
        D = \operatorname{mean}_{pairs}\, \operatorname{mean}_i\, \tfrac12\big(\mathrm{KL}(m_i\|p_{a,i}) +
            \mathrm{KL}(m_i\|p_{v,i})\big), \quad m = \tfrac12(p_a + p_v)

    with :math:`p_m = \sigma(o_m)` from the unimodal logits (``compute_unimodal_logits``: the split concat head,
    or the declared unimodal heads; attached, so ``D`` trains the encoders and the head) and ``L_task`` your loss
    (the official one: cross-entropy of the fused logits). The term rescales your loss by ``2 α_cls(t)`` (set
    ``scale_task=False`` to keep it at 1 and add ``(α_align / α_cls) · D`` instead: the same relative weight
    without the factor, which for SGD is a learning-rate schedule) and returns ``2 α_align(t) · D``.

    Schedules (``t`` = epoch):

    * ``"fitted"`` (the official default script ``Crema_epoch.py``): ``α_cls(t)`` the official degree-5
      polynomial, fitted on 200 epochs (0.205 at epoch 0, 0.40 at 40, 1.0 near 180). ``horizon=H`` stretches
      those 200 epochs over a run of ``H`` epochs
      (:func:`~lightning_balance.functional.lfm_fitted_alpha`).
    * ``"learnable"`` (``Crema_epoch_learnable.py``): from ``α_align = 0.95``, at the start of every epoch (the
      first training step of the epoch), on a fixed held-out batch (the first ``holdout_samples`` samples of
      the datamodule's ``holdout_dataloader()``, encoded by the module's ``encode_batch``; official: 8 of 16
      training samples held out):
      ``α_align ← clip_{[0.05, 0.95]}(α_align − η_α h)``, ``h`` the mean over the entries of one parameter
      tensor of the Hessian-vector product ``∇²L_tot · ∇L_cls`` (``L_tot = α_cls L_cls + α_align D``, ``L_cls``
      the cross-entropy of the fused logits), ``η_α = lr_alpha`` halved at every 20th epoch
      (:func:`~lightning_balance.functional.lfm_hypergradient`). The official code takes the first tensor of
      ``model.parameters()``, its audio encoder's first weight; here the first parameter of the first declared
      modality's encoder, or the one named by ``hyper_parameter``. ``α`` and ``η_α`` are the term's extra state: they travel in
      the model's checkpoint (a run resumed mid-epoch continues with them) and under DDP every rank takes rank
      0's value.

    Absent modalities (``fuse(..., present=...)``): a pair of modalities is matched on the samples that have both
    (summed, divided by the batch size: a pair present in 30% of the samples weighs 30%).
    For ``M > 2``, ``D`` is the mean over the modality pairs.

    Args:
        schedule: ``"fitted"`` (official default) or ``"learnable"``.
        horizon: ``"fitted"`` only: ``None`` (official: the polynomial at the epoch index, epochs past 199 use
            199) or the run length ``H`` over which to stretch the fitted 200 epochs.
        divergence: ``"official"`` (``½(KL(m‖p) + KL(m‖q))``, what the official ``Alignment`` computes) or
            ``"js"`` (the textbook Jensen-Shannon divergence ``½(KL(p‖m) + KL(q‖m))``).
        scale_task: multiply your loss by ``2 α_cls(t)`` (official); ``False``: keep it and add
            ``(α_align/α_cls) D``.
        alpha_align_init, lr_alpha, halve_every, holdout_samples, hyper_parameter: the learnable schedule
            (official 0.95, 1e-4, 20, 8, the first parameter).
        weight, start_epoch, end_epoch: see :class:`LossTerm` (outside its epochs your loss is not rescaled).

    Standalone: ``LFMLoss()(unimodal_logits)`` with a list of ``(N, C)`` tensors returns ``D``.
    """

    name = "lfm"

    def __init__(self, schedule: Schedule = "fitted", horizon: Optional[int] = None,
                 divergence: Divergence = "official", scale_task: bool = True, alpha_align_init: float = 0.95,
                 lr_alpha: float = 1e-4, halve_every: int = 20, holdout_samples: int = 8,
                 hyper_parameter: Optional[str] = None, weight: float = 1.0, start_epoch: int = 0,
                 end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        if schedule not in ("fitted", "learnable"):
            raise ValueError(f"schedule must be 'fitted' (official default) or 'learnable', got {schedule!r}.")
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0):
            raise ValueError(f"horizon must be None or an int > 0 (the run's epochs), got {horizon!r}.")
        if divergence not in ("official", "js"):
            raise ValueError(f"divergence must be 'official' or 'js', got {divergence!r}.")
        if not isinstance(scale_task, bool):
            raise ValueError(f"scale_task must be True or False, got {scale_task!r}.")
        if not (isinstance(alpha_align_init, (int, float)) and 0.05 <= alpha_align_init <= 0.95):
            raise ValueError(f"alpha_align_init must be in [0.05, 0.95] (the official clip), got {alpha_align_init!r}.")
        if not (isinstance(lr_alpha, (int, float)) and lr_alpha >= 0):
            raise ValueError(f"lr_alpha must be a number >= 0, got {lr_alpha!r}.")
        if isinstance(halve_every, bool) or not isinstance(halve_every, int) or halve_every < 0:
            raise ValueError(f"halve_every must be an int >= 0 (0: never), got {halve_every!r}.")
        if isinstance(holdout_samples, bool) or not isinstance(holdout_samples, int) or holdout_samples <= 0:
            raise ValueError(f"holdout_samples must be an int > 0, got {holdout_samples!r}.")
        self.schedule, self.horizon, self.divergence, self.scale_task = schedule, horizon, divergence, scale_task
        self.lr_alpha_init, self.halve_every, self.holdout_samples = float(lr_alpha), halve_every, holdout_samples
        self.hyper_parameter = hyper_parameter
        # the learnable schedule's state: [α_cls, α_align, η_α, epoch of the last update (-1: none)], Python floats
        # in the module's extra state (checkpointed with the model; no float64 buffer for a dtype cast to round)
        self._alpha = [1.0 - float(alpha_align_init), float(alpha_align_init), float(lr_alpha), -1.0]
        self._holdout: Any = None  # the fixed held-out batch, on the device (read once per fit)
        self.last_hypergradient: Optional[float] = None

    # ------------------------------------------------------------------ standalone
    def forward(self, unimodal_logits: Any, present: Optional[Tensor] = None) -> Tensor:
        """``D`` on a list (or mapping) of ``(N, C)`` unimodal logits; ``present``: optional ``(N, M)`` bool."""
        logits = list(unimodal_logits.values()) if isinstance(unimodal_logits, dict) else list(unimodal_logits)
        return lfm_alignment(logits, present, self.divergence)

    # ------------------------------------------------------------------ the schedule
    def alphas(self, epoch: int) -> tuple[float, float]:
        """``(α_cls, α_align)`` in force at ``epoch`` (the learnable one: the last update's)."""
        if self.schedule == "fitted":
            return lfm_fitted_alpha(epoch, self.horizon)
        state = self._state()
        return state[0], state[1]

    def _state(self) -> list[float]:
        return self._alpha

    @property
    def alpha_state(self) -> Tensor:
        """``[α_cls, α_align, η_α, epoch of the last update]`` as a float64 tensor (a copy)."""
        return torch.tensor(self._alpha, dtype=torch.float64)

    def get_extra_state(self) -> dict[str, Any]:
        return {"alpha": list(self._alpha)}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "alpha" in state:
            self._alpha = [float(v) for v in state["alpha"]]

    def task_loss_weight(self, module: MultimodalMixin, epoch: int) -> Optional[float]:
        """``2 α_cls(t)``, the factor of the user's loss (``None`` with ``scale_task=False``)."""
        return 2.0 * self.alphas(epoch)[0] if self.scale_task else None

    def _hyper_param_index(self, module: MultimodalMixin, params: list[torch.nn.Parameter]) -> int:
        if self.hyper_parameter is None:
            first = module.modality_parameters(module.modalities[0])
            target = next((p for p in first if p.requires_grad), None)
            if target is None:
                raise ModalityContractError(
                    f"LFMLoss(schedule='learnable') takes its hyper-gradient from the first parameter of the "
                    f"{module.modalities[0]!r} encoder, which has no trainable parameter: name one with "
                    f"hyper_parameter='<name in named_parameters()>'."
                )
        else:
            named = dict(module.named_parameters())
            if self.hyper_parameter not in named:
                raise ModalityContractError(
                    f"LFMLoss: hyper_parameter={self.hyper_parameter!r} is not a parameter of "
                    f"{type(module).__name__}; some of its names: {sorted(named)[:6]}."
                )
            target = named[self.hyper_parameter]
        for i, p in enumerate(params):
            if p is target:
                return i
        raise ModalityContractError(f"LFMLoss: the hyper-gradient parameter {self.hyper_parameter!r} is frozen "
                                    f"(requires_grad=False); name a trainable one.")

    def _holdout_batch(self, module: MultimodalMixin) -> Any:
        if self._holdout is not None:
            return self._holdout
        trainer = module._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        loader_fn = getattr(datamodule, "holdout_dataloader", None)
        if loader_fn is None:
            raise ModalityContractError(
                "LFMLoss(schedule='learnable') learns its weights on held-out training data, as the official code: "
                "use a datamodule with holdout_dataloader() (lightning_balance's datamodules: holdout_fraction=0.1), "
                "or schedule='fitted'."
            )
        batch = next(iter(loader_fn()), None)
        if batch is None:
            raise ModalityContractError("LFMLoss: holdout_dataloader() is empty; it needs at least one batch.")
        batch = _first_rows(batch, self.holdout_samples)
        assert trainer is not None  # its datamodule gave the loader
        self._holdout = trainer.strategy.batch_to_device(batch, trainer.strategy.root_device)
        return self._holdout

    def update_alpha(self, module: MultimodalMixin, epoch: int) -> None:
        """The learnable schedule's once-per-epoch step on the held-out batch (official ``getAlpha_Learnable``),
        in eval mode (no dropout noise, no batch-norm statistics update), float32, outside autocast."""
        batch = self._holdout_batch(module)
        params = [p for p in module.parameters() if p.requires_grad]
        index = self._hyper_param_index(module, params)
        modes = {m: m.training for m in module.modules()}
        module.eval()
        alpha_cls, alpha_align, lr_alpha, _ = self._state()
        try:
            device_type = params[index].device.type
            with torch.enable_grad(), torch.autocast(device_type, enabled=False):
                features, targets, present = module.encoded_batch(batch)
                if targets.shape[0] < self.holdout_samples:
                    raise ModalityContractError(
                        f"LFMLoss: the first batch of holdout_dataloader() has {targets.shape[0]} samples, fewer than "
                        f"holdout_samples={self.holdout_samples}: use a larger held-out batch size or a smaller "
                        f"holdout_samples."
                    )
                features = {m: z.float() for m, z in features.items()}
                fused = module.fuse_subset(features, module.modalities, present=present)
                unimodal = module.compute_unimodal_logits(features, present=present)
                ignore = module.modality_spec.ignore_index
                cls_loss = F.cross_entropy(fused.float(), targets, ignore_index=ignore)
                matrix = None if present is None else torch.stack([present[m] for m in module.modalities], 1)
                align = lfm_alignment([unimodal[m] for m in module.modalities], matrix, self.divergence)
                total = alpha_cls * cls_loss + alpha_align * align
                h = float(lfm_hypergradient(total, cls_loss, params, index))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not math.isfinite(h):  # the official clip would turn a NaN into 0.95: keep the weights instead
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"LFMLoss: the hyper-gradient of epoch {epoch} is not finite ({h}); the weights are kept "
                           f"(alpha_align = {alpha_align:.4g}). Check the held-out batch (labelled samples?).",
                           category=UserWarning)
            h = 0.0
        alpha_cls, alpha_align, lr_alpha = lfm_alpha_step(alpha_align, lr_alpha, h, epoch,
                                                          halve_every=self.halve_every)
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank takes rank 0's step
            alpha_cls, alpha_align, lr_alpha, h = trainer.strategy.broadcast((alpha_cls, alpha_align, lr_alpha, h), src=0)
        self.last_hypergradient = h
        self._alpha = [float(alpha_cls), float(alpha_align), float(lr_alpha), float(epoch)]

    # ------------------------------------------------------------------ the term
    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        names = module.modalities
        if len(names) < 2:
            raise ModalityContractError("LFMLoss matches modalities: it needs at least two.")
        trainer = module._trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        if (self.schedule == "learnable" and record.training and torch.is_grad_enabled()
                and self._state()[3] < epoch):
            self.update_alpha(module, epoch)
        alpha_cls, alpha_align = self.alphas(epoch)
        with record.autocast():
            unimodal = module.compute_unimodal_logits(record.features, present=record.present)
        matrix = None if record.present is None else torch.stack([record.present[m] for m in names], 1)
        divergence = lfm_alignment([unimodal[m] for m in names], matrix, self.divergence)
        factor = 2.0 * alpha_align if self.scale_task else alpha_align / max(alpha_cls, 1e-12)
        metrics = {"divergence": divergence.detach(), "alpha_cls": torch.tensor(alpha_cls),
                   "alpha_align": torch.tensor(alpha_align)}
        if self.last_hypergradient is not None:
            metrics["hypergradient"] = torch.tensor(self.last_hypergradient)
        return factor * divergence, metrics

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule!r}, horizon={self.horizon}, divergence={self.divergence!r}, "
                f"scale_task={self.scale_task}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._holdout = None  # a copy (deepcopy, ddp_spawn) reads its own held-out batch

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        old = state_dict.pop(prefix + "alpha_state", None)  # checkpoints that kept the state in a buffer
        if old is not None:
            self._alpha = [float(v) for v in old.tolist()]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _first_rows(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (a mapping, sequence or tensor of per-sample rows)."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _first_rows(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first_rows(v, n) for v in batch)
    return batch
