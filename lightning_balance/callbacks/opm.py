"""OPM: on-the-fly prediction modulation, the feed-forward counterpart of OGM (T-PAMI 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_balance._distributed import all_reduce_sum, broadcast_seed, shared_generator
from lightning_balance._errors import ModalityContractError
from lightning_balance._presence import presence_matrix
from lightning_balance.callbacks.base import ForwardPassMethod, is_number
from lightning_balance.functional.opm import opm_drop, opm_drop_probabilities
from lightning_balance.functional.scores import modality_scores, present_sums, stack_modalities
from lightning_balance.modality import MultimodalMixin

__all__ = ["OPM"]


class OPM(ForwardPassMethod):
    r"""OPM, on-the-fly prediction modulation (Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal
    Learning", T-PAMI 2024): in each training forward pass the features of the modality that currently leads are
    dropped for some samples, so that the fused prediction has to rely more on the others. Validation and test are
    untouched.

    In every training :meth:`~lightning_balance.MultimodalMixin.fuse` call, on the fusion's inputs:

    1. scores :math:`s_m = \sum_i \sigma(o_{m,i})[y_i]` from the unimodal logits (the split head with the live,
       detached weights and ``b / M``, or the declared unimodal mode), over the labelled samples that have ``m``,
       summed over the ranks (one all-reduce of ``2M + 1`` numbers per call under DDP);
    2. :math:`q_m = \operatorname{clip}_{[0,1]}(q_{base}(1 + \lambda\tanh(\rho_m - 1)))` if
       :math:`\rho_m = s_m / \operatorname{mean}_{k\ne m} s_k > 1`, else 0
       (:func:`~lightning_balance.functional.opm_drop_probabilities`);
    3. with probability ``p_exe`` (one draw per call) the call drops: sample ``i`` keeps modality ``m`` when
       :math:`u_{i,m} \ge q_m`, and every kept feature is multiplied by :math:`1/(1-\theta)`,
       :math:`\theta = \sum_m d_m q_m / \sum_m d_m` (forward and backward). A dropped modality becomes absent
       for that sample: the fusion sees the declared ``missing`` fill (zeros by default, as in the official code)
       and every stacked method counts the sample as lacking it.

    The draws come from a stream identical on all ranks and checkpointed (a function of ``(seed, call)``); each
    rank takes its rows of the global batch in the interleaved order of Lightning's ``DistributedSampler``, so
    DDP drops what one process would. Under gradient accumulation each micro-batch is one forward pass and gets
    its own ``q`` (the official recipe has one forward per step).

    **Where ours differs.** The official code removes a sample that lost every modality from the loss. With every
    modality present that cannot happen (the modality of the lowest score has ``q = 0``); with absent modalities it
    can, and here such a sample keeps the modalities it has (the user's loss sees every sample). For ``M > 2``
    the ratio is against the mean of the others (the official code has two modalities).

    Args:
        q_base: the drop probability of a modality that barely leads (official 0.5: the script's argparse default
            overrides ``config.py``'s 0.4; BalanceBenchmark uses 0.4).
        lam: :math:`\lambda`, how much a larger lead adds (official 0.5).
        p_exe: probability that a forward pass drops at all (official 0.7).
        seed: of the draws; ``None`` draws one on rank 0 and broadcasts it.
        start_epoch: first epoch that drops. The official warm-up leaves epochs 0-5 alone (default 6); set 0
            for short runs.
        modalities, end_epoch, start_step, end_step, epoch_length, log_metrics: see
            :class:`~lightning_balance.GradientBalancingCallback` (the window in which it drops; ``modalities``:
            the ones it scores and may drop, at least two).

    Logged: ``balance/opm/q/<m>`` (the drop probabilities of the step's last call), ``balance/opm/executed`` (1
    when that call dropped) and ``balance/opm/kept/<m>`` (the fraction of this rank's samples that kept ``m``).
    """

    method = "opm"

    def __init__(
        self,
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        seed: Optional[int] = None,
        modalities: Optional[Sequence[str]] = None,
        start_epoch: int = 6,
        end_epoch: Optional[int] = None,
        start_step: int = 0,
        end_step: Optional[int] = None,
        epoch_length: Optional[int] = None,
        log_metrics: bool = True,
    ) -> None:
        super().__init__(modalities=modalities, start_epoch=start_epoch, end_epoch=end_epoch, start_step=start_step,
                         end_step=end_step, epoch_length=epoch_length, log_metrics=log_metrics)
        if not (is_number(q_base) and 0.0 <= q_base <= 1.0):
            raise ValueError(f"q_base must be a probability in [0, 1], got {q_base!r}.")
        if not (is_number(lam) and lam >= 0.0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}.")
        if not (is_number(p_exe) and 0.0 <= p_exe <= 1.0):
            raise ValueError(f"p_exe must be a probability in [0, 1], got {p_exe!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}.")
        self.q_base = float(q_base)
        self.lam = float(lam)
        self.p_exe = float(p_exe)
        self.seed = seed
        self.draws = 0  # training fuse calls inside the window so far (checkpointed): the position in the stream
        self.executed = 0  # calls that dropped (checkpointed, a diagnostic)
        self._last: Optional[dict[str, Tensor]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.seed is None:
            self.seed = broadcast_seed(trainer.strategy)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._last = None

    # ------------------------------------------------------------------ the forward pass
    def tap_inputs(self, module: MultimodalMixin, features: dict[str, Tensor], targets: Optional[Tensor],
                   present: Optional[dict[str, Tensor]]) -> tuple[dict[str, Tensor], Optional[dict[str, Tensor]]]:
        if not self._enabled:
            return features, present
        if targets is None:
            raise ModalityContractError(
                "OPM scores each modality on the batch's labels: call self.fuse(features, targets) in training_step."
            )
        draw = self.draws
        self.draws += 1  # every rank counts every call, an empty one too: the streams stay aligned
        names, active = module.modalities, list(self.active_modalities)
        n = targets.shape[0]
        device = targets.device
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        matrix = presence_matrix(present, names, n, device)
        columns = [names.index(m) for m in active]
        valid = targets != module.modality_spec.ignore_index
        counted = (matrix[:, columns].T & valid) if present is not None else valid
        with torch.no_grad():
            logits = stack_modalities(module.compute_unimodal_logits(
                {m: f.detach() for m, f in features.items()}, present=present), active)
            scores = modality_scores(logits, targets, counted)
            counts = counted.sum(-1).float() if counted.ndim == 2 else valid.sum().float().expand(len(active))
            flat = torch.cat([scores.float(), counts, valid.sum().float().reshape(1)])
            trainer = getattr(module, "_trainer", None)
            if trainer is not None:
                flat = all_reduce_sum(flat, trainer.strategy)
        k = len(active)
        q_active = opm_drop_probabilities(present_sums(flat[:k], flat[k:2 * k], flat[2 * k]), self.q_base, self.lam)
        # a modality no labelled sample of the global batch has is not scored: it is neither dropped nor the
        # reference that makes another lead; with fewer than two scored modalities nothing is dropped
        scored = flat[k:2 * k] > 0
        q_active = torch.where(scored & (scored.sum() >= 2), q_active, torch.zeros_like(q_active))
        generator = shared_generator(self.seed or 0, draw, torch.device("cpu"))
        execute = float(torch.rand(1, generator=generator)) < self.p_exe
        uniform = torch.rand(n * world, k, generator=generator)[rank::world].to(device, non_blocking=True)
        # no labelled sample in the global batch: nothing to score, nothing dropped (no host sync)
        q_active = torch.where(flat[2 * k] > 0, q_active, torch.zeros_like(q_active))
        q = torch.zeros(len(names), device=device)
        q[columns] = q_active.to(device)
        self._last = {"q": q_active.detach(), "executed": torch.tensor(float(execute))}
        if not execute or n == 0:
            self._last["kept"] = matrix.float().mean(0) if n else torch.zeros(len(names))
            return features, present
        full = torch.ones(n, len(names), device=device)
        full[:, columns] = uniform
        dims = [int(features[m].shape[-1]) for m in names]
        self.executed += 1
        out, keep, _ = opm_drop(features, full, q, dims, matrix if present is not None else None, rescue=True)
        self._last["kept"] = keep.float().mean(0)
        return out, {m: keep[:, i] for i, m in enumerate(names)}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log_metrics or self._last is None:
            return
        names = cast(MultimodalMixin, pl_module).modalities
        metrics = {f"balance/opm/q/{m}": self._last["q"][i] for i, m in enumerate(self.active_modalities)}
        metrics["balance/opm/executed"] = self._last["executed"]
        metrics.update({f"balance/opm/kept/{m}": self._last["kept"][names.index(m)] for m in self.active_modalities})
        self.log_step(trainer, pl_module, metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.draws == 0 and not trainer.interrupted:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"OPM never ran in this fit (start_epoch={self.start_epoch}, the official warm-up of 6 epochs by "
                f"default; the fit ran {trainer.current_epoch} epoch(s), {trainer.global_step} optimizer step(s)). "
                f"Lower start_epoch (or use start_step) for a shorter run.",
                category=UserWarning,
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed, "draws": self.draws, "executed": self.executed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        self.draws = int(state_dict.get("draws", 0))
        self.executed = int(state_dict.get("executed", 0))
