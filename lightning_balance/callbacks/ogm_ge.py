"""OGM-GE as a callback (Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional, Union, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_balance._distributed import broadcast_seed, shared_generator
from lightning_balance.callbacks.base import GradientBalancingCallback
from lightning_balance.functional.ogm import ge_noise_std, ogm_coefficients
from lightning_balance.functional.scores import modality_scores, present_sums, stack_modalities
from lightning_balance.modality import ModalityRecord, MultimodalMixin

__all__ = ["OGMGE"]

_PARAM_RULES = {
    "conv": lambda p: p.ndim >= 3,
    "weights": lambda p: p.ndim >= 2,
    "all": lambda p: True,
}
ParamRule = Literal["auto", "conv", "weights", "all"]


def _conv_kernels(pl_module: MultimodalMixin, modality: str) -> list[nn.Parameter]:
    """The weights of the convolution modules (``Conv1d/2d/3d`` and transposed) of ``modality``'s encoders."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for encoder in pl_module.modality_encoders(modality):
        for mod in encoder.modules():
            if isinstance(mod, nn.modules.conv._ConvNd) and id(mod.weight) not in seen:
                seen.add(id(mod.weight))
                out.append(cast(nn.Parameter, mod.weight))  # torch types a module's weight as a Tensor
    return out


class OGMGE(GradientBalancingCallback):
    r"""On-the-fly Gradient Modulation with Generalization Enhancement (OGM-GE), or plain OGM.

    Per optimizer step, from the unimodal logits ``o_m`` of the global batch ``B``:

    .. math::

        s_m = \sum_{i \in B} \mathrm{softmax}(o_{m,i})_{y_i}, \qquad
        \rho_m = \frac{s_m}{\tfrac{1}{M-1}\sum_{k \ne m} s_k}, \qquad
        k_m = \begin{cases} 1 - \tanh(\alpha \rho_m) & \rho_m > 1 \\ 1 & \text{otherwise} \end{cases}

    and for every selected gradient tensor ``g`` of modality ``m``:
    ``g ← k_m g`` (OGM) or ``g ← k_m g + h``, ``h ~ N(0, (std(g) + 1e-8)^2 I)`` (OGM-GE), with ``std``
    over the elements of the unmodulated ``g``. The noise is added to every modality's tensors while
    modulation is active, as in the official code. For M = 2 the ratio is the paper's ``s_a / s_v``;
    for M > 2 each modality is compared with the mean of the others (our generalisation).

    Deviations from the official code, all needed for correctness outside one GPU: scores are summed
    over micro-batches and ranks (one all-reduce) and the edit happens once per optimizer step on the
    accumulated, unscaled gradients, so DDP/accumulation give the single-process result; the noise
    comes from a generator seeded by ``(seed, step)``, identical on all ranks and checkpointed; scores
    are clamped at ``eps`` so a near-zero score cannot produce a NaN.

    Args:
        alpha: modulation strength α (official README: 0.1 on VGGSound, 0.8 on CREMA-D).
        noise: add the GE noise (OGM-GE). ``False`` gives plain OGM.
        params: which tensors of each modality's encoders are edited: ``"auto"`` (default: a convolutional
            encoder, whose convolution kernels hold at least half of its weights, gets its kernels only, as
            the official code, which edits the 4-D conv kernels of its ResNets; any other encoder — MLP,
            transformer, ViT — gets every tensor with ≥ 2 dims, its weight matrices), ``"conv"`` (the
            kernels of the encoder's ``Conv1d/2d/3d`` modules), ``"weights"`` (every tensor with ≥ 2 dims,
            BalanceBenchmark's choice), ``"all"``;
            or a mapping modality → one of these, to choose per modality (e.g. a Conv1d audio encoder and an
            MLP visual encoder: ``{"audio": "conv", "visual": "weights"}``). Biases and normalisation
            parameters are edited only with ``"all"``.
        end_epoch: last epoch with modulation, inclusive (official default 50, so this default differs from the
            base class's ``None``); ``None`` for no end.
        eps: lower clamp of the scores.
        seed: seed of the noise stream; ``None`` draws one on rank 0 from torch's global RNG (so
            ``seed_everything`` makes runs reproducible) and broadcasts it.

    Other arguments: see :class:`GradientBalancingCallback` (the default ``start_epoch=0`` is the official one).

    Logged on the steps that reach the loggers (the Trainer's ``log_every_n_steps``):
    ``balance/ogm/confidence/<m>`` (mean true-class probability ``s_m / N``), ``balance/ogm/ratio/<m>``
    and ``balance/ogm/coeff/<m>``.

    Example::

        trainer = Trainer(callbacks=[OGMGE(alpha=0.8)])

    .. warning:: OGM-GE was designed and published with SGD. An adaptive optimizer (Adam, AdamW, ...)
       divides each gradient by its running magnitude and largely cancels the modulation; in our trial
       with AdamW it cost accuracy. The callback warns when it sees one (docs/methods/ogm_ge.md).
    """

    method = "ogm"
    edit_order = 20  # after MMPareto's merge of the raw loss gradients, before InfoReg's proximal term
    designed_for_sgd = True

    def __init__(
        self,
        alpha: float = 0.1,
        noise: bool = True,
        params: Union[ParamRule, Mapping[str, ParamRule]] = "auto",
        end_epoch: Optional[int] = 50,
        eps: float = 1e-8,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(end_epoch=end_epoch, **kwargs)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}.")
        rules = ("auto", *_PARAM_RULES)
        if isinstance(params, Mapping):
            bad = {k: v for k, v in params.items() if not isinstance(k, str) or v not in rules}
            if bad or not params:
                raise ValueError(f"params must map modality names to one of {list(rules)}, got {dict(params)!r}.")
            params = {str(k): cast(ParamRule, str(v)) for k, v in params.items()}
        elif params not in rules:
            raise ValueError(f"params must be one of {list(rules)} or a mapping modality -> rule, got {params!r}.")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0, got {eps!r}.")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}.")
        self.alpha = float(alpha)
        self.noise = noise
        self.params = params
        self.eps = float(eps)
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(self.params, dict):
            declared = pl_module.modalities if isinstance(pl_module, MultimodalMixin) else ()
            unknown = [m for m in self.params if m not in declared]
            if declared and unknown:
                from lightning_balance.modality import ModalityContractError

                raise ModalityContractError(
                    f"OGMGE(params={self.params}) names unknown modalities {unknown}; the module declares {list(declared)}."
                )
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.seed is None and self.noise:
            self.seed = broadcast_seed(trainer.strategy)

    def parameter_rule(self, pl_module: MultimodalMixin, modality: str) -> str:
        """The rule (``"conv"``, ``"weights"`` or ``"all"``) that selects ``modality``'s edited tensors.

        ``"auto"``: ``"conv"`` for a convolutional encoder — one whose convolution kernels hold at least half of
        its weight parameters (a ResNet; not a ViT, whose only convolution is a small patch embedding) — and
        ``"weights"`` for any other."""
        rule = self.params.get(modality, "auto") if isinstance(self.params, dict) else self.params
        if rule == "auto":
            kernels = sum(p.numel() for p in _conv_kernels(pl_module, modality))
            weights = sum(p.numel() for p in pl_module.modality_parameters(modality) if p.ndim >= 2)
            rule = "conv" if kernels and 2 * kernels >= weights else "weights"
        return rule

    def select_parameters(self, pl_module: MultimodalMixin, modality: str) -> list[nn.Parameter]:
        rule = self.parameter_rule(pl_module, modality)
        if rule == "conv":
            return _conv_kernels(pl_module, modality)
        return [p for p in pl_module.modality_parameters(modality) if _PARAM_RULES[rule](p)]

    def _empty_group_message(self, modality: str) -> str:
        return (
            f"OGMGE(params={self.params!r}) selected no parameters for modality {modality!r}: its encoder has no "
            f"tensor the rule selects (the official OGM-GE edits convolution kernels; 'weights' selects every "
            f"weight matrix). Use params='auto' (the default), 'weights' or 'all', or a mapping per modality."
        )

    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        logits = record.unimodal_logits()
        names = self.active_modalities
        stacked = stack_modalities(logits, names)
        counted = record.counted_stack(names)  # None: complete record, every modality counts every valid sample
        assert record.targets is not None and record.valid is not None  # needs_targets: the records have targets
        scores = modality_scores(stacked, record.targets, record.valid if counted is None else counted)
        return {"scores": scores, "count": record.modality_counts(names),
                "total": record.valid.sum().float().reshape(1)}

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.step_has_labels:  # no labelled sample, or none with some modality: no evidence, no edit, no noise
            return {}
        # with absent modalities each sum is over the samples that have the modality: rescaled to the step's
        # labelled samples (exactly the official sums when every sample has every modality)
        sums = present_sums(stats["scores"], stats["count"], stats["total"])
        ratios, coeffs = ogm_coefficients(sums, self.alpha, self.eps)
        return {"scores": stats["scores"], "count": stats["count"], "ratios": ratios, "coeffs": coeffs}

    def metrics(self, result: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        confidence = result["scores"] / result["count"].clamp_min(1)
        for i, m in enumerate(self.active_modalities):
            out[f"confidence/{m}"] = confidence[i]
            out[f"ratio/{m}"] = result["ratios"][i]
            out[f"coeff/{m}"] = result["coeffs"][i]
        return out

    def edit(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device) -> None:
        coeffs = result["coeffs"].to(device)
        generator = shared_generator(self.seed or 0, self.num_edits, device) if self.noise else None
        for i, m in enumerate(self.active_modalities):
            grads = [p.grad for p in groups[m] if p.grad is not None and p.grad.numel() > 0]
            if not grads:
                continue
            k = coeffs[i]
            if generator is None:
                torch._foreach_mul_(grads, k)
                continue
            for g in grads:
                std = ge_noise_std(g)  # of the unmodulated gradient
                noise = torch.empty_like(g).normal_(generator=generator)
                g.mul_(k).addcmul_(noise, std.to(g.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
