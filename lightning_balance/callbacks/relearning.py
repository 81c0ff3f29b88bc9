"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024) as a Lightning callback.

After every ``every_n_epochs``-th epoch (at most ``max_reinits`` times), before the next one starts: each modality's pooled
encoder features of every training sample and of every held-out training sample (the datamodule's
``holdout_dataloader()``), in eval mode; per modality and split, Min-Max scaling to ``[-1, 1]``, K-Means with one
cluster per class and the purity of the clusters; the gap ``Δ_m = |P_m^train − P_m^holdout|`` gives the strength
``α_m = tanh(λ Δ_m)``, and every parameter of modality ``m``'s declared encoders moves back toward its value at
the start of training, ``θ_m ← α_m θ_m⁰ + (1 − α_m) θ_m``. The math is in
:mod:`lightning_balance.functional.relearning`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_balance._distributed import check_strategy, gather_samples
from lightning_balance._errors import ModalityContractError
from lightning_balance._presence import normalise_presence
from lightning_balance.callbacks.base import (
    require_contract,
    evaluating,
    is_number,
    log_balance_metrics,
    precision_forward,
    training_batches,
)
from lightning_balance.functional.relearning import (
    canonical_order,
    cluster_purity,
    kmeans,
    minmax_scale,
    relearning_strength,
    soft_reinit_,
)
from lightning_balance.modality import MultimodalMixin

__all__ = ["Relearning"]

Clusterer = Callable[[Tensor, int], Tensor]


class Relearning(pl.Callback):
    """Diagnose each modality from the separability of its features, and softly re-initialise its encoders.

    Wei, Li, Feng, Hu. *Diagnosing and Re-learning for Balanced Multimodal Learning.* ECCV 2024
    (official code: GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py``).

    For modality ``m``, with ``P`` the purity of K-Means clusters (``k`` = number of classes) of its pooled,
    Min-Max scaled encoder features::

        Δ_m = |P_m(train) − P_m(held-out)|,   α_m = tanh(λ · Δ_m),   θ_m ← α_m θ_m⁰ + (1 − α_m) θ_m

    A modality whose representation separates the training data much better than unseen data is memorising
    (large ``Δ``) and is pulled back harder toward its initialisation ``θ⁰``; a modality that has learned little
    has a small gap and keeps most of what it learned. Re-initialisation follows epochs
    ``e = every_n_epochs, 2·every_n_epochs, ...`` (0-based, ``e > 0``), at most ``max_reinits`` times: after epoch
    ``e``'s validation and checkpoint, at the start of epoch ``e + 1`` (the official order), so none follows the
    last epoch.

    Args:
        strength: ``λ`` (official ``move_lambda``: 3).
        every_n_epochs: ``R`` (official ``reinit_epoch``: 20 of 90 epochs; BalanceBenchmark: 15).
        max_reinits: ``K`` (official ``reinit_num``: 3; BalanceBenchmark: 2).
        num_classes: clusters per K-Means; ``None``: the width of the fused logits.
        n_init, max_iter, seed: the K-Means (k-means++ seeding from ``seed``; official: scikit-learn's ``KMeans``
            with ``random_state=0``, whose default ``n_init`` is 1 for k-means++ since scikit-learn 1.4).
        max_samples: cluster at most this many samples per modality and split (a seeded subset, for large data
            sets; ``None``: all, as in the official code).
        clusterer: ``(features (n, d), k) -> cluster ids (n,)`` to replace the built-in K-Means (e.g. one from
            scikit-learn); it receives the scaled features on the CPU.
        log_metrics: log ``balance/relearning/{purity_train,purity_holdout,gap,alpha}/<modality>`` per re-init.
        allow_untested_strategy: proceed under a strategy other than single device / DDP.

    The held-out part is a part of the training data (never validation or test): lightning_balance's
    datamodules give it with ``holdout_fraction=0.1``. Samples whose target is the module's ``ignore_index``, and
    samples without modality ``m`` (the presence mask), are left out of ``m``'s diagnosis. The features are the
    encoders' outputs (``encode_batch``, before any feature adapter), under the Trainer's precision. The optimizer's
    state (momentum, Adam moments) is kept, as in the official code; BatchNorm running statistics are not touched;
    frozen parameters (``requires_grad=False``) are not re-initialised.
    Under DDP each rank encodes its shard of the training data, the features are gathered (and put in an order that
    depends on their values only, so that the clustering equals one process's), and rank 0's ``α`` is broadcast.
    """

    method = "relearning"

    def __init__(self, strength: float = 3.0, every_n_epochs: int = 20, max_reinits: int = 3,
                 num_classes: Optional[int] = None, n_init: int = 1, max_iter: int = 300, seed: int = 0,
                 max_samples: Optional[int] = None, clusterer: Optional[Clusterer] = None, log_metrics: bool = True,
                 allow_untested_strategy: bool = False) -> None:
        super().__init__()
        if not is_number(strength) or not math.isfinite(strength) or strength < 0:
            raise ValueError(f"strength (λ) must be a finite number >= 0, got {strength!r}.")
        for name, value in (("every_n_epochs", every_n_epochs), ("max_reinits", max_reinits), ("n_init", n_init),
                            ("max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        for name, bound in (("num_classes", num_classes), ("max_samples", max_samples)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 2):
                raise ValueError(f"{name} must be None or an int >= 2, got {bound!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        if clusterer is not None and not callable(clusterer):
            raise ValueError(f"clusterer must be callable (features, k) -> cluster ids, got {clusterer!r}.")
        self.strength = float(strength)
        self.every_n_epochs, self.max_reinits = every_n_epochs, max_reinits
        self.num_classes, self.n_init, self.max_iter, self.seed = num_classes, n_init, max_iter, seed
        self.max_samples, self.clusterer = max_samples, clusterer
        self.log_metrics, self.allow_untested_strategy = log_metrics, allow_untested_strategy
        self.initial: Optional[dict[str, list[Tensor]]] = None  # θ⁰ per modality, on the CPU
        self.history: list[dict[str, Any]] = []  # one entry per diagnosis (epoch, purities, gaps, α)
        self._loaded = False  # state came from a checkpoint (load_state_dict) for the coming fit
        self._first_epoch = 0  # the first epoch this fit trained without the callback's state

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_contract(pl_module, "Relearning")
        check_strategy(trainer.strategy, "Relearning", allow_untested=self.allow_untested_strategy)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is None or not callable(getattr(datamodule, "holdout_dataloader", None)):
            raise ModalityContractError(
                "Relearning diagnoses each modality on a held-out part of the training data (never validation or "
                "test): use a datamodule with holdout_dataloader() (lightning_balance's datamodules: pass "
                "holdout_fraction=0.1)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # θ⁰: the parameters when training starts; a checkpoint's θ⁰ and history when its state was loaded. A
        # callback reused for another fit starts afresh.
        module = cast(MultimodalMixin, pl_module)  # setup checked the contract
        if not self._loaded:
            self.initial = {m: [p.detach().cpu().clone() for p in module.modality_parameters(m)]
                            for m in module.modalities}
            self.history = []
            if trainer.current_epoch > 0:
                rank_zero_warn(
                    f"Relearning was added to a fit resumed at epoch {trainer.current_epoch} without its state: its "
                    f"initial parameters θ⁰ are the resumed ones, and only epochs from here on are re-initialised.",
                    category=UserWarning,
                )
        self._first_epoch = trainer.current_epoch if not self._loaded else 0
        self._loaded = False
        assert self.initial is not None
        for m in module.modalities:
            params = module.modality_parameters(m)
            saved = self.initial.get(m, [])
            if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
                raise ModalityContractError(
                    f"Relearning: the initial parameters kept for modality {m!r} ({len(saved)} tensors) do not match "
                    f"its encoders now ({len(params)} tensors): the checkpoint comes from another model."
                )

    # The re-initialisation after epoch e runs at the start of epoch e + 1: after epoch e's validation and its
    # checkpoint (as in the official loop: train, evaluate, save, re-initialise), so a checkpoint of epoch e holds
    # the weights its score was measured on. Lightning skips on_train_epoch_start for the epoch that follows a
    # checkpoint taken at an epoch's last batch, and trains that epoch from its first batch: run there instead.
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_relearn(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._maybe_relearn(trainer, pl_module)

    def _maybe_relearn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch - 1  # the epoch that just ended
        if epoch >= self._first_epoch and self._due(epoch):
            self._relearn(trainer, pl_module, epoch)

    def _due(self, epoch: int) -> bool:
        if epoch <= 0 or epoch % self.every_n_epochs or len(self.history) >= self.max_reinits:
            return False
        return all(entry["epoch"] != epoch for entry in self.history)

    # ------------------------------------------------------------------ the diagnosis and the re-initialisation
    def _relearn(self, trainer: pl.Trainer, pl_module: Any, epoch: int) -> None:
        modalities = list(pl_module.modalities)
        train = self._features(trainer, pl_module, trainer.train_dataloader, gather=True)
        holdout = self._features(trainer, pl_module, trainer.datamodule.holdout_dataloader(),  # type: ignore[attr-defined]
                                 gather=False)
        entry: dict[str, Any] = {"epoch": epoch}
        alphas = torch.zeros(len(modalities), dtype=torch.float64)
        for i, m in enumerate(modalities):
            p_train = self._purity(train, m, pl_module, "training")
            p_holdout = self._purity(holdout, m, pl_module, "held-out")
            if p_train is None or p_holdout is None:
                continue
            alphas[i] = relearning_strength(p_train, p_holdout, self.strength)
            entry.update({f"purity_train/{m}": p_train, f"purity_holdout/{m}": p_holdout,
                          f"gap/{m}": abs(p_train - p_holdout)})
        if trainer.strategy.world_size > 1:  # type: ignore[attr-defined]  # rank 0's strengths everywhere: the ranks' parameters stay identical
            alphas = trainer.strategy.broadcast(alphas, src=0)
        for i, m in enumerate(modalities):
            alpha = float(alphas[i])
            entry[f"alpha/{m}"] = alpha
            assert self.initial is not None
            pairs = [(p, p0) for p, p0 in zip(pl_module.modality_parameters(m), self.initial[m]) if p.requires_grad]
            soft_reinit_([p for p, _ in pairs], [p0 for _, p0 in pairs], alpha)  # frozen parameters stay as they are
        self.history.append(entry)
        if self.log_metrics:
            metrics = {f"balance/{self.method}/{k}": torch.tensor(float(v)) for k, v in entry.items() if k != "epoch"}
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    def _features(self, trainer: pl.Trainer, pl_module: Any, loader: Any, gather: bool) -> dict[str, Any]:
        """Per modality, the pooled features and targets of the loader's labelled samples that have it (eval mode,
        no gradient); the training features of every rank (``gather``)."""
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ModalityContractError(
                "Relearning iterates the training and held-out DataLoaders; with several training loaders (a "
                "CombinedLoader) it cannot tell which to diagnose."
            )
        modalities = pl_module.modalities
        ignore_index = pl_module.modality_spec.ignore_index
        classes = self.num_classes
        parts: dict[str, list[Tensor]] = {m: [] for m in modalities}
        labels: dict[str, list[Tensor]] = {m: [] for m in modalities}
        names = list(modalities)
        with evaluating(pl_module):
            for batch in training_batches(trainer, loader):
                with precision_forward(trainer):
                    encoded = pl_module.encode_batch(batch)  # the encoders' own outputs (no feature adapter)
                features, targets = encoded[0], encoded[1]
                first = features[names[0]]
                present = normalise_presence(encoded[2] if len(encoded) > 2 else None, names, first.shape[0],
                                             first.device)
                valid = targets != ignore_index
                if classes is None:  # one cluster per class: the width of the fused logits
                    with precision_forward(trainer):
                        classes = int(pl_module.fuse_subset({k: v[:1] for k, v in features.items()},
                                                            modalities).shape[-1])
                for m in modalities:
                    keep = valid if present is None else valid & present[m]
                    parts[m].append(pl_module.pool_features(m, features[m]).float()[keep])
                    labels[m].append(targets[keep])
        out: dict[str, Any] = {"classes": classes}
        for m in modalities:
            if not parts[m]:
                raise ModalityContractError("Relearning: a loader it diagnoses on gave no batch.")
            z, y = torch.cat(parts[m]), torch.cat(labels[m])
            if gather:
                width = z.shape[1]
                rows = gather_samples(torch.cat([z, y[:, None].to(z)], 1), trainer.strategy)
                z, y = rows[:, :width], rows[:, width].long()
            out[m] = (z, y)
        return out

    def _purity(self, data: dict[str, Any], m: str, pl_module: Any, split: str) -> Optional[float]:
        z, y = data[m]
        k = self.num_classes if self.num_classes is not None else data["classes"]
        if min(z.shape[0], self.max_samples or z.shape[0]) < k:
            rank_zero_warn(f"Relearning: modality {m!r} has {z.shape[0]} labelled {split} samples (max_samples="
                           f"{self.max_samples}), fewer than the {k} clusters; it is not diagnosed and not "
                           f"re-initialised this time.", category=UserWarning)
            return None
        order = canonical_order(z)
        if self.max_samples is not None and order.numel() > self.max_samples:
            pick = torch.randperm(order.numel(), generator=torch.Generator().manual_seed(self.seed))[: self.max_samples]
            order = order[pick.sort().values.to(order.device)]
        z, y = minmax_scale(z[order]), y[order]
        if self.clusterer is not None:
            clusters = torch.as_tensor(self.clusterer(z.cpu(), k)).long().reshape(-1).cpu()
            if clusters.shape[0] != z.shape[0]:
                raise ValueError(f"Relearning: the clusterer returned {clusters.shape[0]} cluster ids for "
                                 f"{z.shape[0]} samples; it must return one per row.")
            return cluster_purity(y.cpu(), clusters)
        clusters, _ = kmeans(z, k, seed=self.seed, n_init=self.n_init, max_iter=self.max_iter)
        return cluster_purity(y, clusters)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": [dict(e) for e in self.history],
                "initial": None if self.initial is None else {m: [t.clone() for t in ts]
                                                               for m, ts in self.initial.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = True
        self.history = [dict(e) for e in state_dict.get("history", [])]
        initial = state_dict.get("initial")
        self.initial = None if initial is None else {m: [t.cpu() for t in ts] for m, ts in initial.items()}
