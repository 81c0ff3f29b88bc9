"""MMPareto as a callback (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024)."""

from __future__ import annotations

from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_balance.callbacks.base import (
    GradientBalancingCallback,
    _logs_this_step,
    is_number,
    log_balance_metrics,
    loss_scales,
)
from lightning_balance.functional.mmpareto import pareto_merge_from_sum_, pareto_stationary, pareto_weights
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["MMPareto"]


class MMPareto(GradientBalancingCallback):
    r"""MMPareto: merge each encoder's multimodal and unimodal gradients without conflict.

    Needs the unimodal auxiliary objectives: ``training_step`` returns
    ``self.add_unimodal_losses(fused_loss)`` (:meth:`MultimodalMixin.add_unimodal_losses`), i.e.
    ``L = L_mm + Σ_u L_u``. For encoder ``u`` only ``L_mm`` and its own ``L_u`` have a gradient:
    ``g_mm`` and ``g_u``. Per optimizer step, over the whole encoder:

    .. math::
        \cos = \frac{\langle g_{mm}, g_u\rangle}{\lVert g_{mm}\rVert\lVert g_u\rVert},\quad
        (w_{mm}, w_u) = \begin{cases} (\tfrac12, \tfrac12) & \cos > 0 \\
        (c^*, 1 - c^*),\ c^* = \frac{\lVert g_u\rVert^2 - \langle g_{mm}, g_u\rangle}
        {\lVert g_{mm} - g_u\rVert^2} & \cos \le 0 \end{cases}

    (the official solver's degenerate cases, a zero gradient, give 0.999 or 0.001)

    and per parameter tensor ``p``: :math:`\hat g_p = 2(w_{mm} g_{mm,p} + w_u g_{u,p})`,
    :math:`g_p \leftarrow \gamma\, \hat g_p \max(1, \lVert g_{mm,p} + g_{u,p}\rVert / \lVert\hat g_p\rVert)`.
    Heads and fusion keep their ordinary gradient. Without conflict the encoder gets ``γ (g_mm + g_u)``:
    with ``γ = 1.5`` that is a 1.5× encoder learning rate, to keep in mind when comparing.

    How the per-loss gradients are obtained: before your ``backward()``, one ``torch.autograd.grad`` of
    ``Σ_u L_u`` with respect to the encoders (each ``L_u`` reaches only its own encoder, so this gives
    every ``g_u`` in one extra backward through the unimodal branches; the official code runs four
    full backward passes). ``g_mm`` is then the accumulated ``.grad``
    minus ``g_u``. ``autograd.grad`` bypasses DDP's reduction, so the ``g_u`` are summed over
    micro-batches (scaled like your loss) and averaged over ranks in the step's single all-reduce
    before any cosine or weight is computed: DDP and gradient accumulation give the single-process,
    full-batch result. Gradients are unscaled (AMP) and dot products taken in float64.

    **Pareto-stationary steps.** When an encoder's two gradients are exactly opposed (anti-parallel), the
    segment between them contains 0: no direction decreases both losses, the min-norm point is the zero
    vector, and the paper's magnitude enhancement has no direction to enlarge. The paper's intent is a
    direction common to all objectives; at such a point there is none, so the encoder's gradient is set
    to exactly zero for the step (logged as ``stationary``), as the min-norm formula gives — instead of the
    official code's ``0/0`` (NaN) or an amplification of round-off into a direction nobody chose. "Exactly"
    means the Pareto direction's norm is below ``1e-3`` of the two gradients' norms: ``g_mm`` is recovered as
    ``.grad − g_u`` in the gradients' float32, so a smaller Pareto direction is mostly round-off, which the
    magnitude restoration would otherwise enlarge up to the uniform norm.

    Frozen encoders (every parameter ``requires_grad=False``) are left out of the merge (an info message
    says which); with every balanced encoder frozen the callback refuses to start. The per-loss gradients
    need ``autograd.grad(..., retain_graph=True)``, which a ``torch.compile``-d backward with donated
    buffers refuses: the callback turns ``torch._functorch.config.donated_buffer`` off while it trains
    (the setting only saves memory) and restores it after the fit.

    Args:
        gamma: amplification γ (official 1.5).

    Other arguments: see :class:`GradientBalancingCallback`.

    Logged: ``balance/mmpareto/cos/<m>``, ``balance/mmpareto/w_mm/<m>``, ``balance/mmpareto/conflict/<m>``
    (this step, 0 or 1), ``balance/mmpareto/stationary/<m>`` (0 or 1) and ``balance/mmpareto/conflict_rate/<m>`` (share of the edited steps so far with
    a conflict; checkpointed).

    Example::

        class Model(MultimodalMixin, LightningModule):
            def training_step(self, batch, i):
                logits = self.fuse(features, y)
                return self.add_unimodal_losses(F.cross_entropy(logits, y))

        trainer = Trainer(callbacks=[MMPareto(gamma=1.5)])
    """

    method = "mmpareto"
    check_finite_stats = False  # whole gradients: the derived dot products are checked instead
    edit_order = 10  # merges the gradients as the losses produced them: before any other method edits them
    #: ``|ĝ| <= stationary_tol * sqrt(|g_mm|² + |g_u|²)``: the two gradients cancel (Pareto-stationary step). g_mm is
    #: ``.grad - g_u`` in float32, so below ~1e-3 the Pareto direction is dominated by round-off
    stationary_tol = 1e-3

    def __init__(
        self,
        gamma: float = 1.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not is_number(gamma) or gamma <= 0:
            raise ValueError(f"gamma must be a number > 0, got {gamma!r}.")
        self.gamma = float(gamma)
        self.conflicts: Optional[Tensor] = None  # per modality: edited steps with cos <= 0
        self.stationary: Optional[Tensor] = None  # per modality: edited steps where the two gradients cancel
        self.merges = 0  # edited optimizer steps
        self.merged: Optional[Tensor] = None  # per modality: steps in which its encoder was merged
        self._donated_buffer: Optional[bool] = None
        self._last_stationary: list[float] = []
        self._module: Optional[pl.LightningModule] = None
        self._trainer: Optional[pl.Trainer] = None
        self._trainable: dict[str, list[nn.Parameter]] = {}
        self._stats.copy = False  # the per-loss gradient vectors are fresh tensors: no defensive copy

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._module, self._trainer = pl_module, trainer
        self._trainable = {m: [p for p in ps if p.requires_grad] for m, ps in self._groups.items()}
        frozen = [m for m, ps in self._trainable.items() if not ps]
        if len(frozen) == len(self._trainable):
            raise ModalityContractError(
                f"MMPareto merges each encoder's multimodal and unimodal gradients, but every balanced encoder is "
                f"frozen ({', '.join(frozen)}: all parameters have requires_grad=False). Unfreeze at least one, or "
                f"remove MMPareto while the encoders are frozen."
            )
        if frozen:
            rank_zero_info(f"MMPareto: the encoder(s) of {frozen} are frozen (requires_grad=False) and are left "
                           f"out of the merge.")
        if self.conflicts is None:
            self.conflicts = torch.zeros(len(self.active_modalities))
        if self.stationary is None:
            self.stationary = torch.zeros(len(self.active_modalities))
        import torch._functorch.config as functorch_config

        if self._donated_buffer is None:  # retain_graph=True is refused by compiled backwards with donated buffers
            self._donated_buffer = bool(functorch_config.donated_buffer)
        functorch_config.donated_buffer = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit" and self._donated_buffer is not None:
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = self._donated_buffer
            self._donated_buffer = None

    # ------------------------------------------------------------------ per micro-batch: g_u
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        terms = record.extras.get("objective")
        if terms is None:
            raise ModalityContractError(
                "MMPareto needs the unimodal losses of the step: return "
                "`self.add_unimodal_losses(fused_loss)` from training_step (after self.fuse(features, targets))."
            )
        trainer = pl_module.trainer
        accumulate, amp = loss_scales(trainer, pl_module)
        # one backward for all modalities: L_k reaches no encoder but k's (split head, auxiliary heads and
        # masked fusion all give o_k from z_k alone), so d(sum_k L_k)/d(theta_u) = d(L_u)/d(theta_u)
        names = [m for m in self.active_modalities if self._trainable[m]]
        params = [p for m in names for p in self._trainable[m]]
        objective = sum(terms[m] for m in names) * (accumulate * amp)
        grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
        out, k = {}, 0
        for m in names:
            for j, p in enumerate(self._trainable[m]):
                g = grads[k] if grads[k] is not None else torch.zeros_like(p)
                out[f"grad/{m}/{j:05d}"] = g / amp if amp != 1.0 else g
                k += 1
        return out

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        world = self._trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return stats
        return {k: v.div_(world) for k, v in stats.items()}  # DDP averages .grad; average g_u alike

    # ------------------------------------------------------------------ per optimizer step: merge
    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        cos_all: list[Optional[Tensor]] = []
        w_all: list[Optional[Tensor]] = []
        self._last_stationary = [0.0] * len(self.active_modalities)
        for i, m in enumerate(self.active_modalities):
            params = self._trainable[m]
            owned = {id(p) for p in groups[m]}
            if not params or not owned.intersection(id(p) for p in params):
                cos_all.append(None)
                w_all.append(None)
                continue
            if len(owned) != len(groups[m]) or any(id(p) not in owned for p in params):
                raise ModalityContractError(
                    f"MMPareto merges the gradient of the whole {m!r} encoder; its parameters are split over "
                    f"several optimizers. Put each encoder's parameters in one optimizer."
                )
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            totals = cast(list[Tensor], [p.grad for p in params])  # g_mm + g_u, averaged over ranks by DDP (set above)
            g_uni = [result[f"grad/{m}/{j:05d}"].to(device=device, dtype=p.dtype) for j, p in enumerate(params)]
            # <g_mm, g_u>, |g_mm|^2 and |g_u|^2 from <g, g_u>, |g|^2, |g_u|^2 (g = g_mm + g_u), without
            # materialising g_mm: the common no-conflict step is then a single in-place scale
            total_norms = torch.stack(torch._foreach_norm(totals)).double()
            dot_total = torch.stack([torch.dot(g.reshape(-1), u.reshape(-1)) for g, u in zip(totals, g_uni)]).double().sum()
            sq_uni = torch.stack(torch._foreach_norm(g_uni)).double().square().sum()
            sq_total = total_norms.square().sum()
            dot = dot_total - sq_uni
            sq_mm = (sq_total - 2 * dot_total + sq_uni).clamp_min(0)
            w_mm, w_uni, cos = pareto_weights(dot, sq_mm, sq_uni)
            stationary = pareto_stationary(dot, sq_mm, sq_uni, w_mm, self.stationary_tol)
            finite, agree, cancel, no_uni = torch.stack([torch.isfinite(torch.stack([dot, sq_mm, sq_uni])).all(),
                                                         cos > 0, stationary, sq_uni == 0]).tolist()  # one sync
            if no_uni:  # no sample of the step has the modality (or its unimodal loss is flat): nothing to merge
                agree, cancel = True, False
            if not finite and not self.statistics_finite({"dot": dot, "sq_mm": sq_mm, "sq_uni": sq_uni}, self._step()):
                cos_all.append(None)
                w_all.append(None)
                continue
            if agree:  # uniform weights: the merged gradient is gamma * (g_mm + g_u)
                torch._foreach_mul_(totals, self.gamma)
            elif cancel:  # Pareto-stationary: no common descent direction, the min-norm point is 0
                torch._foreach_zero_(totals)
            else:
                pareto_merge_from_sum_(totals, g_uni, float(w_mm), float(w_uni), self.gamma)
            assert self.conflicts is not None and self.stationary is not None
            self.conflicts = self.conflicts.to(device)
            self.stationary = self.stationary.to(device)
            self.conflicts[i] += float(not agree)
            self.stationary[i] += float(cancel)
            self.merged = self.merged.to(device) if self.merged is not None else torch.zeros_like(self.conflicts)
            self.merged[i] += 1
            self._last_stationary[i] = float(cancel)
            cos_all.append(cos)
            w_all.append(w_mm)
        self.merges += 1
        self._log(cos_all, w_all)

    def _step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else -1

    def _log(self, cos_all: list[Optional[Tensor]], w_all: list[Optional[Tensor]]) -> None:
        trainer, module = self._trainer, self._module
        if not self.log_metrics or trainer is None or module is None or not _logs_this_step(trainer):
            return
        metrics = {}
        for i, m in enumerate(self.active_modalities):
            cos, w_mm = cos_all[i], w_all[i]
            if cos is None:
                continue
            assert w_mm is not None  # appended with cos
            metrics[f"balance/{self.method}/cos/{m}"] = cos
            metrics[f"balance/{self.method}/w_mm/{m}"] = w_mm
            metrics[f"balance/{self.method}/conflict/{m}"] = (cos <= 0).float()
            metrics[f"balance/{self.method}/stationary/{m}"] = torch.tensor(self._last_stationary[i])
            metrics[f"balance/{self.method}/conflict_rate/{m}"] = self.conflicts[i] / self.merged[i].clamp_min(1)  # type: ignore[index]
        log_balance_metrics(module, metrics, on_step=True, on_epoch=False)

    @property
    def conflict_rate(self) -> dict[str, float]:
        """Share of the merged steps of each encoder in which its two gradients conflicted (cos ≤ 0); with
        several optimizers, each encoder counts the steps of the optimizer that owns it."""
        if self.conflicts is None or self.merged is None:
            return {m: 0.0 for m in self.active_modalities}
        return {m: float(self.conflicts[i]) / max(1.0, float(self.merged[i])) for i, m in enumerate(self.active_modalities)}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        conflicts = None if self.conflicts is None else self.conflicts.detach().cpu().clone()
        stationary = None if self.stationary is None else self.stationary.detach().cpu().clone()
        merged = None if self.merged is None else self.merged.detach().cpu().clone()
        return {**super().state_dict(), "conflicts": conflicts, "stationary": stationary, "merged": merged,
                "merges": self.merges}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.conflicts = state_dict.get("conflicts")
        self.stationary = state_dict.get("stationary")
        self.merged = state_dict.get("merged")
        self.merges = int(state_dict.get("merges", 0))

