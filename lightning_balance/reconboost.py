"""ReconBoost (Hua, Xu, Bao, Yang, Huang, ICML 2024): modalities as boosting learners, alternating stages.

Each modality's learner is its encoder followed by a head shared by all modalities; the ensemble is
``F = η Σ_m f_m`` with a learnable boost rate ``η``. Stage ``s`` trains modality ``s mod M``'s learner alone with
a cross-entropy that down-weights the samples the other learners already get right (the reconcilement), then
corrects the whole ensemble with its cross-entropy. It is a fusion (the ensemble) with a training procedure, like
MLA; the math is in :mod:`lightning_balance.functional.reconboost`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

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
from lightning_balance.functional.reconboost import alignment_loss, boosting_loss, reconboost_schedule

__all__ = ["ReconBoostFusion"]


class ReconBoostFusion(nn.Module):
    """The ReconBoost ensemble and its staged training step.

    Hua, Xu, Bao, Yang, Huang. *ReconBoost: Boosting Can Achieve Modality Reconcilement.* ICML 2024 (official code:
    huacong/ReconBoost, ``train.py``, ``models/dynamic_net.py``, ``schedule.py``).

    Learners ``f_m(x) = h(z_m)`` with ``h`` the shared head; the prediction is ``F(x) = η Σ_{m ∈ A} f_m(x)`` over
    the learners added so far (``A``; every modality once each has had its first stage). Epoch ``e`` belongs to
    stage ``s = e // (E1 + E2)``, which trains modality ``m = s mod M``:

    * phase 1 (``E1 = epochs_per_stage`` epochs), ``m``'s encoder and the head, per sample::

        ℓ_i = −(1/C) (w1 − w2 q_i) log softmax(f_m(x_i))_{y_i} + α (1/C) Σ_c (softmax(f_m)_c − softmax(f_prev)_c)²
        q_i = softmax(F_{−m}(x_i))_{y_i}   (F_{−m}: the other added learners, no gradient; q = 1 if there are none)

      (``f_prev`` the previous stage's learner, from stage 1 on; its prediction is a fixed target);
    * then ``m`` joins ``A``; phase 2 (``E2 = correct_epochs`` epochs), every added encoder, the head and ``η``:
      ``CE(F(x), y)``.

    The optimizer's state is cleared at the start of every phase (the official code builds a fresh SGD for each).

    Args:
        head: the shared head (official ``Head``: ``Linear(d, 256) → ReLU → Linear(256, C)``); every encoder outputs
            its input width.
        boost_rate: the initial ``η`` (official 1.0).
        weight1, weight2: ``w1``, ``w2`` (official CREMA-D 5, 1; AVE/ModelNet40 ``w1`` 4).
        alpha: ``α`` of the alignment ("GA") term (official 0.5).
        alignment_gradient: keep the GA term's gradient through the current learner. The official code detaches
            both of its arguments, so the term adds nothing; ``False`` reproduces that.
        epochs_per_stage, correct_epochs: ``E1``, ``E2`` (official 4, 4).
        pretrained: the learners start from trained unimodal models (official ``--use_pretrain``): every modality is
            in the ensemble from the first stage.

    Use::

        self.automatic_optimization = False
        self.fusion = ReconBoostFusion(nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, num_classes)))
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)

        def training_step(self, batch, batch_idx):
            features = {"audio": self.audio_encoder(batch["audio"]), "visual": self.visual_encoder(batch["visual"])}
            return self.fusion.training_step(self, features, batch["target"], present=batch.get("present"))
    """

    def __init__(self, head: nn.Module, boost_rate: float = 1.0, weight1: float = 5.0, weight2: float = 1.0,
                 alpha: float = 0.5, alignment_gradient: bool = True, epochs_per_stage: int = 4,
                 correct_epochs: int = 4, pretrained: bool = False) -> None:
        super().__init__()
        if not isinstance(head, nn.Module):
            raise ValueError(f"ReconBoostFusion's head must be an nn.Module (features -> logits), got {head!r}.")
        for name, value in (("epochs_per_stage", epochs_per_stage), ("correct_epochs", correct_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "epochs_per_stage" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'epochs_per_stage' else 0}, got {value!r}.")
        for name, number in (("weight1", weight1), ("weight2", weight2), ("alpha", alpha), ("boost_rate", boost_rate)):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
                raise ValueError(f"{name} must be a number >= 0, got {number!r}.")
        self.head = head
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))
        self.weight1, self.weight2, self.alpha = float(weight1), float(weight2), float(alpha)
        self.alignment_gradient = bool(alignment_gradient)
        self.epochs_per_stage, self.correct_epochs = epochs_per_stage, correct_epochs
        self.pretrained = bool(pretrained)
        # indices of the learners in the ensemble (None: all; extra state); none before the first stage unless pretrained
        self.added: Optional[list[int]] = None if self.pretrained else []

    # ------------------------------------------------------------------ inference: the contract's fusion
    def forward(self, *features: Tensor, present: Optional[Tensor] = None) -> Tensor:
        """``F(x) = η Σ_{m ∈ A} h(z_m)`` over the added learners the sample has (``present``); a sample with none
        gets ``h(0) · 0``, zeros (finite, as the contract asks of an empty coalition)."""
        members = range(len(features)) if self.added is None else self.added
        total: Optional[Tensor] = None
        for k in members:
            has = None if present is None else present[:, k].bool()
            out = present_only(self.head(present_only(pool(features[k]), has)), has)
            total = out if total is None else total + out
        if total is None:  # nothing added yet (before the first stage): the head on zeros
            total = self.head(torch.zeros_like(pool(features[0]))) * 0
        return self.boost_rate * total

    # ------------------------------------------------------------------ training
    def members_at(self, stage: int, phase: int, num_modalities: int) -> list[int]:
        """The learners in the ensemble during ``(stage, phase)``: all if pretrained, else those whose first stage
        has ended (phase 1 of stage ``s``: stages ``< s``; phase 2: ``≤ s``)."""
        if self.pretrained:
            return list(range(num_modalities))
        done = stage + (1 if phase == 2 else 0)
        return sorted({j % num_modalities for j in range(done)})

    def training_step(self, module: Any, features: Mapping[str, Tensor], targets: Tensor,
                      present: Any = None) -> Tensor:
        """One optimizer step of the current stage's phase; returns the detached loss.

        Needs manual optimization (``self.automatic_optimization = False``) and one optimizer. Losses are means over
        the labelled samples of the global batch that have what they read (phase 1: the trained modality); under
        DDP the gradients and the counts travel in one all-reduce per step (the DDP hooks are bypassed).
        """
        optimizer = check_manual(module, self, "ReconBoostFusion")
        trainer = module.trainer
        strategy = trainer.strategy
        sync_buffers(strategy, module)
        names = list(module.modalities)
        m_count = len(names)
        stage, phase, k, first = reconboost_schedule(trainer.current_epoch, self.epochs_per_stage,
                                                     self.correct_epochs, m_count)
        if first and int(trainer.fit_loop.epoch_loop.batch_idx) == 0:
            getattr(optimizer, "optimizer", optimizer).state.clear()  # a fresh optimizer for the phase (official)
        feats, mask = module.fusion_inputs(features, present)
        labelled = targets != module.modality_spec.ignore_index
        safe = torch.where(labelled, targets, torch.zeros_like(targets))
        n = targets.shape[0]
        has = {m: (mask[m] if mask is not None else torch.ones(n, dtype=torch.bool, device=targets.device))
               for m in names}
        z = {m: present_only(pool(feats[m]), has[m]) for m in names}  # absent rows: zeros, whatever stood there
        widths = {m: v.shape[-1] for m, v in z.items()}
        if len(set(widths.values())) > 1:
            raise ModalityContractError(f"ReconBoostFusion: the learners share one head, so every modality's features "
                                        f"need the same width; got {widths} (end each encoder with its own projection).")
        members = self.members_at(stage, phase, m_count)
        if phase == 1:
            m = names[k]
            logits = self.head(z[m])
            others = [j for j in members if j != k]
            with torch.no_grad():
                other_sum = None
                has_other = torch.zeros(n, dtype=torch.bool, device=targets.device)
                for j in others:
                    out = present_only(self.head(z[names[j]]), has[names[j]])
                    other_sum = out if other_sum is None else other_sum + out
                    has_other |= has[names[j]]
                ensemble = None if other_sum is None else self.boost_rate * other_sum
            per_sample = boosting_loss(logits, ensemble, safe, self.weight1, self.weight2, has_other)
            keep = labelled & has[m]
            if stage > 0 and self.alpha > 0:
                prev = names[(stage - 1) % m_count]
                if prev != m:
                    with torch.no_grad():
                        prev_logits = self.head(z[prev])
                    align = alignment_loss(logits, prev_logits, self.alignment_gradient)
                    per_sample = per_sample + self.alpha * torch.where(has[prev], align, torch.zeros_like(align))
        else:
            in_ensemble = torch.zeros(n, dtype=torch.bool, device=targets.device)
            for j in members:
                in_ensemble |= has[names[j]]
            keep = labelled & in_ensemble
            total = None
            for j in members:
                out = present_only(self.head(z[names[j]]), has[names[j]])
                total = out if total is None else total + out
            assert total is not None  # phase 2: the ensemble has at least this stage's learner
            fused = self.boost_rate * total
            per_sample = F.cross_entropy(fused.float(), safe, reduction="none")
        loss_sum = torch.where(keep, per_sample, torch.zeros_like(per_sample)).sum()
        params = [p for p in module.parameters() if p.requires_grad]
        with no_sync(strategy), explained_backward("ReconBoostFusion"):
            module.manual_backward(loss_sum)
        scalars = mean_gradients(params, torch.stack([loss_sum.detach().double(), keep.sum().double()]), strategy)
        count = float(scalars[1])
        if count == 0:
            optimizer.zero_grad()
        else:
            step_optimizer(trainer, optimizer)
        predicting = self.members_at(stage, 2, m_count)  # the stage's learner predicts from its first step on
        self.added = None if len(predicting) == m_count else predicting
        loss = (scalars[0] / max(count, 1.0)).float()
        if module._trainer is not None:
            module.log("balance/reconboost/loss", loss, on_step=True, on_epoch=False)
            module.log("balance/reconboost/stage", float(stage), on_step=True, on_epoch=False)
            module.log("balance/reconboost/phase", float(phase), on_step=True, on_epoch=False)
            module.log("balance/reconboost/modality", float(k), on_step=True, on_epoch=False)
            module.log("balance/reconboost/boost_rate", self.boost_rate.detach().float(), on_step=True, on_epoch=False)
        return loss

    # ------------------------------------------------------------------ checkpointing
    def get_extra_state(self) -> Any:
        return {"added": None if self.added is None else list(self.added)}

    def set_extra_state(self, state: Any) -> None:
        self.added = None if state.get("added") is None else [int(i) for i in state["added"]]

    def extra_repr(self) -> str:
        return (f"w1={self.weight1}, w2={self.weight2}, alpha={self.alpha}, stages={self.epochs_per_stage}+"
                f"{self.correct_epochs} epochs, pretrained={self.pretrained}")

