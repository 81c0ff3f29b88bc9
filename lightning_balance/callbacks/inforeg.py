"""InfoReg as a callback (Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition", CVPR 2025)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_balance.callbacks.base import GradientBalancingCallback, is_number, log_balance_metrics
from lightning_balance.functional.inforeg import (
    fisher_trace_increment,
    inforeg_coefficients,
    prime_window_indicator,
)
from lightning_balance.functional.scores import modality_scores, present_sums, stack_modalities
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["InfoReg"]

_WINDOW_RULES = ("first", "own", "any", "all")
#: the official CREMA-D constants: c = 0.95 for the first modality (the paper's audio), 0.10 for the others
PAPER_STRENGTH = (0.95, 0.10)


class InfoReg(GradientBalancingCallback):
    r"""Information-acquisition regulation (InfoReg): slow the dominant encoder during its prime learning window.

    The defaults are the published method for two modalities (the official CREMA-D code): the first
    declared modality plays the paper's audio role, the second its visual role.

    **Objective.** The module trains with the unimodal losses of the split head,
    :math:`L = \mathrm{CE}(f, y) + \mathrm{CE}(o_1, y) + \mathrm{CE}(o_2, y)`: return
    ``self.add_unimodal_losses(loss)`` from ``training_step`` (the callback checks it; pass
    ``unimodal_losses=False`` to train without them, which is not the published method).

    **Fisher trace.** For every modality ``u``, over each epoch ``e``, from the final gradients of the
    encoder's weight tensors (after every edit of the step, InfoReg's own included, as in the official code),
    on every step of training (also outside ``start_epoch``/``end_epoch``):
    :math:`T_u(e) = \sum_\ell \operatorname{mean}(\sum_{t \in e} g_{\ell,t}^2)`.

    **Prime learning window.** At the start of epoch ``e``:
    :math:`k_e = (T(e-1) - T(e-1-W)) / \sum_{j=e-W}^{e-1} T(j)` (history pre-padded with ``W`` zeros,
    ``k_0 = 1``); the window is open while ``k_e > threshold``. By default (``window_from="first"``) the
    first modality's trace opens or closes the window of every modality, as the official code does with
    the audio encoder's.

    **Regulation.** Per optimizer step, with the scores ``s_u = Σ_i σ(o_{u,i})[y_i]`` of the global
    batch (sums, as the official code), the dominant modality ``u = argmax s`` gets, if its window is open,
    :math:`\beta_u = c_u \exp(\tanh(s_u - \max_{k \ne u} s_k))` and every parameter of its encoder
    :math:`g \leftarrow g + \beta_u (\theta - \theta^{(e)})`, with :math:`\theta^{(e)}` the encoder's
    parameters at the start of the epoch (a proximal term :math:`\tfrac{\beta_u}{2}\lVert\theta -
    \theta^{(e)}\rVert^2`). The other modalities are untouched. Official constants: ``c = 0.95`` for
    audio, ``0.10`` for visual.

    **Generalisation beyond the paper** (documented, not published): with M > 2 modalities the default
    gives the first modality 0.95 and every other 0.10, and the dominant modality is compared with the
    runner-up. ``strength`` takes one number for all modalities, a sequence in declared order or a
    mapping; ``window_from="own"`` lets each modality's own trace open its window (``"any"``/``"all"``: any/all
    modalities' windows); ``score="mean"`` uses mean instead of summed scores (batch-size independent).
    A run with such settings is a variant of InfoReg, and is reported as one.

    Deviations needed outside one GPU: scores are summed over micro-batches and ranks (one all-reduce)
    and the edit happens once per optimizer step on the accumulated, unscaled gradients, so the Fisher
    trace is accumulated once per optimizer step from gradients identical on every rank. Steps that the
    AMP GradScaler skips (fp16 overflow) add nothing to the trace. The official code computes the trace
    on ``Conv2d``/``Linear`` weights; here on every encoder tensor with ≥ 2 dims (conv kernels of any
    dimension, linear and attention projections, embeddings).

    Args:
        strength: ``c_u``: one number for every modality, a sequence in declared order (a shorter one
            repeats its last entry), or a mapping modality → number. Default: the paper's ``(0.95, 0.10)``.
        threshold: the window is open while ``k_e > threshold`` (official 0.05).
        window: ``W``, epochs averaged by the indicator (official 10).
        window_from: ``"first"`` (the first balanced modality's trace; official), ``"own"``, ``"any"``,
            ``"all"``, or a modality name.
        score: ``"sum"`` (official: batch sums, so ``tanh`` of their difference saturates and
            ``β ≈ c·e`` whenever one modality leads) or ``"mean"``.
        unimodal_losses: require the unimodal losses in the objective (the published recipe).

    Other arguments: see :class:`GradientBalancingCallback` (the official code regulates in every epoch: the
    default window). With ``epoch_length``, the trace history, the snapshot and the window are per block of that
    many optimizer steps.

    Logged: ``balance/inforeg/confidence/<m>`` and ``balance/inforeg/beta/<m>`` per logged step;
    ``balance/inforeg/trace/<m>``, ``balance/inforeg/window_k/<m>`` and ``balance/inforeg/window_open/<m>``
    per epoch; with ``epoch_length``, with each logged step instead (the current block's window and the last
    closed block's trace: a block is not a Trainer epoch, so an epoch mean would mix blocks). A fit of a single
    epoch without ``epoch_length`` warns at its end: the window was decided once, from no history.

    State (checkpointed): the trace history, the current epoch's trace accumulators, and the
    parameter snapshot of the current epoch (so resuming, also inside an epoch, regulates toward the
    same point).

    Example::

        class Model(MultimodalMixin, LightningModule):
            def training_step(self, batch, i):
                logits = self.fuse(features, y)
                return self.add_unimodal_losses(F.cross_entropy(logits, y))

        trainer = Trainer(callbacks=[InfoReg()])          # the paper's method, first modality = audio
        trainer = Trainer(callbacks=[InfoReg.official(audio="sound", visual="image")])

    .. warning:: InfoReg was designed and published with SGD; the callback warns when it is paired with
       an adaptive optimizer (in our trial with AdamW it cost accuracy; docs/methods/inforeg.md).
    """

    method = "inforeg"
    edit_order = 30  # adds its proximal term to the (possibly modulated) gradient, then measures the final one
    observe_outside_window = True  # the official trace history covers every epoch
    designed_for_sgd = True

    def __init__(
        self,
        strength: Union[float, Sequence[float], Mapping[str, float]] = PAPER_STRENGTH,
        threshold: float = 0.05,
        window: int = 10,
        window_from: str = "first",
        score: Literal["sum", "mean"] = "sum",
        unimodal_losses: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(strength, Mapping):
            bad = {k: v for k, v in strength.items() if not is_number(v) or v < 0}
            if bad or not strength:
                raise ValueError(f"strength must map modality names to numbers >= 0, got {dict(strength)!r}.")
            strength = {str(k): float(v) for k, v in strength.items()}
        elif isinstance(strength, (list, tuple)):
            if not strength or not all(is_number(v) and v >= 0 for v in strength):
                raise ValueError(f"strength must be a non-empty sequence of numbers >= 0, got {strength!r}.")
            strength = tuple(float(v) for v in strength)
        elif not is_number(strength) or strength < 0:
            raise ValueError(f"strength must be a number >= 0, a sequence or a mapping modality -> number, "
                             f"got {strength!r}.")
        else:
            strength = float(strength)
        if not is_number(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}.")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}.")
        if not isinstance(window_from, str) or not window_from:
            raise ValueError(f"window_from must be one of {list(_WINDOW_RULES)} or a modality name, got {window_from!r}.")
        if score not in ("sum", "mean"):
            raise ValueError(f"score must be 'sum' or 'mean', got {score!r}.")
        self.strength = strength
        self.threshold = float(threshold)
        self.window = window
        self.window_from = window_from
        self.score = score
        self.unimodal_losses = bool(unimodal_losses)
        # state
        self.history: list[list[float]] = []  # per epoch: trace of each active modality
        self._trace: Optional[Tensor] = None  # running sum for the current epoch
        self._trace_epoch: Optional[int] = None
        self._snapshot: dict[str, list[Tensor]] = {}
        self._snapshot_epoch: Optional[int] = None
        self._snap_by_id: dict[int, Tensor] = {}
        self._window_open = torch.ones(0, dtype=torch.bool)
        self._window_k: list[float] = []
        self._weights: dict[str, list[nn.Parameter]] = {}
        self._epoch = 0

    @classmethod
    def official(cls, audio: str = "audio", visual: str = "visual", **kwargs: Any) -> InfoReg:
        """The official CREMA-D configuration with the modalities named: ``c = 0.95`` for ``audio``, ``0.10``
        for ``visual``, the window opened by the audio encoder's trace, batch-sum scores, threshold 0.05
        over 10 epochs, unimodal losses required."""
        kwargs.setdefault("strength", {audio: PAPER_STRENGTH[0], visual: PAPER_STRENGTH[1]})
        kwargs.setdefault("window_from", audio)
        kwargs.setdefault("modalities", [audio, visual])
        return cls(**kwargs)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        names = self.active_modalities
        if isinstance(self.strength, dict):
            missing = [m for m in names if m not in self.strength]
            unknown = [m for m in self.strength if m not in names]
            if missing or unknown:
                raise ModalityContractError(
                    f"InfoReg(strength={self.strength}) must give one strength per balanced modality {list(names)}"
                    + (f"; missing: {missing}" if missing else "")
                    + (f"; unknown: {unknown}" if unknown else "")
                    + "."
                )
        if self.window_from not in _WINDOW_RULES and self.window_from not in names:
            raise ModalityContractError(
                f"InfoReg(window_from={self.window_from!r}) must be one of {list(_WINDOW_RULES)} or a balanced "
                f"modality {list(names)}."
            )
        self._weights = {m: [p for p in ps if p.ndim >= 2] for m, ps in self._groups.items()}
        if not self._window_open.numel():
            self._window_open = torch.ones(len(names), dtype=torch.bool)
        if isinstance(self.strength, tuple) and self.window_from == "first":
            roles = ", ".join(f"{m}: c={c}" for m, c in zip(names, self._strength_values()))
            rank_zero_info(f"InfoReg: {roles}; the window follows the Fisher trace of {names[0]!r} (the paper's audio "
                           f"role is the first declared modality).")

    def _strength_values(self) -> list[float]:
        names = self.active_modalities
        if isinstance(self.strength, dict):
            return [self.strength[m] for m in names]
        if isinstance(self.strength, tuple):
            return [self.strength[min(i, len(self.strength) - 1)] for i in range(len(names))]
        return [self.strength] * len(names)

    # ------------------------------------------------------------------ epoch-level state
    def _finalize_trace(self, pl_module: Optional[pl.LightningModule] = None) -> None:
        trace = self._trace
        if trace is not None and self._trace_epoch is not None:
            self.history.append([float(v) for v in trace.tolist()])
            if pl_module is not None and self.log_metrics and self.epoch_length is None:
                metrics = {f"balance/{self.method}/trace/{m}": trace[i] for i, m in enumerate(self.active_modalities)}
                log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)
        self._trace, self._trace_epoch = None, None

    def begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        self._epoch = epoch
        if self._trace_epoch is not None and self._trace_epoch < epoch:
            self._finalize_trace(None)  # with epoch_length, the closed block's trace is logged with each step
        names = self.active_modalities
        per_modality = list(zip(*self.history)) if self.history else [() for _ in names]
        ks = [prime_window_indicator(list(h), self.window) for h in per_modality]
        own = [k > self.threshold for k in ks]
        if self.window_from == "own":
            open_ = own
        elif self.window_from == "any":
            open_ = [any(own)] * len(names)
        elif self.window_from == "all":
            open_ = [all(own)] * len(names)
        else:
            source = 0 if self.window_from == "first" else names.index(self.window_from)
            open_ = [own[source]] * len(names)
        self._window_k = ks
        self._window_open = torch.tensor(open_, dtype=torch.bool)
        if self._snapshot_epoch != epoch:  # a resume inside an epoch keeps the loaded snapshot
            self._snapshot = {m: [p.detach().clone() for p in ps] for m, ps in self._groups.items()}
            self._snapshot_epoch = epoch
        self._snap_by_id = {id(p): s for m, ps in self._groups.items() for p, s in zip(ps, self._snapshot[m])}
        if self.log_metrics and self.is_active(trainer) and self.epoch_length is None:
            metrics = {}  # with epoch_length these are logged with each step (metrics): a block is not an epoch
            for i, m in enumerate(names):
                metrics[f"balance/{self.method}/window_k/{m}"] = torch.tensor(ks[i])
                metrics[f"balance/{self.method}/window_open/{m}"] = torch.tensor(float(open_[i]))
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch_length is None:  # with epoch_length, the block's trace closes when the next block begins
            self._finalize_trace(pl_module)

    # ------------------------------------------------------------------ per step
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        if self.unimodal_losses and "objective" not in record.extras:
            raise ModalityContractError(
                "InfoReg trains with the unimodal losses of the paper (L = CE(fused) + sum_m CE(unimodal_m)): return "
                "`self.add_unimodal_losses(fused_loss)` from training_step (after self.fuse(features, targets)), or "
                "pass InfoReg(unimodal_losses=False) to run the variant without them."
            )
        names = self.active_modalities
        logits = stack_modalities(record.unimodal_logits(), names)
        counted = record.counted_stack(names)  # None: complete record
        assert record.targets is not None and record.valid is not None  # needs_targets: the records have targets
        scores = modality_scores(logits, record.targets, record.valid if counted is None else counted)
        return {"scores": scores, "count": record.modality_counts(names),
                "total": record.valid.sum().float().reshape(1)}

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        count = stats["count"].clamp_min(1)
        confidence = stats["scores"] / count  # mean over the labelled samples that have the modality
        # "sum": the official batch sums; with absent modalities rescaled to the step's labelled samples
        scores = present_sums(stats["scores"], stats["count"], stats["total"]) if self.score == "sum" else confidence
        strengths = torch.tensor(self._strength_values(), dtype=torch.float32, device=scores.device)
        beta = inforeg_coefficients(scores, strengths, self._window_open)
        if not self.step_has_labels:  # no sample with some modality (or no label): nothing to compare, no pull
            beta = torch.zeros_like(beta)
        return {"confidence": confidence, "beta": beta}

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for i, m in enumerate(self.active_modalities):
            out[f"confidence/{m}"] = result["confidence"][i]
            out[f"beta/{m}"] = result["beta"][i]
            if self.epoch_length is not None:  # the block's window, and the trace of the last closed block
                out[f"window_k/{m}"] = torch.tensor(float(self._window_k[i]))
                out[f"window_open/{m}"] = self._window_open[i].float()
                if self.history:
                    out[f"trace/{m}"] = torch.tensor(self.history[-1][i])
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.epoch_length is None and self._epoch == 0 and trainer.global_step > 0 and not trainer.interrupted:
            rank_zero_warn(
                f"InfoReg ran a single epoch ({trainer.global_step} optimizer steps): its prime-learning window is "
                f"decided at each epoch start from the Fisher traces of the epochs before, so it was decided once, "
                f"from no history (open), and never re-evaluated. When training by steps (max_steps, an iterable "
                f"loader, one long epoch), set epoch_length to the number of optimizer steps of one of the paper's "
                f"epochs.",
                category=UserWarning,
            )

    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        if not self.is_editing:  # outside start/end: the trace is still measured (commit_step), no regulation
            return
        betas = result["beta"].tolist()
        for beta, m in zip(betas, self.active_modalities):
            if beta == 0.0:
                continue
            pairs = [(p, self._snap_by_id[id(p)]) for p in groups[m] if p.grad is not None]
            if pairs:
                grads = cast(list[Tensor], [p.grad for p, _ in pairs])  # not None: filtered above
                diffs = torch._foreach_sub([p.detach() for p, _ in pairs], [s for _, s in pairs])
                torch._foreach_add_(grads, diffs, alpha=beta)

    def commit_step(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device,
                    active: bool) -> None:
        # the Fisher trace of the step's final gradient, on every step of training
        increments = []
        for m in self.active_modalities:
            owned = {id(p) for p in groups[m]}
            grads = [p.grad for p in self._weights[m] if id(p) in owned and p.grad is not None]
            increments.append(fisher_trace_increment(grads).to(device))
        step = torch.stack(increments)
        self._trace = step if self._trace is None else self._trace + step
        self._trace_epoch = self._epoch

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": [list(h) for h in self.history],
            "trace": None if self._trace is None else self._trace.detach().cpu().clone(),
            "trace_epoch": self._trace_epoch,
            "snapshot": {m: [s.detach().cpu().clone() for s in ss] for m, ss in self._snapshot.items()},
            "snapshot_epoch": self._snapshot_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [list(h) for h in state_dict.get("history", [])]
        self._trace = state_dict.get("trace")
        self._trace_epoch = state_dict.get("trace_epoch")
        self._snapshot = dict(state_dict.get("snapshot", {}))
        self._snapshot_epoch = state_dict.get("snapshot_epoch")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # loaded state lives on the CPU; move it next to the parameters
        device = pl_module.device
        if self._trace is not None:
            self._trace = self._trace.to(device)
        self._snapshot = {m: [s.to(device) for s in ss] for m, ss in self._snapshot.items()}
