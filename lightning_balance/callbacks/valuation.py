"""Sample-level (and modality-level) modality valuation (Wei, Feng, Wang, Hu, CVPR 2024) as a Lightning callback.

At the end of every epoch from ``start_epoch − 1`` on, each training sample's modalities are valued (the Shapley
value of "the prediction with only these modalities is correct", in eval mode over the training set), and the
training dataset for the next epoch is rebuilt: the original samples plus copies in which only a low-contributing
modality is kept (:class:`~lightning_balance.data.ValuationDataset`). The math is in
:mod:`lightning_balance.functional.valuation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Optional, cast

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_balance._distributed import check_strategy, gather_samples, shared_generator
from lightning_balance._errors import ModalityContractError
from lightning_balance.callbacks.base import evaluating, forked_rng, is_number, log_balance_metrics, precision_forward, require_contract
from lightning_balance.data.valuation import ValuationDataset
from lightning_balance.functional.diagnostics import subset_correctness
from lightning_balance.functional.valuation import modality_level_copies, sample_level_copies, sample_shapley_values
from lightning_balance.modality import MultimodalMixin

__all__ = ["SampleValuation"]


class SampleValuation(pl.Callback):
    """Value each sample's modalities and re-sample the training data so that weak modalities get extra training.

    Wei, Feng, Wang, Hu. *Enhancing Multimodal Cooperation via Sample-level Modality Valuation.* CVPR 2024
    (official code: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, ``code/sample_level.py``,
    ``code/modality_level.py``).

    Valuation, per training sample ``i`` (eval mode, no gradient), with ``c_i(S)`` whether the fused prediction
    with only the modalities in ``S`` (the others removed through the contract's ``fuse_subset``) is correct::

        v_i(S) = |S| · c_i(S),  v_i(∅) = 0,   φ_{i,m} = Σ_{S ∌ m} |S|!(M−|S|−1)!/M! [v_i(S ∪ m) − v_i(S)]

    ``level="sample"``: sample ``i`` gets ``n_{i,m}`` extra copies that keep only modality ``m``: 1 if
    ``0.4 < φ < 1``, 2 if ``−0.1 < φ < 0.4``, 3 if ``φ < −0.1`` (two modalities: ``φ = 0.5, 0, −0.5``), else 0.
    ``level="modality"`` (two modalities): ``φ̄_m`` the mean over a random ``part_ratio`` of the training set
    (drawn with replacement), ``γ_m = 1 − φ̄_m``, and ``int(α · (2/3) |γ_a − γ_v| · N)`` random samples (with
    replacement) get one copy keeping the modality with the larger gap.

    Args:
        level: ``"sample"`` (official ``sample_level.py``) or ``"modality"`` (``modality_level.py``).
        start_epoch: the first epoch trained on re-sampled data (official ``warmup`` 5); the valuation runs at the
            end of every epoch from ``start_epoch − 1`` on.
        alpha, part_ratio, func: the modality-level rule (official 1, 0.2, ``"linear"``; BalanceBenchmark's config
            says alpha 0.5, which its code never reads).
        seed: of the modality-level draws (identical on every rank).
        log_metrics: log ``balance/valuation/contribution/<m>`` (the mean ``φ`` over the training set, the
            official ``cona``/``conv``) and ``balance/valuation/extra`` (the number of copies) at each valuation.
        allow_untested_strategy: proceed under a strategy other than single device / DDP.

    Needs: the training dataset wrapped in :class:`~lightning_balance.data.ValuationDataset` (lightning_balance's
    datamodules: ``valuation=True``) and kept for the whole fit, ``Trainer(reload_dataloaders_every_n_epochs=1)``
    (the dataset's length changes between epochs; the validation loaders are then rebuilt too), a ``training_step``
    that passes the batch's ``"present"`` to ``fuse``, and ``encode_batch`` (the valuation pass). Learning-rate
    schedulers sized in steps (``estimated_stepping_batches``, OneCycleLR) do not know the grown epochs: use
    epoch-interval schedulers (the official StepLR). Samples with an ``ignore_index`` target are not valued and get no copies; a sample lacking a modality
    gets no copy of it (that modality is a null player in its game), and a sample with fewer than two modalities
    gets none (a copy would equal the sample). Under DDP each rank values its share of the samples, the values are
    gathered, and every rank builds the same copies (the sampler then shards the grown dataset).
    """

    method = "valuation"

    def __init__(self, level: Literal["sample", "modality"] = "sample", start_epoch: int = 5, alpha: float = 1.0,
                 part_ratio: float = 0.2, func: Literal["linear", "tanh", "square"] = "linear", seed: int = 0,
                 log_metrics: bool = True, allow_untested_strategy: bool = False) -> None:
        super().__init__()
        if level not in ("sample", "modality"):
            raise ValueError(f"level must be 'sample' or 'modality', got {level!r}.")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 1:
            raise ValueError(f"start_epoch must be an int >= 1 (the valuation runs at the end of epoch "
                             f"start_epoch − 1), got {start_epoch!r}.")
        if not is_number(alpha) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}.")
        if not is_number(part_ratio) or not 0 < part_ratio <= 1:
            raise ValueError(f"part_ratio must be in (0, 1], got {part_ratio!r}.")
        if func not in ("linear", "tanh", "square"):
            raise ValueError(f"func must be 'linear', 'tanh' or 'square', got {func!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        self.level, self.start_epoch, self.alpha, self.part_ratio = level, start_epoch, float(alpha), float(part_ratio)
        self.func, self.seed = func, seed
        self.log_metrics, self.allow_untested_strategy = log_metrics, allow_untested_strategy
        self.base_index = torch.zeros(0, dtype=torch.long)  # the copies in force (checkpointed)
        self.keep = torch.zeros(0, dtype=torch.long)
        self.contributions: Optional[Tensor] = None  # (N, M) φ of the last valuation (NaN: not valued)
        self.history: list[dict[str, Any]] = []
        self._dataset: Optional[ValuationDataset] = None
        self._verified = False  # a batch with absent modalities reached fuse with its mask
        self._last_loader: Any = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_contract(pl_module, "SampleValuation")
        module = cast(MultimodalMixin, pl_module)  # require_contract checked it
        if self.level == "modality" and len(module.modalities) != 2:
            raise ModalityContractError(
                f"SampleValuation(level='modality') compares two modalities (the official rule); the module has "
                f"{len(module.modalities)}: use level='sample', which values any number."
            )
        check_strategy(trainer.strategy, "SampleValuation", allow_untested=self.allow_untested_strategy)
        if type(module).encode_batch is MultimodalMixin.encode_batch:
            raise ModalityContractError(
                f"SampleValuation values every training sample in its own pass: implement "
                f"{type(pl_module).__name__}.encode_batch(batch) -> (features, targets[, present])."
            )
        # a fresh fit: the copies and values of an earlier fit of this instance are dropped (a checkpoint's state,
        # restored after setup, replaces them)
        self.base_index = torch.zeros(0, dtype=torch.long)
        self.keep = torch.zeros(0, dtype=torch.long)
        self.contributions = None
        self.history = []
        self._last_loader = None
        if trainer.reload_dataloaders_every_n_epochs != 1:  # type: ignore[attr-defined]
            raise ModalityContractError(
                "SampleValuation changes the length of the training dataset between epochs, so the Trainer must "
                "rebuild the training loader every epoch: pass Trainer(reload_dataloaders_every_n_epochs=1)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dataset = _find_dataset(trainer)
        self._verified = False
        missing = sorted(set(cast(MultimodalMixin, pl_module).modalities) - set(self._dataset.modalities))
        if missing:
            raise ModalityContractError(f"SampleValuation: the ValuationDataset's modalities "
                                        f"{list(self._dataset.modalities)} lack the module's {missing}.")
        self._dataset.set_extras(self.base_index, self.keep)  # a resumed fit's copies, before the loader is built

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and trainer.train_dataloader is not None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if dataset is not self._dataset:
                raise ModalityContractError(
                    "SampleValuation: the training loader no longer reads the ValuationDataset it found at the start "
                    "of the fit. Keep one ValuationDataset for the whole fit (build it in the datamodule's setup) and "
                    "return a new DataLoader over it from train_dataloader()."
                )
            loader = trainer.train_dataloader
            if loader is self._last_loader and getattr(loader, "persistent_workers", False) and self.history:
                raise ModalityContractError(
                    "SampleValuation: train_dataloader() returned the same DataLoader with persistent workers again; "
                    "its workers keep the old copy of the dataset and never see the re-sampled copies. Return a new "
                    "DataLoader each time (or persistent_workers=False)."
                )
            self._last_loader = loader

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._verified or not self.base_index.numel() or not _has_absent(batch):
            return
        record = cast(MultimodalMixin, pl_module).balance_record
        if record is not None and record.present is not None:
            self._verified = True  # the module passes the mask on: nothing more to check in this fit
        elif record is not None:
            raise ModalityContractError(
                "SampleValuation: the batch marks modalities as absent (the re-sampled copies) but the module's fuse "
                "call got no presence mask. Pass it on: self.fuse(features, targets, present=batch['present'])."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch - 1 or any(e["epoch"] == epoch for e in self.history):
            return
        with forked_rng(trainer.strategy.root_device):
            phi, present, labelled = self._value(trainer, pl_module)
        names = list(cast(MultimodalMixin, pl_module).modalities)
        n = phi.shape[0]
        if self.level == "sample":
            copies = sample_level_copies(phi)
            copies[~present] = 0
            copies[present.sum(1) < 2] = 0
            copies[~labelled] = 0
            order = self._dataset.modalities  # type: ignore[union-attr]
            keep_idx = torch.tensor([order.index(m) for m in names])
            base = torch.arange(n).repeat_interleave(copies.sum(1))
            keep = keep_idx.repeat(n).repeat_interleave(copies.reshape(-1))
        else:
            generator = shared_generator(self.seed, epoch, torch.device("cpu"))
            pool = labelled.nonzero().flatten()
            chosen = pool[torch.randint(pool.numel(), (int(n * self.part_ratio),), generator=generator)] \
                if pool.numel() else pool
            mean = phi[chosen].mean(0) if chosen.numel() else torch.zeros(2, dtype=phi.dtype)
            count, winner = modality_level_copies(mean, self.alpha, n, self.func)
            # the copies come from the samples that have both modalities (a copy keeping an absent modality would
            # have none); with complete data, every sample, as official
            eligible = (labelled & (present.sum(1) >= 2)).nonzero().flatten()
            base = eligible[torch.randint(eligible.numel(), (count,), generator=generator)] if eligible.numel() \
                else eligible
            keep = torch.full((count,), self._dataset.modalities.index(names[winner]), dtype=torch.long)  # type: ignore[union-attr]
        self.base_index, self.keep = base, keep
        self._dataset.set_extras(base, keep)  # type: ignore[union-attr]
        valued = torch.where(labelled[:, None], phi, torch.full_like(phi, float("nan")))
        self.contributions = valued.float()
        mean_phi = phi[labelled].mean(0) if labelled.any() else torch.zeros(len(names), dtype=phi.dtype)
        entry = {"epoch": epoch, "extra": int(base.numel()),
                 **{f"contribution/{m}": float(mean_phi[i]) for i, m in enumerate(names)},
                 **{f"extra/{m}": int((keep == self._dataset.modalities.index(m)).sum()) for m in names}}  # type: ignore[union-attr]
        self.history.append(entry)
        if self.log_metrics:
            metrics = {f"balance/{self.method}/{k}": torch.tensor(float(v)) for k, v in entry.items() if k != "epoch"}
            log_balance_metrics(pl_module, metrics, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ the valuation pass
    def _value(self, trainer: pl.Trainer, pl_module: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(φ (N, M) float64, present (N, M) bool, labelled (N,) bool)`` of every base sample, on every rank."""
        dataset = self._dataset
        assert dataset is not None
        loader = trainer.train_dataloader
        strategy = trainer.strategy
        rank, world = strategy.global_rank, strategy.world_size  # type: ignore[attr-defined]
        mine = list(range(rank, dataset.num_base, world))  # this rank's share of the samples themselves (no copies)
        batch_size = getattr(loader, "batch_size", None) or 64
        collate = getattr(loader, "collate_fn", None)
        workers = {k: getattr(loader, k) for k in ("num_workers", "pin_memory", "worker_init_fn")
                   if getattr(loader, k, None) is not None}  # a fresh, non-persistent loader
        names = list(pl_module.modalities)
        ignore_index = pl_module.modality_spec.ignore_index
        rows = []
        with evaluating(pl_module):
            for batch in DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, **workers,
                                    **({"collate_fn": collate} if collate is not None else {})):
                batch = strategy.batch_to_device(batch, strategy.root_device)
                batch = trainer.precision_plugin.convert_input(batch)
                with precision_forward(trainer):
                    features, targets, present = pl_module.encoded_batch(batch)
                    correct = subset_correctness(lambda f, s: pl_module.fuse_subset(f, s, present), features,
                                                 targets, names)
                mask = (torch.ones(targets.shape[0], len(names), dtype=torch.bool, device=targets.device)
                        if present is None else torch.stack([present[m] for m in names], 1))
                phi = sample_shapley_values(correct, mask)
                rows.append(torch.cat([phi, mask.double(), (targets != ignore_index).double()[:, None]], 1))
        m = len(names)
        local = torch.cat(rows) if rows else torch.zeros(0, 2 * m + 1, dtype=torch.float64,
                                                        device=strategy.root_device)
        table = gather_samples(local, strategy, interleave=True, total=dataset.num_base).cpu()
        return table[:, :m], table[:, m:2 * m].bool(), table[:, 2 * m].bool()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "base_index": self.base_index.clone(), "keep": self.keep.clone(),
                "contributions": None if self.contributions is None else self.contributions.clone(),
                "history": [dict(e) for e in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_index = state_dict["base_index"].long().cpu()
        self.keep = state_dict["keep"].long().cpu()
        self.contributions = state_dict.get("contributions")
        self.history = [dict(e) for e in state_dict.get("history", [])]


def _has_absent(batch: Any) -> bool:
    present = batch.get("present") if isinstance(batch, Mapping) else None
    if isinstance(present, Tensor):
        return bool((~present.bool()).any())
    if isinstance(present, Mapping):
        return any(bool((~torch.as_tensor(v).bool()).any()) for v in present.values())
    return False


def _find_dataset(trainer: pl.Trainer) -> ValuationDataset:
    """The fit's ValuationDataset: an attribute of the datamodule (or inside a dict/list attribute, or the dataset
    of a DataLoader attribute), or the dataset of the training DataLoader passed to ``fit``."""
    found: list[ValuationDataset] = []

    def visit(value: Any) -> None:
        if isinstance(value, ValuationDataset):
            found.append(value)
        elif isinstance(value, DataLoader) and isinstance(value.dataset, ValuationDataset):
            found.append(value.dataset)

    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if datamodule is not None:
        for value in vars(datamodule).values():
            visit(value)
            if isinstance(value, Mapping):
                for v in value.values():
                    visit(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    visit(v)
    source = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)
    if isinstance(source, DataLoader):
        visit(source)
    elif isinstance(source, pl.LightningModule) and source is not datamodule:  # the module's own train_dataloader
        for value in vars(source).values():
            visit(value)
    unique = list({id(d): d for d in found}.values())
    if len(unique) != 1:
        raise ModalityContractError(
            "SampleValuation re-samples the training data through a ValuationDataset"
            + (f", and found {len(unique)} of them on the datamodule" if unique else ", and found none")
            + ". Wrap the training dataset once, e.g. in the datamodule's setup: `self.train_set = ValuationDataset("
              "train_set, modalities=(...))` and `train_dataloader()` returning `DataLoader(self.train_set, ...)` "
              "(lightning_balance's datamodules: valuation=True)."
        )
    return unique[0]
