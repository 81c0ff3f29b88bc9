"""AGM as a callback (Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive
Gradient Modulation", ICCV 2023)."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from lightning_balance._taps import GradientTap, mix_gradients
from lightning_balance.callbacks.base import GradientBalancingCallback
from lightning_balance.functional.agm import (
    KAPPA_EXPONENT_CAP,
    agm_coefficients,
    agm_scores,
    sampled_shapley_weights,
    shapley_responses,
    shapley_weights,
)
from lightning_balance.modality import ModalityRecord, MultimodalMixin

__all__ = ["AGM"]


def _classifier_weights(pl_module: Any) -> list[nn.Parameter]:
    """The weight the clip rule watches: the final classifier's (official: ``fc_out.weight``). The declared
    ``head=``; else the last ``nn.Linear`` of the declared fusion; else (an overridden ``fuse_features``) every
    shared weight with ≥ 2 dims."""
    spec = pl_module.modality_spec
    if spec.head_path is not None:
        return [pl_module.get_submodule(spec.head_path).weight]
    linears = [mod for f in pl_module.fusion_modules() for mod in f.modules() if isinstance(mod, nn.Linear)]
    if linears:
        return [cast(nn.Parameter, linears[-1].weight)]  # torch types a module's weight as a Tensor
    return [p for p in pl_module.shared_parameters() if p.ndim >= 2]

_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.AlphaDropout)


class AGM(GradientBalancingCallback):
    r"""Adaptive Gradient Modulation (AGM): modulate each modality's Shapley response in the backward pass.

    **Mono-modal responses.** In every training step the fusion is run again on the recorded features
    with modalities removed (features set to zero), giving ``F(S)`` for every non-empty subset ``S``
    (``F(all)`` is the step's own fused output, ``F(∅) = 0``). The Shapley response of modality ``u``:
    :math:`m_u = \sum_{S \not\ni u} \frac{|S|!(M-|S|-1)!}{M!}[F(S \cup u) - F(S)]`; for two modalities
    ``m_a = ½[F(a,v) − F(0,v) + F(a,0)]``, and ``Σ_u m_u = F(all)``.

    **Coefficients.** With :math:`\ell_u = -\tfrac1N\sum_i \log \max(\sigma(m_{u,i})[y_i], 10^{-8})`,
    :math:`r_u = \exp(\tfrac{M}{M-1}(\bar\ell - \ell_u))`, the same from the running means ``L_u`` of
    ``ℓ_u`` over all previous iterations (:math:`\bar r_u`), and
    :math:`\kappa_u = \exp(\alpha \min(\bar r_u - r_u, \text{clamp}))`. A modality doing better than its
    usual standing (``r_u > r̄_u``) is slowed, one doing worse is boosted.

    **Application.** The gradient reaching ``m_u`` is multiplied by ``κ_u`` (the official identity
    modules with backward hooks). Since ``m_u`` is a linear combination of the ``F(S)``, this is done
    by one gradient tap on the fused logits: ``F(S)`` receives :math:`\sum_u \kappa_u W_{u,S}\, g` where
    ``g`` is the gradient of *your* loss with respect to the fused logits; with ``κ = 1`` training is
    unchanged. Encoders and fusion both feel it, as in the paper.

    **Clip rule** (official CREMA-D code): after backward, if any element of the final classifier's weight
    gradient (the declared ``head=``, or the last ``nn.Linear`` of the declared fusion; with an overridden
    ``fuse_features``, every shared weight) exceeds ``clip`` in magnitude, the total gradient norm of the
    optimizer's parameters is clipped to ``clip`` (with several optimizers: each optimizer's own). As in the official code, the running means are updated and the clip rule is
    applied on every training step, also outside ``start_epoch``..``end_epoch``; only the modulation
    (``κ``) is limited to that window (outside it ``κ = 1``; the official code leaves its hooks at the
    last coefficients of the window instead, which we do not reproduce).

    Differences from the official code: modalities are removed at the **feature** level through the
    module's fusion (no extra encoder passes: ``2^M − 2`` fusion passes exact, at most ``permutations·(M − 1)``
    sampled); the fusion runs
    in eval mode for those passes (as the official padded passes do: every dropout/normalisation layer
    outside the encoders). ``ℓ_u`` is reduced over ranks before
    ``κ`` is computed (one all-reduce of ``M + 1`` numbers per step), so DDP gives the single-process
    result. Because ``κ`` acts inside the backward pass, under gradient accumulation it would be a
    per-micro-batch coefficient: refused unless ``accumulation="per_micro_batch"``. A ``training_step``
    that calls ``fuse`` more than once (two views) gets ``ℓ_u`` over the samples of all its calls and
    every call modulated with the same ``κ``. ``κ`` is computed in float32 from an exponent capped at 80
    (``exp(80) ≈ 5.5e34``), so a large ``α·(r̄ − r)`` saturates instead of overflowing to ``inf``; with
    ``clamp=10`` this cap binds for ``α > 8``. AMP overflow steps (skipped by the GradScaler) leave the
    running means and the iteration count as they were.

    Args:
        alpha: modulation strength α (official default 1.0; BalanceBenchmark uses 0.1).
        clamp: upper clamp of ``r̄ − r`` (official CREMA-D code 10; ``None``: no clamp).
        clip: threshold and max-norm of the clip rule (official 1.0; ``None`` disables it).
        accumulation: ``"raise"`` or ``"per_micro_batch"`` (see above).
        shapley: ``"exact"`` (the official responses: ``2^M − 2`` fusion passes per step) or ``"sampled"`` (ours, for
            many modalities: :func:`~lightning_balance.functional.sampled_shapley_weights`, the prefixes of
            ``permutations`` random orders, at most ``permutations·(M − 1)`` passes; an unbiased estimate of the
            responses ``m_u``, whose scores and ``κ`` are noisy and, being convex functions of it, not unbiased; at
            M = 6 exact costs 62 passes, 8 orders at most 40; cheaper than exact only when
            ``permutations·(M − 1) < 2^M − 2``). Not in the paper.
        permutations: orders per step with ``shapley="sampled"``.
        shapley_seed: seed of the orders (drawn identically on every rank; the draw count is checkpointed).

    Other arguments: see :class:`GradientBalancingCallback` (the official CREMA-D code modulates its 1-based
    epochs 0..20, i.e. the first 20 epochs: ``start_epoch=0, end_epoch=19`` here; default: no end).

    Logged: ``balance/agm/{kappa,score,ratio,target_ratio}/<m>``; ``kappa`` is the applied coefficient (1 outside
    the window, where the running means still advance).

    State (checkpointed): the running means ``L_u``, the iteration count and (sampled) the number of orders drawn.

    Example::

        trainer = Trainer(callbacks=[AGM(alpha=1.0)])
    """

    method = "agm"
    reduce_at = "micro_batch"
    edit_order = 90  # the clip rule: after every other edit, as clipping comes after these hooks in Lightning
    observe_outside_window = True  # running means and the clip rule on every step, as the official code
    designed_for_sgd = True

    def __init__(
        self,
        alpha: float = 1.0,
        clamp: Optional[float] = 10.0,
        clip: Optional[float] = 1.0,
        accumulation: Literal["raise", "per_micro_batch"] = "raise",
        shapley: Literal["exact", "sampled"] = "exact",
        permutations: int = 8,
        shapley_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if shapley not in ("exact", "sampled"):
            raise ValueError(f"shapley must be 'exact' or 'sampled', got {shapley!r}.")
        if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
            raise ValueError(f"permutations must be a positive integer (e.g. 8), got {permutations!r}.")
        if isinstance(shapley_seed, bool) or not isinstance(shapley_seed, int) or shapley_seed < 0:
            raise ValueError(f"shapley_seed must be a non-negative integer, got {shapley_seed!r}.")
        self.shapley = shapley
        self.permutations = permutations
        self.shapley_seed = shapley_seed
        self._draws = 0  # sampled orders drawn so far (checkpointed: a resumed run draws the same ones)
        self._draws_committed = 0  # the count at the last optimizer step taken (a skipped step's draws are undone)
        for name, value in (("alpha", alpha), ("clamp", clamp), ("clip", clip)):
            if value is None and name != "alpha":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0{'' if name == 'alpha' else ' or None'}, got {value!r}.")
        if accumulation not in ("raise", "per_micro_batch"):
            raise ValueError(f"accumulation must be 'raise' or 'per_micro_batch', got {accumulation!r}.")
        if clamp is not None and alpha * clamp > KAPPA_EXPONENT_CAP:
            warnings.warn(
                f"AGM(alpha={alpha}, clamp={clamp}): alpha * clamp = {alpha * clamp:g} exceeds {KAPPA_EXPONENT_CAP:g}, "
                f"so kappa can reach its cap exp({KAPPA_EXPONENT_CAP:g}) ~ 5.5e34 (the official code would give inf "
                f"above exp(88.7)). Such a coefficient multiplies the gradient of a modality by up to 1e34: lower "
                f"alpha (official 1.0) or clamp.",
                stacklevel=2,
            )
        self.alpha = float(alpha)
        self.clamp = None if clamp is None else float(clamp)
        self.clip = None if clip is None else float(clip)
        self.accumulation = accumulation
        self.running: Optional[Tensor] = None  # L_u
        self.iterations = 0  # t
        self._pending: Optional[tuple[Tensor, int]] = None  # (L_u, t) after this optimizer step's batches
        self._weights = torch.zeros(0)
        self._module: Optional[MultimodalMixin] = None
        self._head_weights: list[nn.Parameter] = []
        self._eval_modules: list[nn.Module] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._module = pl_module  # type: ignore[assignment]
        self._head_weights = _classifier_weights(pl_module)
        # the masked passes run in eval mode (as the official padded passes): every dropout/norm layer outside
        # the encoders (the fusion, also an overridden fuse_features' layers); none: no mode switch at all
        module = cast(MultimodalMixin, pl_module)
        in_encoders = {id(mod) for m in module.modalities for enc in module.modality_encoders(m)
                       for mod in enc.modules()}
        self._eval_modules = [mod for mod in pl_module.modules()
                              if isinstance(mod, _MODE_DEPENDENT) and id(mod) not in in_encoders]
        m = len(self.active_modalities)
        self._weights = shapley_weights(m)
        if self.running is None:
            self.running = torch.zeros(m)

    # ------------------------------------------------------------------ forward: the masked fusion passes
    def _subsets(self) -> tuple[list[int], Tensor]:
        """The bit masks of the subsets to fuse (full set last) and the Shapley weights over them: every subset
        (exact), or the prefixes of ``permutations`` orders drawn from a generator seeded by ``shapley_seed`` and
        the count of draws (the same on every rank, and after a resume)."""
        m = len(self.active_modalities)
        if self.shapley == "exact":
            return list(range(1, 2**m)), self._weights
        # (seed, draw) -> a generator seed, without the collisions of an affine mix of the two
        state = np.random.SeedSequence([self.shapley_seed, self._draws]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) % 2**63)
        self._draws += 1
        return sampled_shapley_weights(m, self.permutations, generator)

    def tap_logits(self, module: MultimodalMixin, features: dict[str, Tensor], targets: Optional[Tensor],
                   logits: Tensor, extras: dict[str, Any]) -> Tensor:
        names = self.active_modalities
        subsets, weights = self._subsets()
        fusion = [f for f in self._eval_modules if f.training]
        for f in fusion:
            f.eval()
        try:
            with torch.set_grad_enabled(self.is_editing):  # outside the window only the scores are needed
                masked = []
                for subset in subsets[:-1]:
                    present = {n for b, n in enumerate(names) if subset >> b & 1} | (set(features) - set(names))
                    masked.append(module.fuse_subset(features, present, present=extras.get("present")))
        finally:
            for f in fusion:
                f.train()
        stacked = torch.stack([o.detach() for o in (*masked, logits)])
        if not self.is_editing:
            extras["agm"] = {"tap": None, "subsets": stacked, "weights": weights}
            return logits
        tap = GradientTap()
        extras["agm"] = {"tap": tap, "subsets": stacked, "weights": weights}
        return mix_gradients(tap, logits, *masked)

    # ------------------------------------------------------------------ statistics → coefficients → taps
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        data = record.extras.get("agm")
        if data is None:
            raise RuntimeError("AGM found no masked fusion passes on the step record; was it registered on the module?")
        responses = shapley_responses(data["subsets"].float(), data["weights"])
        counted = record.counted_stack(self.active_modalities)  # a modality's score over the samples that have it
        scores = agm_scores(responses, record.valid_targets(), valid=record.valid if counted is None else counted)
        return {"scores": scores, "count": record.modality_counts(self.active_modalities)}

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        losses = stats["scores"] / stats["count"].clamp_min(1)
        running, t = self._pending if self._pending is not None else (self.running, self.iterations)
        assert running is not None
        running = running.to(losses.device)
        kappa, r, r_bar = agm_coefficients(losses, running, self.alpha, self.clamp)
        if not self.step_has_labels:  # no labelled sample (with some modality): kappa = 1, running means unchanged
            return {"kappa": torch.ones_like(kappa), "score": losses, "ratio": r, "target_ratio": r_bar}
        t += 1
        self._pending = (running * (t - 1) / t + losses / t, t)  # committed once the optimizer step is taken
        if not self.is_editing:  # outside the window the gradients are not modulated: log what was applied
            kappa = torch.ones_like(kappa)
        return {"kappa": kappa, "score": losses, "ratio": r, "target_ratio": r_bar}

    def commit_step(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device,
                    active: bool) -> None:
        if self._pending is not None:
            self.running, self.iterations = self._pending
            self._pending = None
        self._draws_committed = self._draws

    def discard_step(self) -> None:
        self._pending = None
        self._draws = self._draws_committed  # a step the GradScaler skips leaves the orders' sequence as it was

    def prepare_backward(self, pl_module: MultimodalMixin, record: ModalityRecord, result: dict[str, Tensor],
                         loss_scale: float) -> None:
        data = record.extras.get("agm")
        if data is None or data["tap"] is None:
            return
        per_subset = result["kappa"] @ data["weights"].to(result["kappa"].device)  # one per fused subset, full last
        data["tap"].coefficients = torch.cat([per_subset[-1:], per_subset[:-1]])

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"{k}/{m}": result[k][i] for k in ("kappa", "score", "ratio", "target_ratio")
                for i, m in enumerate(self.active_modalities)}

    # ------------------------------------------------------------------ optimizer step: the clip rule
    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        if self.clip is None or self._module is None or self._optimizer is None:
            return
        owned = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
        head = [p.grad for p in self._head_weights if id(p) in owned and p.grad is not None]
        if not head:
            return
        if bool(torch.stack([g.abs().amax() for g in head]).amax() > self.clip):
            params = [p for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        running = None if self.running is None else self.running.detach().cpu().clone()
        return {**super().state_dict(), "running": running, "iterations": self.iterations, "draws": self._draws}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.running = state_dict.get("running")
        self.iterations = int(state_dict.get("iterations", 0))
        self._draws = self._draws_committed = int(state_dict.get("draws", 0))
