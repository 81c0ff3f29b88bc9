"""Explicit Basis Reallocation (EBR) as a loss term that also adapts the features before the fusion."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_balance._distributed import all_reduce_sum
from lightning_balance.functional.ebr import (
    basis_similarity,
    modality_discrimination_loss,
    reverse_gradient,
    substitute_absent,
    substitution_order,
)
from lightning_balance.losses.base import LossTerm
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["ExplicitBasisReallocation"]


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ExplicitBasisReallocation(LossTerm):
    r"""Explicit Basis Reallocation (Chaudhuri et al., "A Closer Look at Multimodal Representation Collapse",
    ICML 2025, §3.4): an encoder-decoder head on top of each modality's encoder, a modality discriminator on the
    shared basis space, and the encoders trained adversarially against it, the fusion unchanged.

    For each modality ``m``: the basis ``g_m = h_m(z_m)`` (a two-layer MLP into a space shared by all modalities)
    and the decoded features ``ẑ_m = h_m^{-1}(g_m)`` (back to ``z_m``'s width), which **the fusion sees instead of**
    ``z_m``: attaching the term is the whole change to the model (``self.configure_loss_terms([ebr])``; the
    mixin applies :meth:`adapt_features` in every ``fuse`` call, training and evaluation). A discriminator ``ψ``
    (a two-layer MLP) predicts from a basis vector which modality it came from; the term's value is its
    cross-entropy ``L_md`` (:func:`~lightning_balance.functional.modality_discrimination_loss`) behind a gradient
    reversal of weight ``λ`` (``adversarial_weight``): ``ψ`` minimises ``L_md``, the encoders and ``h_m`` get
    ``−λ ∇L_md`` (they make the bases modality-indistinguishable) while the task loss (the user's, through the
    fusion) trains everything, ``h_m^{-1}`` included.

    **Schedule** (the paper's C.1: "We interleave between the optimization of [the two criteria] every 10
    epochs"): with ``interleave_epochs=E``, epochs ``[0, E)`` train on the task loss alone, ``[E, 2E)`` add the
    adversarial term, and so on (a third-party reading of the paper; the other reading, discriminator-only and
    encoder-only phases, is not implemented). ``interleave_epochs=None``: the adversarial term every epoch.

    **Sizes**: ``h_m``: ``D → hidden_dim → basis_dim`` (1024, 512), ``h_m^{-1}``: ``basis_dim → hidden_dim → D``,
    ``ψ``: ``basis_dim → hidden_dim → M`` (the paper's C.1 lists "1024 and 512" and a mirrored "512 and 1024" with
    the networks' symbols lost; a third-party re-implementation uses these sizes; see the docs page). Token
    features ``(N, T, D)`` go through the heads token by token, and ``ψ`` sees the basis pooled by the module's
    ``pool_features``.

    **Substitution at test time** (§4.4): after :meth:`fit_substitution` on validation data, with
    ``substitute=True``, a sample lacking modality ``j`` in an evaluation ``fuse`` call gets
    ``ẑ_j = h_j^{-1}(g_k)`` from its best-ranked present modality ``k`` and counts ``j`` as present
    (``record.extras["ebr_substituted"]`` says which); before :meth:`fit_substitution` the fill stands in (warned
    once). An absent sample's placeholder is zeroed before the heads.

    Args:
        feature_dims: modality → feature width ``D`` (the last dimension).
        basis_dim, hidden_dim: the shared basis width and the MLPs' hidden width.
        adversarial_weight: ``λ`` of the gradient reversal.
        interleave_epochs: the schedule's period (``None``: the adversarial term always).
        substitute: substitute absent modalities in evaluation calls (after :meth:`fit_substitution`).
        weight, start_epoch, end_epoch: see :class:`LossTerm`.
    """

    name = "ebr"
    similarity: Tensor  # buffers (registered in __init__)
    order: Tensor

    def __init__(self, feature_dims: dict[str, int], basis_dim: int = 512, hidden_dim: int = 1024,
                 adversarial_weight: float = 0.01, interleave_epochs: Optional[int] = 10, substitute: bool = False,
                 weight: float = 1.0, start_epoch: int = 0, end_epoch: Optional[int] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        if not feature_dims or len(feature_dims) < 2:
            raise ValueError(f"feature_dims must give the width of every modality (at least two), got {feature_dims!r}.")
        for label, value in (("basis_dim", basis_dim), ("hidden_dim", hidden_dim),
                             *((f"feature_dims[{m!r}]", d) for m, d in feature_dims.items())):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}.")
        if isinstance(adversarial_weight, bool) or not isinstance(adversarial_weight, (int, float)) or adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be a number >= 0, got {adversarial_weight!r}.")
        if interleave_epochs is not None and (isinstance(interleave_epochs, bool) or not isinstance(interleave_epochs, int)
                                              or interleave_epochs < 1):
            raise ValueError(f"interleave_epochs must be None or an int >= 1, got {interleave_epochs!r}.")
        self.names = list(feature_dims)
        self.adversarial_weight, self.interleave_epochs, self.substitute = float(adversarial_weight), interleave_epochs, substitute
        self.encoders = nn.ModuleDict({m: _mlp([d, hidden_dim, basis_dim]) for m, d in feature_dims.items()})
        self.decoders = nn.ModuleDict({m: _mlp([basis_dim, hidden_dim, d]) for m, d in feature_dims.items()})
        self.discriminator = _mlp([basis_dim, hidden_dim, len(self.names)])
        m = len(self.names)
        self.register_buffer("similarity", torch.full((m, m), float("nan")))
        self.register_buffer("order", torch.full((m, max(m - 1, 1)), -1, dtype=torch.long))
        self._warned = False

    # ------------------------------------------------------------------ the features the fusion sees
    def basis(self, modality: str, z: Tensor) -> Tensor:
        return self.encoders[modality](z)

    def decode(self, modality: str, g: Tensor) -> Tensor:
        return self.decoders[modality](g)

    def adapt_features(self, module: MultimodalMixin, features: dict[str, Tensor],
                       present: Optional[dict[str, Tensor]], extras: dict[str, Any]
                       ) -> tuple[dict[str, Tensor], Optional[dict[str, Tensor]]]:
        if set(features) != set(self.names):
            raise ModalityContractError(f"ExplicitBasisReallocation has heads for {self.names}, the module fuses "
                                        f"{sorted(features)}; give feature_dims for exactly the declared modalities.")
        wrong = {m: (z.shape[-1], self.encoders[m][0].in_features) for m, z in features.items()  # type: ignore[index]
                 if z.shape[-1] != self.encoders[m][0].in_features}  # type: ignore[index]
        if wrong:
            raise ModalityContractError(f"ExplicitBasisReallocation: feature widths (got, feature_dims) differ for {wrong}.")
        if present is not None:  # the heads never see an absent sample's placeholder (NaN included)
            features = {m: torch.where(present[m].reshape(-1, *([1] * (z.ndim - 1))), z, torch.zeros_like(z))
                        for m, z in features.items()}
        bases = {m: self.basis(m, z) for m, z in features.items()}
        decoded = {m: self.decode(m, g) for m, g in bases.items()}
        extras["ebr_basis"] = bases
        if self.substitute and present is not None and not module.training:
            if int(self.order[0, 0]) < 0:
                if not self._warned:
                    self._warned = True
                    rank_zero_warn("ExplicitBasisReallocation(substitute=True): no substitution order yet (call "
                                   "ebr.fit_substitution(model, val_dataloader) after training); until then absent "
                                   "modalities get the model's fill.")
                return decoded, present
            original = present
            decoded, present = substitute_absent(decoded, bases, present, module.modalities, self.order, self.decode)
            extras["ebr_substituted"] = {m: present[m] & ~original[m] for m in present}
        return decoded, present

    # ------------------------------------------------------------------ the adversarial term
    def adversarial(self, epoch: int) -> bool:
        """Whether ``epoch`` is one of the schedule's adversarial epochs."""
        if self.interleave_epochs is None:
            return True
        return (max(0, epoch - self.start_epoch) // self.interleave_epochs) % 2 == 1

    def forward(self, bases: dict[str, Tensor], present: Optional[dict[str, Tensor]] = None,
                valid: Optional[Tensor] = None, pool: Any = None) -> Tensor:
        """``L_md`` of the reversed, pooled bases (the discriminator's loss; the encoders get ``−λ`` of its gradient);
        ``pool(modality, g)``: one vector per sample (the module's ``pool_features``; default: the mean of tokens)."""
        logits = {}
        for m, g in bases.items():
            pooled = pool(m, g) if pool is not None else (g.mean(dim=tuple(range(1, g.ndim - 1))) if g.ndim > 2 else g)
            logits[m] = self.discriminator(reverse_gradient(pooled, self.adversarial_weight))
        return modality_discrimination_loss(logits, self.names, present, valid)

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        bases = record.extras.get("ebr_basis")
        if bases is None:
            raise ModalityContractError("ExplicitBasisReallocation found no bases on the step's record: attach it "
                                        "with configure_loss_terms before fusing.")
        trainer = module._trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        idle = cast(Tensor, 0.0 * sum(p.sum() for p in self.discriminator.parameters()))  # in the graph every step (DDP)
        if not self.adversarial(epoch):
            return idle, {"adversarial": torch.tensor(0.0)}
        return (self.forward(bases, record.present, record.valid, module.pool_features) + idle,
                {"adversarial": torch.tensor(1.0)})

    # ------------------------------------------------------------------ substitution
    @torch.no_grad()
    def fit_substitution(self, module: MultimodalMixin, dataloader: Iterable, reference: Optional[str] = None,
                         strategy: Any = None) -> Tensor:
        """Rank the modalities by the similarity of their bases on ``dataloader`` (validation data, through the
        module's ``encode_batch``), over the samples that have both of a pair; sets :attr:`similarity` and
        :attr:`order` (checkpointed) and returns the ``(M, M)`` similarity. ``reference``: the paper's one-row
        ranking (by similarity to it; the paper uses the strongest modality); ``None``: pairwise. Under DDP pass
        the Trainer's ``strategy`` to add up every rank's sums."""
        names = list(module.modalities)
        if names != self.names:
            raise ModalityContractError(f"fit_substitution: the module declares {names}, the term has heads for {self.names}.")
        if strategy is None and getattr(module, "_trainer", None) is not None:
            strategy = module.trainer.strategy  # every rank's sums, when the module is attached to a Trainer
        device = next(module.parameters()).device
        was = module.training
        module.eval()
        m = len(names)
        sums = torch.zeros(m, m, dtype=torch.float64, device=device)
        counts = torch.zeros(m, m, dtype=torch.float64, device=device)
        try:
            for batch in dataloader:
                batch = (strategy.batch_to_device(batch, device) if strategy is not None
                         else apply_to_collection(batch, Tensor, lambda t: t.to(device)))
                encoded = module.encode_batch(batch)
                features, present = encoded[0], (encoded[2] if len(encoded) > 2 else None)
                if present is not None:
                    from lightning_balance._presence import normalise_presence

                    first = features[names[0]]
                    present = normalise_presence(present, names, first.shape[0], first.device)
                bases = {k: module.pool_features(k, self.basis(k, features[k])) for k in names}
                s, c = basis_similarity(bases, names, present)
                sums, counts = sums + s, counts + c
        finally:
            module.train(was)
        if strategy is not None:  # every rank, also one without batches
            both = all_reduce_sum(torch.stack([sums, counts]), strategy)
            sums, counts = both[0], both[1]
        if float(counts.sum()) == 0:
            raise ModalityContractError("fit_substitution got no sample (an empty loader).")
        similarity = (sums / counts.clamp_min(1)).float()
        similarity[counts == 0] = float("nan")
        self.similarity.copy_(similarity)
        ref = None if reference is None else names.index(reference)
        self.order.copy_(substitution_order(torch.nan_to_num(similarity, nan=-2.0), ref).to(self.order.device))
        return similarity
