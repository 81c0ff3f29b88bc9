"""PMR as a callback (Fan, Xu, Wang, Wang, Guo, "PMR: Prototypical Modal Rebalance for Multimodal
Learning", CVPR 2023)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_balance._taps import GradientTap, add_gradient
from lightning_balance.callbacks.base import GradientBalancingCallback, StepStatistics, is_number, training_batches
from lightning_balance.functional.scores import present_sums
from lightning_balance.functional.pmr import (
    class_feature_sums,
    pmr_weights,
    prototype_entropy,
    prototype_logits,
    update_prototypes,
)
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["PMR"]


class PMR(GradientBalancingCallback):
    r"""Prototypical Modal Rebalance (PMR): pull the slower modality's features toward its class prototypes.

    **Prototypes.** Per modality ``m`` and class ``k``, :math:`c^m_k = \operatorname{mean}\{z^m_i : y_i = k\}`,
    recomputed before every epoch (so: before training and after each epoch) with momentum
    :math:`c \leftarrow (1-\mu) c_{new} + \mu c_{old}` from the third computation on (the official code
    mixes when the epoch that just ended is > 0: the prototypes before epoch 0 and before epoch 1 are fresh).
    With ``momentum > 0`` they are computed in every epoch up to ``end_epoch``, also before ``start_epoch``,
    as the official code does, so that the momentum history is the official one.
    ``prototypes="pass"`` (official) takes them from a ``no_grad`` eval-mode pass over the first
    ``fraction`` of the epoch's training batches, through the module's :meth:`encode_batch` (torch's
    RNG is forked for the pass, so training's shuffling is unchanged; from the second epoch on the pass
    sees the epoch's own first batches, in the first epoch Lightning has already drawn the order and the
    pass draws another, as the official code's separate pass always does);
    ``prototypes="steps"`` takes them, at no extra cost, from the features the previous epoch's
    training steps recorded (then epoch 0 has no prototypes and no PCE). Features are pooled to
    one vector per sample (the module's :meth:`~lightning_balance.MultimodalMixin.pool_features`: token
    sequences are averaged over the tokens). Samples whose target is the declared ``ignore_index`` are left
    out. Class sums and counts are
    summed over ranks, so every rank holds the same prototypes; a class absent from the subset keeps its
    previous prototype (the official code would divide 0 by 0).

    **Per step.** Prototype logits :math:`\ell^m_{i,k} = -\lVert z^m_i - c^m_k\rVert_2`, scores
    :math:`s^m = \sum_i \sigma(\ell^m_i)[y_i]` (summed over ranks), and the term added to your loss:

    .. math::
        \alpha \sum_m \beta_m \, \mathrm{CE}(\ell^m, y) \;-\; \mu_H \sum_m e_m \, \overline{H}(\sigma(\ell^m))

    ``rule="binary"`` (official code): ``β = 1`` on every modality behind the leader (for two, the
    weaker one). ``rule="continuous"`` (paper): :math:`\beta_m = \operatorname{clip}(\max_k s_k / s_m - 1, 0, 1)`.
    The entropy term (paper's PER, absent from the released code, off by default) maximises the
    prototype entropy of the leading modality, :math:`e_m = \max_{k\ne m}\operatorname{clip}(s_m/s_k-1,0,1)`,
    during the first ``entropy_epochs`` epochs. Prototypes are constants: the term trains only each
    modality's own encoder.

    How it is applied: the term's gradient with respect to each modality's features is added to the
    gradient reaching those features in your ``backward()`` (a gradient tap), scaled like your loss
    (``1/accumulate_grad_batches``, AMP loss scale). Your loss is unchanged, and DDP averages the term's
    gradient like the rest. Because the weights are decided per backward pass (as the card advises), gradient
    accumulation is refused unless ``accumulation="per_micro_batch"``. Under manual optimisation the
    term enters each ``manual_backward`` at full weight.

    Args:
        alpha: PCE weight α (official CLI default 1.0; CREMA-D concat script 2.0).
        momentum: prototype momentum μ (official CLI default 0.2; CREMA-D script 0.0).
        rule: ``"binary"`` or ``"continuous"`` (see above).
        entropy_weight: ``μ_H`` of the entropy term (0: off, as the released code).
        entropy_epochs: epochs from ``start_epoch`` during which the entropy term is applied.
        prototypes: ``"pass"`` or ``"steps"`` (see above).
        fraction: share of the epoch's training batches used by ``prototypes="pass"`` (official 0.1: the first
            ``len(loader) // 10`` batches, at least one).
        accumulation: ``"raise"`` or ``"per_micro_batch"``.

    Other arguments: see :class:`GradientBalancingCallback` (official modulation epochs 0–100). With
    ``epoch_length``, prototypes are recomputed every ``epoch_length`` optimizer steps and ``entropy_epochs``
    counts those blocks: for training by steps.

    Logged: ``balance/pmr/{score,pce_weight,entropy_weight}/<m>`` (score: mean prototype probability of
    the true class).

    State (checkpointed): the prototypes and which classes have one.

    Example::

        trainer = Trainer(callbacks=[PMR(alpha=2.0, momentum=0.0)])
    """

    method = "pmr"
    reduce_at = "micro_batch"

    def __init__(
        self,
        alpha: float = 1.0,
        momentum: float = 0.2,
        rule: Literal["binary", "continuous"] = "binary",
        entropy_weight: float = 0.0,
        entropy_epochs: int = 0,
        prototypes: Literal["pass", "steps"] = "pass",
        fraction: float = 0.1,
        accumulation: Literal["raise", "per_micro_batch"] = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("alpha", alpha), ("entropy_weight", entropy_weight)):
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        if not is_number(momentum) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}.")
        if rule not in ("binary", "continuous"):
            raise ValueError(f"rule must be 'binary' or 'continuous', got {rule!r}.")
        if not isinstance(entropy_epochs, int) or isinstance(entropy_epochs, bool) or entropy_epochs < 0:
            raise ValueError(f"entropy_epochs must be an int >= 0, got {entropy_epochs!r}.")
        if prototypes not in ("pass", "steps"):
            raise ValueError(f"prototypes must be 'pass' or 'steps', got {prototypes!r}.")
        if not is_number(fraction) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
        if accumulation not in ("raise", "per_micro_batch"):
            raise ValueError(f"accumulation must be 'raise' or 'per_micro_batch', got {accumulation!r}.")
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        self.rule = rule
        self.entropy_weight = float(entropy_weight)
        self.entropy_epochs = entropy_epochs
        self.prototypes = prototypes
        self.fraction = float(fraction)
        self.accumulation = accumulation
        # state
        self.centroids: dict[str, Tensor] = {}  # modality -> (C, d)
        self.seen: dict[str, Tensor] = {}  # modality -> (C,) bool
        self._epoch_sums: dict[str, Tensor] = {}  # prototypes="steps": this epoch's class sums / counts
        self._pending_sums: Optional[dict[str, Tensor]] = None  # this optimizer step's, until it is taken
        self.prototype_epoch: Optional[int] = None  # the epoch whose prototypes are in `centroids`
        self._sums_epoch: Optional[int] = None  # prototypes="steps": the epoch whose class sums are collected
        self._epoch = 0
        # "steps" collects class sums on every step (the next epoch's prototypes need them)
        self.observe_outside_window = prototypes == "steps"

    # ------------------------------------------------------------------ prototypes
    def _needs_prototypes(self, trainer: pl.Trainer, epoch: int) -> bool:
        if self.end_epoch is not None and epoch > self.end_epoch:
            return False
        return self.is_active(trainer) or self.momentum > 0

    def begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        self._epoch = epoch
        if self.prototypes == "steps":
            if self._sums_epoch == epoch:  # resumed inside the epoch: its prototypes and partial sums are loaded
                return
            if self._epoch_sums:
                self._update_from(self._epoch_sums, epoch)
            self._epoch_sums, self._sums_epoch = {}, epoch
            return
        if self.prototype_epoch == epoch:  # resumed inside the epoch: the loaded prototypes are this epoch's
            return
        if self._needs_prototypes(trainer, epoch):
            self._update_from(self._prototype_pass(trainer, pl_module), epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # a window that opens inside an epoch (start_step) on an epoch that had no prototypes: build them now
        if (self._enabled and self.prototypes == "pass" and self.prototype_epoch != self._epoch):
            self._update_from(self._prototype_pass(trainer, pl_module), self._epoch)

    def _update_from(self, sums: dict[str, Tensor], epoch: int) -> None:
        # official: momentum when the epoch that just ended is > 0, i.e. from the prototypes of epoch 2 on
        momentum = self.momentum if epoch >= 2 else 0.0
        for m in self.active_modalities:
            s, n = sums[f"sum/{m}"], sums[f"count/{m}"]
            self.centroids[m], self.seen[m] = update_prototypes(
                s, n, self.centroids.get(m), self.seen.get(m), momentum
            )
        self.prototype_epoch = epoch

    def _prototype_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        loader = trainer.train_dataloader
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ModalityContractError(
                "PMR(prototypes='pass') iterates the training DataLoader; with several training loaders use "
                "prototypes='steps'."
            )
        total = trainer.num_training_batches
        if not math.isfinite(total):
            raise ModalityContractError("PMR(prototypes='pass') needs a sized training loader; use prototypes='steps'.")
        limit = max(1, math.floor(self.fraction * total + 1e-9))  # official: the first len // 10 batches, at least one
        was_training = pl_module.training
        pl_module.eval()
        sums: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                for batch in training_batches(trainer, loader, limit):
                    features, targets, present = cast(MultimodalMixin, pl_module).encoded_batch(batch)
                    valid = targets != cast(MultimodalMixin, pl_module).modality_spec.ignore_index
                    self._add_class_sums(sums, pl_module, features, torch.where(valid, targets, 0), valid,
                                         present=present)
        finally:
            pl_module.train(was_training)
        stats = StepStatistics()  # class sums and counts of every rank: one all-reduce
        stats.update(sums)
        return stats.reduce(trainer.strategy)

    def _num_classes(self, pl_module: MultimodalMixin, features: dict[str, Tensor]) -> int:
        if self.centroids:
            return next(iter(self.centroids.values())).shape[0]
        with torch.no_grad():
            return int(pl_module.fuse_subset({k: v[:1] for k, v in features.items()}, pl_module.modalities).shape[-1])

    def _add_class_sums(self, sums: dict[str, Tensor], pl_module: Any, features: dict[str, Tensor],
                        targets: Tensor, valid: Tensor, classes: Optional[int] = None,
                        present: Optional[dict[str, Tensor]] = None) -> None:
        classes = classes if classes is not None else self._num_classes(pl_module, features)
        for m in self.active_modalities:
            vectors = pl_module.pool_features(m, features[m].detach())
            counted = valid if present is None else valid & present[m]  # a prototype of present samples only
            s, n = class_feature_sums(vectors, targets, classes, counted)
            sums[f"sum/{m}"] = sums[f"sum/{m}"] + s if f"sum/{m}" in sums else s
            sums[f"count/{m}"] = sums[f"count/{m}"] + n if f"count/{m}" in sums else n

    # ------------------------------------------------------------------ forward: the feature taps
    def tap_features(self, module: MultimodalMixin, features: dict[str, Tensor], targets: Optional[Tensor],
                     extras: dict[str, Any]) -> dict[str, Tensor]:
        if not self._enabled or not self.centroids:
            return features
        taps = {m: GradientTap() for m in self.active_modalities}
        extras["pmr"] = taps
        return {k: (add_gradient(taps[k], z) if k in taps else z) for k, z in features.items()}

    # ------------------------------------------------------------------ statistics → weights → taps
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        valid, targets = record.valid, record.valid_targets()
        assert valid is not None  # needs_targets: the records have targets
        if self.prototypes == "steps":
            self._add_class_sums(out, pl_module, record.features, targets, valid,
                                 classes=record.logits.shape[-1], present=record.present)
        if self.centroids:
            scores, kept = [], {}
            with torch.enable_grad():  # the logits are reused, with their graph, by prepare_backward
                for m in self.active_modalities:
                    z = record.features[m].detach().float().requires_grad_(True)
                    logits = prototype_logits(pl_module.pool_features(m, z), self.centroids[m], self.seen[m])
                    kept[m] = (z, logits)
                    with torch.no_grad():
                        counted = record.counted(m)
                        assert counted is not None  # the record has targets
                        known = self.seen[m].to(logits.device)[targets] & counted
                        p = torch.softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
                        scores.append(torch.where(known, p, torch.zeros_like(p)).sum())
            record.extras["pmr_logits"] = kept
            out["scores"] = torch.stack(scores)
            out["count"] = record.modality_counts(self.active_modalities)
            out["total"] = valid.sum().float().reshape(1)
        return out

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.prototypes == "steps":  # added to the epoch's sums once the optimizer step is taken
            step = {k: v for k, v in stats.items() if k.startswith(("sum/", "count/"))}
            pending = self._pending_sums or {}
            self._pending_sums = {k: pending[k] + v if k in pending else v for k, v in step.items()}
        if "scores" not in stats or not self.step_has_labels:  # no prototypes yet, or no sample with some modality
            return {"pending": torch.zeros(())} if self._pending_sums else {}
        # with absent modalities each score sums over the samples that have the modality: on one footing
        pce, entropy = pmr_weights(present_sums(stats["scores"], stats["count"], stats["total"]), self.rule)
        in_per = self._epoch - self.start_epoch < self.entropy_epochs
        return {
            "score": stats["scores"] / stats["count"].clamp_min(1),
            "pce_weight": self.alpha * pce,
            "entropy_weight": self.entropy_weight * entropy * float(in_per),
        }

    def prepare_backward(self, pl_module: MultimodalMixin, record: ModalityRecord, result: dict[str, Tensor],
                         loss_scale: float) -> None:
        if "pce_weight" not in result or "pmr" not in record.extras:
            return
        taps = record.extras["pmr"]
        targets = record.valid_targets()
        pce_w = result["pce_weight"].tolist()
        ent_w = result["entropy_weight"].tolist()
        for i, m in enumerate(self.active_modalities):
            if pce_w[i] == 0.0 and ent_w[i] == 0.0:
                continue
            z, logits = record.extras["pmr_logits"][m]
            valid = record.counted(m)  # labelled samples that have the modality
            assert valid is not None and record.valid is not None  # needs_targets: the records have targets
            with torch.enable_grad():
                known = self.seen[m].to(z.device)[targets] & valid
                # a mean over the labelled samples, like CE(ignore_index=...); a sample that lacks the modality
                # adds 0 (normalising by the present ones would make DDP a mean of unequal per-rank means)
                n = record.valid.sum().clamp_min(1)
                loss = z.new_zeros(())
                if pce_w[i]:  # samples of a class without a prototype contribute 0 (no host sync to find them)
                    safe = logits.masked_fill(~known.unsqueeze(1), 0.0)
                    ce = F.cross_entropy(safe, targets, reduction="none") * known
                    loss = loss + pce_w[i] * ce.sum() / n
                if ent_w[i]:
                    entropy = torch.where(valid, prototype_entropy(logits), torch.zeros((), device=z.device))
                    loss = loss - ent_w[i] * entropy.sum() / n
                (grad,) = torch.autograd.grad(loss, z)
            taps[m].extra = grad * loss_scale

    def acted(self, result: dict[str, Tensor]) -> bool:
        return "pce_weight" in result  # steps without prototypes yet only collect class sums

    def commit_step(self, groups: dict[str, Any], result: dict[str, Tensor], device: torch.device,
                    active: bool) -> None:
        if self._pending_sums:
            for k, v in self._pending_sums.items():
                self._epoch_sums[k] = self._epoch_sums[k] + v if k in self._epoch_sums else v.clone()
        self._pending_sums = None

    def discard_step(self) -> None:
        self._pending_sums = None

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"{k}/{m}": result[k][i] for k in ("score", "pce_weight", "entropy_weight") if k in result
                for i, m in enumerate(self.active_modalities)}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "centroids": {m: c.detach().cpu().clone() for m, c in self.centroids.items()},
            "seen": {m: s.detach().cpu().clone() for m, s in self.seen.items()},
            "epoch_sums": {k: v.detach().cpu().clone() for k, v in self._epoch_sums.items()},
            "prototype_epoch": self.prototype_epoch,
            "sums_epoch": self._sums_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.centroids = dict(state_dict.get("centroids", {}))
        self.seen = dict(state_dict.get("seen", {}))
        self._epoch_sums = dict(state_dict.get("epoch_sums", {}))
        self.prototype_epoch = state_dict.get("prototype_epoch")
        self._sums_epoch = state_dict.get("sums_epoch")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self.centroids = {m: c.to(device) for m, c in self.centroids.items()}
        self.seen = {m: s.to(device) for m, s in self.seen.items()}
        self._epoch_sums = {k: v.to(device) for k, v in self._epoch_sums.items()}
