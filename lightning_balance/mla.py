"""MLA (Zhang, Yoon, Bansal, Yao, CVPR 2024): alternating unimodal adaptation through a shared head.

MLA replaces joint training: each batch takes one optimizer step **per modality**, each with that modality's loss
through a head shared by all modalities, so no modality can suppress another through a joint loss; the shared
head's weight gradient is projected (orthogonal weight modification) so that it does not forget what the previous
modalities taught it; and at test time the modalities' predictions are fused with weights from their entropy.

It is a fusion (the shared head and the test-time fusion) with a training procedure, not a callback: the model
declares ``MLAFusion`` as its fusion and, with manual optimization, returns ``fusion.training_step(...)``.
The math is in :mod:`lightning_balance.functional.mla`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_balance._distributed import mean_gradients
from lightning_balance._errors import ModalityContractError
from lightning_balance._manual import (
    check_manual,
    explained_backward,
    no_sync,
    pool,
    present_only,
    step_optimizer,
    sync_buffers,
)
from lightning_balance.functional.mla import (
    mla_alpha,
    mla_entropy_weights,
    mla_fuse_logits,
    mla_project_gradient,
    mla_update_projector,
)

__all__ = ["MLAFusion"]


class MLAFusion(nn.Module):
    """The shared head of MLA, its test-time fusion, and its alternating training step.

    Zhang, Yoon, Bansal, Yao. *Multimodal Representation Learning by Alternating Unimodal Adaptation.* CVPR 2024
    (official code: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, ``main.py``,
    ``utils/utils.py``).

    Training (:meth:`training_step`), per batch, for each modality ``m`` in declared order, with ``W, b`` the shared
    head and ``z_m`` the modality's features (all computed once, before the first step)::

        L_m = CE(W z_m + b, y) → backward → ∇W ← ∇W Pᵀ → optimizer step → zero grad
        P ← (P − q qᵀ / (α_t + h̄_mᵀ q)) / ‖·‖_F,   q = P h̄_m,   α_t = 0.1^(1 + batch_idx / num_batches)

    with ``h̄_m`` the batch mean of ``z_m`` and ``P_0 = I``; the very first update of training is not projected
    (official). Inference (``forward``, what the contract's ``fuse`` calls)::

        o = Σ_m λ_m (W z_m + b),   λ_m = exp(max_k e_k − e_m) / Σ_j exp(max_k e_k − e_j),   e_m = H(softmax(o_m))

    per sample (``weights="entropy"``, the paper's; the official code computes one entropy per batch, over the
    batch dimension), or fixed weights, one per modality in declared order (``weights=(0.5, 0.5)``, the official
    default without ``--dynamic``; ``(0.35, 0.25, 0.40)`` for audio, visual, text), renormalised over the
    modalities a sample has.

    Args:
        head: the shared head, an ``nn.Linear(d, num_classes)`` (every encoder must output width ``d``).
        weights: ``"entropy"`` or fixed weights, one per modality in declared order.
        projection: project the head's weight gradient (the paper's gradient modification); ``False`` trains the
            head plainly (the released code, whose projection never runs).

    Use::

        self.automatic_optimization = False
        self.fusion = MLAFusion(nn.Linear(d, num_classes))
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)

        def training_step(self, batch, batch_idx):
            features = {"audio": self.audio_encoder(batch["audio"]), "visual": self.visual_encoder(batch["visual"])}
            return self.fusion.training_step(self, features, batch["target"], present=batch.get("present"))

    The projector ``P`` (``d × d``, float64) and the update count are saved with the module (its extra state), so a
    run resumed inside an epoch continues exactly.
    """

    def __init__(self, head: nn.Module, weights: Union[Literal["entropy"], Sequence[float]] = "entropy",
                 projection: bool = True) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"MLAFusion's shared head must be an nn.Linear(d, num_classes) (its weight gradient is "
                             f"projected), got {type(head).__name__}.")
        fixed = not isinstance(weights, str)
        if not (weights == "entropy" or (isinstance(weights, Sequence) and not isinstance(weights, str)
                                         and len(weights) >= 2
                                         and all(isinstance(v, (int, float)) and v >= 0 for v in weights)
                                         and sum(weights) > 0)):
            raise ValueError(f"weights must be 'entropy' or one weight >= 0 per modality in declared order (e.g. "
                             f"(0.5, 0.5)), got {weights!r}.")
        self.head = head
        self.weights: Union[str, tuple[float, ...]] = "entropy" if not fixed else tuple(float(v) for v in weights)
        self.projection = bool(projection)
        self.projector = torch.eye(head.in_features, dtype=torch.float64)  # P (extra state, not a buffer)
        self.updates = 0  # optimizer steps taken so far (the first is not projected)

    # ------------------------------------------------------------------ inference: the contract's fusion
    def unimodal_logits(self, *features: Tensor, present: Optional[Tensor] = None) -> Tensor:
        """``(M, N, C)``: the shared head on each modality's (pooled) features (an absent sample's features count
        as zeros, whatever stands there)."""
        return torch.stack([self.head(present_only(pool(z), None if present is None else present[:, k]))
                            for k, z in enumerate(features)])

    def forward(self, *features: Tensor, present: Optional[Tensor] = None) -> Tensor:
        logits = self.unimodal_logits(*features, present=present)
        if self.weights == "entropy":
            lam = mla_entropy_weights(logits, present)
        else:
            if len(self.weights) != len(features):
                raise ValueError(f"MLAFusion has {len(self.weights)} fixed weights for {len(features)} modalities.")
            lam = torch.tensor(self.weights, dtype=torch.float32, device=logits.device).expand(logits.shape[1], -1)
            if present is not None:
                lam = lam * present.to(lam.dtype)
            lam = lam / lam.sum(1, keepdim=True).clamp_min(1e-12)
        fused = mla_fuse_logits(logits, lam)
        if present is not None:  # a sample with no modality left: the head's bias (finite, as the contract asks)
            empty = ~present.bool().any(1)
            bias = self.head.bias if self.head.bias is not None else torch.zeros_like(fused[0])
            fused = torch.where(empty[:, None], bias.to(fused.dtype).expand_as(fused), fused)
        return fused

    # ------------------------------------------------------------------ training
    def training_step(self, module: Any, features: Mapping[str, Tensor], targets: Tensor,
                      present: Any = None) -> Tensor:
        """One optimizer step per modality (declared order) with that modality's cross-entropy through the shared
        head; returns the detached mean of the modalities' losses (for logging).

        Needs manual optimization (``self.automatic_optimization = False``) and one optimizer. The loss of modality
        ``m`` is the mean over the labelled samples of the global batch that have ``m``; under DDP the gradients and
        the feature mean travel in one all-reduce per modality step (the DDP hooks are bypassed), so the replicas
        stay identical. A modality no sample of the global batch has takes no step.
        """
        optimizer = check_manual(module, self, "MLAFusion")
        trainer = module.trainer
        strategy = trainer.strategy
        sync_buffers(strategy, module)
        names = list(module.modalities)
        feats, mask = module.fusion_inputs(features, present)
        ignore_index = module.modality_spec.ignore_index
        labelled = targets != ignore_index
        safe_targets = torch.where(labelled, targets, torch.zeros_like(targets))
        batch_idx = int(trainer.fit_loop.epoch_loop.batch_idx)
        num_batches = trainer.num_training_batches
        alpha = mla_alpha(max(batch_idx, 0), int(num_batches) if num_batches != float("inf") else max(batch_idx, 1))
        params = [p for p in module.parameters() if p.requires_grad]
        weight = self.head.weight
        losses: dict[str, Tensor] = {}
        for m in names:
            z = pool(feats[m])
            if z.shape[-1] != self.head.in_features:
                raise ModalityContractError(
                    f"MLAFusion: modality {m!r} has features of width {z.shape[-1]}, the shared head takes "
                    f"{self.head.in_features}: every encoder must output the head's width (end each encoder with "
                    f"its own projection to {self.head.in_features})."
                )
            keep = labelled if mask is None else labelled & mask[m]
            z = present_only(z, keep)  # an absent or unlabelled row reaches neither the loss nor the feature mean
            ce = F.cross_entropy(self.head(z).float(), safe_targets, reduction="none")
            loss_sum = torch.where(keep, ce, torch.zeros_like(ce)).sum()
            with no_sync(strategy), explained_backward("MLAFusion"):
                module.manual_backward(loss_sum)
            feature_sum = (z.detach().double() * keep[:, None].double()).sum(0)
            scalars = torch.cat([loss_sum.detach().double().reshape(1), keep.sum().double().reshape(1), feature_sum])
            scalars = mean_gradients(params, scalars, strategy)
            count = float(scalars[1])
            if count == 0:  # no sample of the global batch has m: no step, on every rank
                optimizer.zero_grad()
                continue
            new_projector = None
            if self.projection and self.updates > 0 and weight.grad is not None:
                new_projector = mla_update_projector(self.projector.to(weight.device), scalars[2:] / count, alpha)
                weight.grad = mla_project_gradient(weight.grad, new_projector)
            if not step_optimizer(trainer, optimizer):  # not an fp16 overflow step
                if new_projector is not None:
                    self.projector = new_projector.detach()  # stays on the device; the checkpoint gets a CPU copy
                self.updates += 1
            losses[m] = scalars[0] / count
        for m, value in losses.items():
            if module._trainer is not None:
                module.log(f"balance/mla/loss/{m}", value.float(), on_step=True, on_epoch=False)
        return torch.stack(list(losses.values())).mean().float() if losses else targets.new_zeros((), dtype=torch.float)

    # ------------------------------------------------------------------ checkpointing
    def get_extra_state(self) -> Any:
        return {"projector": self.projector.detach().cpu().clone(), "updates": int(self.updates)}

    def set_extra_state(self, state: Any) -> None:
        self.projector = state["projector"].double().cpu()
        self.updates = int(state["updates"])
