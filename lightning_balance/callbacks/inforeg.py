"""InfoReg as a callback (Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition", CVPR 2025)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_balance.callbacks.base import GradientBalancingCallback, is_number, log_balance_metrics
from lightning_balance.functional.inforeg import (
    fisher_trace_increment,
    inforeg_coefficients,
    prime_window_indicator,
)
from lightning_balance.functional.scores import modality_scores, stack_modalities
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["InfoReg"]

_WINDOW_RULES = ("own", "any", "all")


class InfoReg(GradientBalancingCallback):
    r"""Information-acquisition regulation (InfoReg): slow the dominant encoder during its prime learning window.

    **Fisher trace.** For every modality ``u``, over each epoch ``e``, from the final gradients of the
    encoder's weight tensors (after this callback's own edit, as in the official code):
    :math:`T_u(e) = \sum_\ell \operatorname{mean}(\sum_{t \in e} g_{\ell,t}^2)`.

    **Prime learning window.** At the start of epoch ``e``:
    :math:`k_e = (T(e-1) - T(e-1-W)) / \sum_{j=e-W}^{e-1} T(j)` (history pre-padded with ``W`` zeros,
    ``k_0 = 1``); the window is open while ``k_e > threshold``.

    **Regulation.** Per optimizer step, with the scores ``s_u = Σ_i σ(o_{u,i})[y_i]`` of the global
    batch, the dominant modality ``u = argmax s`` gets, if its window is open,
    :math:`\beta_u = c_u \exp(\tanh(s_u - \max_{k \ne u} s_k))` and every parameter of its encoder
    :math:`g \leftarrow g + \beta_u (\theta - \theta^{(e)})`, with :math:`\theta^{(e)}` the encoder's
    parameters at the start of the epoch (a proximal term :math:`\tfrac{\beta_u}{2}\lVert\theta -
    \theta^{(e)}\rVert^2`). The other modalities are untouched.

    Generalisations of the official code, which hard-wires two modalities, the constants 0.95 (audio)
    and 0.10 (visual) and watches only the audio encoder's trace: ``strength`` sets ``c_u`` per
    modality; ``window_from`` says whose trace opens the window (``"own"``: each modality's own, the
    default; ``"any"``/``"all"``: any/all modalities' windows; or one modality's name, as the official
    ``"audio"``); with M > 2 the dominant modality is compared with the runner-up. The official
    behaviour is :meth:`InfoReg.official`. The paper also trains with the unimodal losses
    ``CE(o_a, y) + CE(o_v, y)`` added to the fused loss; this callback does not change the loss: return
    ``self.add_unimodal_losses(loss)`` from your ``training_step`` to reproduce the full recipe.

    Deviations needed outside one GPU: scores are summed over micro-batches and ranks (one all-reduce)
    and the edit happens once per optimizer step on the accumulated, unscaled gradients, so the Fisher
    trace is accumulated once per optimizer step from gradients identical on every rank.

    Args:
        strength: ``c_u``: one number for every modality, or a mapping modality → number
            (official: ``{"audio": 0.95, "visual": 0.10}``).
        threshold: the window is open while ``k_e > threshold`` (official 0.05).
        window: ``W``, epochs averaged by the indicator (official 10).
        window_from: ``"own"``, ``"any"``, ``"all"`` or a modality name (see above).
        score: ``"sum"`` (official: batch sums, so ``tanh`` of their difference saturates and
            ``β ≈ c·e`` whenever one modality leads) or ``"mean"`` (mean true-class probability,
            batch-size independent).
        modalities, start_epoch, end_epoch, nonfinite, allow_untested_strategy, log_metrics: see
            :class:`GradientBalancingCallback`.

    Logged: ``balance/inforeg/confidence/<m>`` and ``balance/inforeg/beta/<m>`` per logged step;
    ``balance/inforeg/trace/<m>``, ``balance/inforeg/window_k/<m>`` and ``balance/inforeg/window_open/<m>``
    per epoch.

    State (checkpointed): the trace history, the current epoch's trace accumulators, and the
    epoch-start snapshot of the encoders (one extra copy of the encoder parameters).

    Example::

        trainer = Trainer(callbacks=[InfoReg(strength=0.95)])
        trainer = Trainer(callbacks=[InfoReg.official(audio="audio", visual="video")])
    """

    method = "inforeg"

    def __init__(
        self,
        strength: Union[float, Mapping[str, float]] = 0.95,
        threshold: float = 0.05,
        window: int = 10,
        window_from: str = "own",
        score: Literal["sum", "mean"] = "sum",
        modalities: Optional[Sequence[str]] = None,
        start_epoch: int = 0,
        end_epoch: Optional[int] = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        allow_untested_strategy: bool = False,
        log_metrics: bool = True,
    ) -> None:
        super().__init__(
            modalities=modalities,
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            nonfinite=nonfinite,
            allow_untested_strategy=allow_untested_strategy,
            log_metrics=log_metrics,
        )
        if isinstance(strength, Mapping):
            bad = {k: v for k, v in strength.items() if not is_number(v) or v < 0}
            if bad or not strength:
                raise ValueError(f"strength must map modality names to numbers >= 0, got {dict(strength)!r}.")
            strength = {str(k): float(v) for k, v in strength.items()}
        elif not is_number(strength) or strength < 0:
            raise ValueError(f"strength must be a number >= 0 or a mapping modality -> number, got {strength!r}.")
        else:
            strength = float(strength)
        if not is_number(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}.")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}.")
        if not isinstance(window_from, str) or not window_from:
            raise ValueError(f"window_from must be 'own', 'any', 'all' or a modality name, got {window_from!r}.")
        if score not in ("sum", "mean"):
            raise ValueError(f"score must be 'sum' or 'mean', got {score!r}.")
        self.strength = strength
        self.threshold = float(threshold)
        self.window = window
        self.window_from = window_from
        self.score = score
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
        self._current_epoch = 0

    @classmethod
    def official(cls, audio: str = "audio", visual: str = "visual", **kwargs: Any) -> InfoReg:
        """The official CREMA-D configuration: ``c = 0.95`` for ``audio``, ``0.10`` for ``visual``, the
        window opened by the audio encoder's trace, batch-sum scores, threshold 0.05 over 10 epochs."""
        kwargs.setdefault("strength", {audio: 0.95, visual: 0.10})
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

    def _strengths(self, device: torch.device) -> Tensor:
        names = self.active_modalities
        values = [self.strength[m] if isinstance(self.strength, dict) else self.strength for m in names]
        return torch.tensor(values, dtype=torch.float32, device=device)

    # ------------------------------------------------------------------ epoch-level state
    def _finalize_trace(self) -> None:
        if self._trace is not None and self._trace_epoch is not None:
            self.history.append([float(v) for v in self._trace.tolist()])
        self._trace, self._trace_epoch = None, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._trace_epoch is not None and self._trace_epoch < epoch:
            self._finalize_trace()
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
            open_ = [own[names.index(self.window_from)]] * len(names)
        self._window_k = ks
        self._window_open = torch.tensor(open_, dtype=torch.bool)
        if self._snapshot_epoch != epoch:  # a resume in the middle of an epoch keeps the loaded snapshot
            self._snapshot = {m: [p.detach().clone() for p in ps] for m, ps in self._groups.items()}
            self._snapshot_epoch = epoch
        self._snap_by_id = {id(p): s for m, ps in self._groups.items() for p, s in zip(ps, self._snapshot[m])}
        if self.log_metrics and self.is_active(trainer):
            metrics = {}
            for i, m in enumerate(names):
                metrics[f"balance/{self.method}/window_k/{m}"] = torch.tensor(ks[i])
                metrics[f"balance/{self.method}/window_open/{m}"] = torch.tensor(float(open_[i]))
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trace = self._trace
        self._finalize_trace()
        if trace is not None and self.log_metrics:
            metrics = {f"balance/{self.method}/trace/{m}": trace[i] for i, m in enumerate(self.active_modalities)}
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ per step
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        logits = stack_modalities(record.unimodal_logits(), self.active_modalities)
        scores = modality_scores(logits, record.targets)
        return {"scores": scores, "count": scores.new_tensor([record.batch_size])}

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        scores = stats["scores"] if self.score == "sum" else stats["scores"] / stats["count"]
        beta = inforeg_coefficients(scores, self._strengths(scores.device), self._window_open)
        return {"confidence": stats["scores"] / stats["count"], "beta": beta}

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for i, m in enumerate(self.active_modalities):
            out[f"confidence/{m}"] = result["confidence"][i]
            out[f"beta/{m}"] = result["beta"][i]
        return out

    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        betas = result["beta"].tolist()
        for beta, m in zip(betas, self.active_modalities):
            if beta == 0.0:
                continue
            pairs = [(p, self._snap_by_id[id(p)]) for p in groups[m] if p.grad is not None]
            if pairs:
                grads = [p.grad for p, _ in pairs]
                diffs = torch._foreach_sub([p.detach() for p, _ in pairs], [s for _, s in pairs])
                torch._foreach_add_(grads, diffs, alpha=beta)
        increments = []
        for m in self.active_modalities:
            owned = {id(p) for p in groups[m]}
            grads = [p.grad for p in self._weights[m] if id(p) in owned and p.grad is not None]
            increments.append(fisher_trace_increment(grads).to(device))
        step = torch.stack(increments)
        self._trace = step if self._trace is None else self._trace + step
        self._trace_epoch = self._current_epoch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self._current_epoch = trainer.current_epoch
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

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
