"""CML as a loss term (Ma et al., "Calibrating Multimodal Learning", ICML 2023)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_balance._distributed import shared_generator
from lightning_balance.functional.cml import _GATES, Gate, chain_steps, cml_objective, removal_chains
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["CMLLoss"]


class CMLLoss(LossTerm):
    r"""Calibrating Multimodal Learning: removing a modality must not make the model more confident.

    Per sample, a random removal order gives nested subsets ``S_0 = all ⊃ S_1 ⊃ … ⊃ S_{M-1}``; the
    model predicts on each (removed modalities' features set to zero, through your fusion). With the
    confidence of the predicted class :math:`\mathrm{Conf}^{(j)}_i = \max_c \sigma(f(x_i^{S_j}))_c`, the
    official objective (``QingyangZhang/CML``, ``miwae/train.py`` l. 280-304) is

    .. math::
        L_{off} = \frac1M \sum_{j=0}^{M-1} \mathrm{CE}(f(x^{S_j}), y) + \lambda \sum_i R_i, \qquad
        R_i = \sum_j g^{(j)}_i [\mathrm{Conf}^{(j+1)}_i - \mathrm{Conf}^{(j)}_i - \epsilon]_+
              + w^{(j)}_i [\mathrm{Conf}^{(j+1)}_i - \mathrm{sg}(\mathrm{Conf}^{(j)}_i) - \epsilon]_+

    with ``g = 1[S_j predicts y]``, ``w = 1[S_j and S_{j+1} both wrong]`` (gradient into the smaller
    subset only), ``R`` **summed** over the batch and ``λ = β/100 = 0.1``. Your loss supplies
    ``CE(f(x^{S_0}), y)`` with weight 1, so the term returns

    .. math:: \mu \sum_{j \ge 1} \mathrm{CE}(f(x^{S_j}), y) + M \lambda \sum_i R_i

    and your loss plus the term is ``M · L_off``: every weight relative to the others is the official one
    (``μ = 1``); the overall factor ``M`` is a learning-rate factor for SGD and nothing for Adam.

    For a concat + linear head, zeroing a modality's features is exactly BalanceBenchmark's split-head
    subtraction (``f − W_m z_m``); for other fusions it is feature masking (``2^M − 2`` fusion passes). The
    official code imputes removed raw inputs with the dataset mean instead.

    The removal orders come from a generator seeded by ``(seed, number of training steps so far)``, both
    kept in the term's buffer ``rng_state``: it is identical on every rank, travels in the model's
    checkpoint (a resumed run draws what the uninterrupted run draws) and DDP broadcasts it. Only training
    steps advance it. Samples whose target is the declared ``ignore_index`` are left out of every
    cross-entropy and of the ranking term. A sample that lacks modalities (``fuse(..., present=...)``) has the
    chain of the modalities it has: ``S_0`` = its present set, then they are removed in a random order; its
    absent modalities add no cross-entropy and no ranking term (:func:`~lightning_balance.functional.chain_steps`).

    Under DDP the sum runs over each rank's batch, as the official code sums over the batch it sees:
    after DDP's gradient averaging the ranking weight is that of a single process with the per-rank batch.
    Multiply ``rank_weight`` by the number of ranks for the global batch's weight, or use
    ``reduction="mean"``.

    Args:
        rank_weight: λ, the official ``β/100`` (README command ``--beta 10``: 0.1).
        subset_weight: μ, each smaller subset's cross-entropy relative to yours on all modalities (official 1;
            0 adds only the ranking term).
        margin: ε (official 0).
        gate: ``"larger_correct"`` (official MIWAE code), ``"cpm"`` (official CPM-Nets code: every sample but
            those whose larger subset is wrong and smaller subset right) or ``"all"``.
        both_wrong: add the official second ranking term for samples that both subsets get wrong.
        reduction: ``"sum"`` over the batch (official) or ``"mean"`` (batch-size invariant, not the official
            objective). With two modalities, ``reduction="mean", both_wrong=False, rank_weight=λ/2`` is the
            variant this library shipped first (``λ · mean_i R_i`` plus the subset's cross-entropy).
        seed: seed of the removal orders; ``None`` draws one from torch's global RNG at construction (so
            ``seed_everything`` before building the model makes runs reproducible).
        weight, start_epoch, end_epoch: see :class:`LossTerm`.

    Standalone: ``CMLLoss()(chain_logits, targets)`` with ``chain_logits`` of shape ``(M, N, C)``.
    """

    name = "cml"
    rng_state: Tensor  # a buffer (registered in __init__)

    def __init__(self, rank_weight: float = 0.1, subset_weight: float = 1.0, margin: float = 0.0,
                 gate: Gate = "larger_correct", both_wrong: bool = True,
                 reduction: Literal["sum", "mean"] = "sum", seed: Optional[int] = None, weight: float = 1.0,
                 start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        for n, v in (("rank_weight", rank_weight), ("subset_weight", subset_weight), ("margin", margin)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{n} must be a number >= 0, got {v!r}.")
        if gate not in _GATES:
            raise ValueError(f"gate must be one of {_GATES}, got {gate!r}.")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' (official) or 'mean', got {reduction!r}.")
        if not isinstance(both_wrong, bool):
            raise ValueError(f"both_wrong must be True or False, got {both_wrong!r}.")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}.")
        self.rank_weight, self.subset_weight, self.margin = float(rank_weight), float(subset_weight), float(margin)
        self.gate, self.both_wrong, self.reduction = gate, both_wrong, reduction
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        # (seed, training steps so far): a buffer, so it is checkpointed with the model and DDP broadcasts it
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.long))
        self._rng: Optional[list[int]] = None  # host copy of rng_state, re-read when the buffer was written
        self._rng_version = -1

    def _stream(self, advance: bool) -> torch.Generator:
        """The generator of this step's removal orders; ``advance`` counts the step."""
        if self._rng is None or self.rng_state._version != self._rng_version:
            self._rng = [int(v) for v in self.rng_state.tolist()]  # once, and after a load or a DDP broadcast
        seed, counter = self._rng
        generator = shared_generator(seed, counter, torch.device("cpu"))
        if advance:
            self._rng[1] = counter + 1
            self.rng_state[1] = counter + 1  # host -> device write, no sync
            self._rng_version = self.rng_state._version
        return generator

    def forward(self, chain_logits: Tensor, targets: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """The term's value on ``(M, N, C)`` chain logits (``[0]`` on all modalities); ``valid``: optional
        ``(N,)`` mask of the samples to count."""
        return self._objective(chain_logits, targets, valid)[0]

    def _objective(self, chain_logits: Tensor, targets: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return cml_objective(chain_logits, targets, self.rank_weight, self.subset_weight, self.margin, self.gate,
                             self.both_wrong, self.reduction, valid)

    def chain_logits(self, module: MultimodalMixin, record: ModalityRecord,
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """``(M, N, C)`` logits on each sample's chain of subsets (``[0]``: the step's fused logits), the
        orders drawn from ``generator`` (default: the term's stream, which a training record advances)."""
        names = module.modalities
        m, n = len(names), record.batch_size
        device = record.logits.device
        if generator is None:
            generator = self._stream(advance=record.training and torch.is_grad_enabled())
        matrix = None if record.present is None else torch.stack([record.present[k] for k in names], 1)
        order = removal_chains(m, n, generator=generator, device=device, present=matrix)  # (N, M), absent first
        present = torch.ones(m, n, m, dtype=torch.bool, device=device)  # [j, i, modality]
        for j in range(1, m):
            present[j:, torch.arange(n, device=device), order[:, j - 1]] = False
        # logits of every non-empty subset, by bit mask, then each sample's own subset per chain step
        full = 2**m - 1
        by_mask = {full: record.logits}
        for mask in range(1, full):
            by_mask[mask] = module.fuse_subset(record.features, [k for b, k in enumerate(names) if mask >> b & 1],
                                               present=record.present)
        stacked = torch.stack([by_mask[k] for k in range(1, full + 1)])  # (2^M - 1, N, C)
        weights = (2 ** torch.arange(m, device=device)).view(1, 1, m)
        masks = (present.long() * weights).sum(-1)  # (M, N) subset mask per chain step and sample
        return stacked[masks - 1, torch.arange(n, device=device).unsqueeze(0)]

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        if record.targets is None:
            raise ModalityContractError("CMLLoss needs targets: call self.fuse(features, targets).")
        if len(module.modalities) < 2:
            raise ModalityContractError("CMLLoss needs at least two modalities.")
        chains = self.chain_logits(module, record)
        valid = record.valid
        assert valid is not None  # the record has targets
        steps = None
        if record.present is not None:
            steps = chain_steps(torch.stack([record.present[k] for k in module.modalities], 1))
        value, penalty = cml_objective(chains, record.valid_targets(), self.rank_weight, self.subset_weight,
                                       self.margin, self.gate, self.both_wrong, self.reduction, valid, steps)
        count = valid.sum().clamp_min(1)
        return value, {"penalty": penalty.sum() / count, "violations": ((penalty > 0) & valid).sum() / count}

    def extra_repr(self) -> str:
        return (f"rank_weight={self.rank_weight}, subset_weight={self.subset_weight}, margin={self.margin}, "
                f"gate={self.gate!r}, both_wrong={self.both_wrong}, reduction={self.reduction!r}")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the removal orders were checkpointed have no rng_state: keep this one
        state_dict.setdefault(prefix + "rng_state", self.rng_state.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rng = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._rng = None  # a copy (deepcopy, ddp_spawn) re-reads its buffer
