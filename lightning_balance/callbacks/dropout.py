"""Modality dropout: removes whole modalities from training samples through the contract's presence mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union, cast

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_balance._distributed import broadcast_seed, shared_generator
from lightning_balance._presence import presence_matrix
from lightning_balance.callbacks.base import GradientBalancingCallback, is_number
from lightning_balance.functional.dropout import (
    Schedule,
    adaptive_probabilities,
    drop_modalities,
    scheduled_factor,
)
from lightning_balance.functional.scores import modality_scores, present_sums, stack_modalities
from lightning_balance.modality import ModalityRecord, MultimodalMixin

__all__ = ["ModalityDropout"]


class ModalityDropout(GradientBalancingCallback):
    r"""Modality dropout (seed survey; ModDrop, Neverova et al. 2016; AV-HuBERT, Shi et al. 2022): during
    training, each sample loses modality :math:`m` with probability :math:`p_m(t)`, never all of its
    modalities, through the presence mask of :meth:`~lightning_balance.MultimodalMixin.fuse`. The fusion then
    sees the declared ``missing`` fill (zeros, a learned embedding, or a fusion that takes the mask), and every
    other method counts the sample as lacking ``m``. Validation and test are untouched.

    .. math:: \delta_{i,m} = \mathbb 1[u_{i,m} \ge p_m(t)] \wedge \text{present}_{i,m}

    with :math:`u` from a stream identical on all ranks and checkpointed (a function of ``(seed, draw)``):
    the draws of the global batch are made on every rank and each rank takes its rows in the interleaved
    order of Lightning's ``DistributedSampler`` (rank ``r`` of ``W`` holds samples ``r, r+W, …``), so DDP
    drops what one process would. If every present modality of a sample falls, the one whose draw is closest
    to its threshold is kept (so the drop rate is slightly below ``p`` for samples with few modalities).

    Schedules (``t`` = optimizer steps): ``"constant"`` :math:`p_m`; ``"linear"`` :math:`p_m \min(1, t/T)`;
    ``"cosine"`` :math:`p_m (1-\cos(\pi \min(1, t/T)))/2`; ``"adaptive"``: the dominant modality is dropped
    more, :math:`p_m = \min(p_{max}, p_m M \bar c_m)` with :math:`\bar c_m` the running mean (``momentum``)
    of modality ``m``'s share of OGM-GE's confidence scores (the unimodal logits' summed true-class
    probability over the samples that have ``m``, reduced across ranks in the pipeline's one all-reduce);
    its warm-up (``warmup_steps``) is linear. :math:`T` = ``warmup_steps``.

    Use it with unimodal losses or a method that trains each encoder (a dropped sample teaches the fusion to
    use the other modalities); Dai et al. (CVPR 2024) show that dropping one modality can increase the
    reliance on the other, so measure with :class:`~lightning_balance.ModalityDiagnostics`.

    Args:
        p: drop probability, one for all modalities or a mapping per modality (unnamed: 0).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"adaptive"``.
        warmup_steps: ``T``, the optimizer steps of the warm-up (needed by ``"linear"`` and ``"cosine"``).
        p_max: upper bound of an adaptive probability.
        momentum: of the running mean of the score shares (``"adaptive"``).
        seed: of the draws; ``None`` draws one on rank 0 and broadcasts it.
        modalities, start_epoch, end_epoch, start_step, end_step, epoch_length, log_metrics: see
            :class:`~lightning_balance.GradientBalancingCallback` (the window in which it drops).

    Logged: ``balance/dropout/p/<m>`` (the probability of the step) and ``balance/dropout/kept/<m>`` (the
    fraction of this rank's samples with ``m`` after dropout, in the step's last ``fuse`` call), on the
    logged steps.
    """

    method = "dropout"
    needs_targets = False  # the adaptive schedule's scores need targets: checked there
    edit_order = 0  # edits nothing; first in the pipeline
    edits_gradients = False  # no parameter group is needed
    min_modalities = 1  # dropping one modality only is a recipe
    fsdp_ok = True  # edits no gradient: sharded parameters do not matter

    def __init__(
        self,
        p: Union[float, Mapping[str, float]] = 0.3,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        p_max: float = 0.9,
        momentum: float = 0.9,
        seed: Optional[int] = None,
        modalities: Optional[Sequence[str]] = None,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        start_step: int = 0,
        end_step: Optional[int] = None,
        epoch_length: Optional[int] = None,
        log_metrics: bool = True,
    ) -> None:
        super().__init__(modalities=modalities, start_epoch=start_epoch, end_epoch=end_epoch, start_step=start_step,
                         end_step=end_step, epoch_length=epoch_length, log_metrics=log_metrics)
        values = p.values() if isinstance(p, Mapping) else [p]
        if not all(is_number(v) and 0.0 <= float(v) < 1.0 for v in values):
            raise ValueError(f"p must be a probability in [0, 1) (or a mapping modality -> probability), got {p!r}.")
        if schedule not in ("constant", "linear", "cosine", "adaptive"):
            raise ValueError(f"schedule must be 'constant', 'linear', 'cosine' or 'adaptive', got {schedule!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}.")
        if schedule in ("linear", "cosine") and warmup_steps == 0:
            raise ValueError(f"schedule={schedule!r} ramps p up over warmup_steps optimizer steps: give warmup_steps >= 1.")
        if not (is_number(p_max) and 0.0 < p_max < 1.0):
            raise ValueError(f"p_max must be in (0, 1), got {p_max!r}.")
        if not (is_number(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}.")
        self.p = dict(p) if isinstance(p, Mapping) else float(p)
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.p_max = float(p_max)
        self.momentum = float(momentum)
        self.seed = seed
        self.draws = 0  # fuse calls drawn so far (checkpointed): the position in the stream
        self.shares: Optional[Tensor] = None  # running score shares (adaptive; checkpointed)
        self._pending: Optional[Tensor] = None
        self._p_now: Optional[Tensor] = None
        self._kept: Optional[Tensor] = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if isinstance(self.p, dict):
            unknown = sorted(set(self.p) - set(self.active_modalities))
            if unknown:
                import difflib

                hints = [f"{u!r} -> {close[0]!r}?" for u in unknown
                         if (close := difflib.get_close_matches(u, list(self.active_modalities), n=1))]
                raise ValueError(f"ModalityDropout(p=...) names modalities {unknown} that it may not drop; the ones "
                                 f"it may drop are {list(self.active_modalities)}"
                                 f"{' (did you mean ' + ', '.join(hints) + ')' if hints else ''}.")
        if self.schedule == "adaptive" and len(self.active_modalities) < 2:
            raise ValueError(f"schedule='adaptive' drops the dominant modality more, measured against the others: it "
                             f"needs at least two droppable modalities, got {list(self.active_modalities)}; use "
                             f"schedule='constant' to drop one modality.")
        if self.seed is None:
            self.seed = broadcast_seed(trainer.strategy)

    def _base(self) -> Tensor:
        if isinstance(self.p, dict):
            return torch.tensor([float(self.p.get(m, 0.0)) for m in self.active_modalities])
        return torch.full((len(self.active_modalities),), float(self.p))

    def probabilities(self, step: int) -> Tensor:
        """``(M,)`` drop probabilities of the active modalities at optimizer step ``step``."""
        base = self._base() * scheduled_factor(self.schedule, step, self.warmup_steps)
        if self.schedule == "adaptive" and self.shares is not None:
            return adaptive_probabilities(base, self.shares.cpu().float(), self.p_max)
        return base

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._p_now = self.probabilities(trainer.global_step)
        self._kept = None

    # ------------------------------------------------------------------ the mask
    def tap_presence(self, module: MultimodalMixin, present: Optional[dict[str, Tensor]], n: int,
                     device: torch.device) -> Optional[dict[str, Tensor]]:
        if not self._enabled or self._p_now is None:
            return present
        draw = self.draws
        self.draws += 1  # every rank counts every training fuse call, an empty one too: the streams stay aligned
        if n == 0:
            return present
        names = module.modalities
        active = list(self.active_modalities)
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        generator = shared_generator(self.seed or 0, draw, torch.device("cpu"))
        uniform = torch.rand(n * world, len(active), generator=generator)[rank::world].to(device, non_blocking=True)
        p = torch.zeros(len(names))
        for i, m in enumerate(active):
            p[names.index(m)] = self._p_now[i]
        full = torch.ones(n, len(names), device=uniform.device)
        full[:, [names.index(m) for m in active]] = uniform
        matrix = presence_matrix(present, names, n, device)
        kept = drop_modalities(full, matrix, p.to(device))
        self._kept = kept.float().mean(0)
        return {m: kept[:, i] for i, m in enumerate(names)}

    # ------------------------------------------------------------------ the adaptive schedule's statistics
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        if self.schedule != "adaptive" or record.targets is None:
            return {}
        assert record.valid is not None  # the record has targets
        names = self.active_modalities
        counted = record.counted_stack(names)
        logits = stack_modalities(record.unimodal_logits(), names)
        scores = modality_scores(logits, record.targets, record.valid if counted is None else counted)
        return {"scores": scores, "count": record.modality_counts(names), "total": record.valid.sum().float().reshape(1)}

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.step_has_labels:
            return {}
        sums = present_sums(stats["scores"], stats["count"], stats["total"]).clamp_min(1e-8)
        shares = sums / sums.sum()
        previous = self.shares.to(shares.device) if self.shares is not None else shares
        self._pending = self.momentum * previous + (1 - self.momentum) * shares
        return {"shares": shares}

    def commit_step(self, groups: dict[str, Any], result: dict[str, Tensor], device: torch.device, active: bool) -> None:
        if self._pending is not None:
            self.shares = self._pending.detach()
            self._pending = None

    def discard_step(self) -> None:
        self._pending = None

    def acted(self, result: dict[str, Tensor]) -> bool:
        return False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log_metrics or self._p_now is None or not self._enabled:
            return
        from lightning_balance.callbacks.base import _logs_this_step, log_balance_metrics

        if not _logs_this_step(trainer):
            return
        metrics = {f"balance/dropout/p/{m}": self._p_now[i] for i, m in enumerate(self.active_modalities)}
        if self._kept is not None:
            names = cast(MultimodalMixin, pl_module).modalities
            metrics.update({f"balance/dropout/kept/{m}": self._kept[names.index(m)] for m in self.active_modalities})
        log_balance_metrics(pl_module, metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed, "draws": self.draws,
                "shares": None if self.shares is None else self.shares.detach().cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self.draws = int(state_dict.get("draws", 0))
        self.shares = state_dict.get("shares")
