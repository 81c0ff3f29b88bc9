"""Collapse diagnostics on validation data: which modality dominates, which is ignored, which encoder is
under-learned, with the evidence (Shapley contribution, missing-modality accuracy, probes, rank, CKA, VIF)."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_balance._distributed import gather_samples
from lightning_balance._errors import ModalityContractError
from lightning_balance._record import ModalityRecord
from lightning_balance.callbacks.base import is_number, log_balance_metrics
from lightning_balance.callbacks.monitor import ModalityMonitor
from lightning_balance.functional.polysemantic import (
    layer_ablation_changes,
    polysemanticity_scores,
    polysemanticity_summary,
)
from lightning_balance.functional.robustness import curve_area, position_noise, sweep_presence
from lightning_balance.functional.diagnostics import (
    _reference,
    diagnostics_from_correctness,
    diagnostics_table,
    imbalance_verdict,
    lowest_precision,
)

if TYPE_CHECKING:
    from lightning_balance.modality import MultimodalMixin

__all__ = ["ModalityDiagnostics"]

_ORDERS = ("auto", "interleaved", "rank")


def _check_alone_probe(alone_probe: Any, name: str = "alone_probe") -> dict[str, Union[float, tuple[float, float]]]:
    """``{modality: value}`` or ``{modality: (value, standard error)}``, checked; numbers stay numbers. Values are
    accuracies in [0, 1] for ``alone_probe`` and ``alone_accuracy``, non-negative losses for
    ``alone_semantic_loss``."""
    loss = name == "alone_semantic_loss"

    def valid(v: float) -> bool:
        return math.isfinite(v) and v >= 0 and (loss or v <= 1)

    def entry(value: Any) -> Optional[Union[float, tuple[float, float]]]:
        if is_number(value) and valid(value):
            return float(value)
        if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
                and all(is_number(v) for v in value) and valid(value[0]) and 0 <= value[1] < (math.inf if loss else 1)):
            return (float(value[0]), float(value[1]))
        return None

    if isinstance(alone_probe, Mapping) and all(isinstance(k, str) for k in alone_probe):
        checked = {k: entry(v) for k, v in alone_probe.items()}
        if all(v is not None for v in checked.values()):
            return checked  # type: ignore[return-value]
    if loss:
        raise ValueError(f"alone_semantic_loss must map modality names to non-negative losses, or to [loss, standard "
                         f"error] pairs (e.g. {{'audio': [1.21, 0.03]}}), got {alone_probe!r}.")
    raise ValueError(f"{name} must map modality names to accuracies in [0, 1], or to [accuracy, standard error] "
                     f"pairs (e.g. {{'audio': [0.62, 0.02]}}), got {alone_probe!r}.")


def _check_accuracy(value: Any, name: str) -> Union[float, tuple[float, float]]:
    """One accuracy in [0, 1], or ``[accuracy, standard error]`` with the SE in [0, 1), checked."""
    try:
        return _check_alone_probe({"_": value}, name)["_"]
    except ValueError:
        raise ValueError(f"{name} must be an accuracy in [0, 1], or an [accuracy, standard error] pair "
                         f"(e.g. [0.938, 0.007]), got {value!r}.") from None


class ModalityDiagnostics(ModalityMonitor):
    r"""Everything :class:`ModalityMonitor` logs every epoch, plus, every ``every_n_epochs`` validation
    epochs (and at every ``trainer.test``), a collapse diagnosis of the validation samples and a verdict.

    Measured on what ``validation_step`` passes to ``self.fuse(features, targets)``, over the samples whose
    target is not ``ignore_index`` (:func:`~lightning_balance.functional.diagnostics_from_correctness`), logged
    under ``balance/diagnostics/...``:

    * ``contribution/<m>``: dataset-level Shapley contribution of ``m`` to accuracy,
      :math:`\phi_m=\sum_{S\subseteq M\setminus m}\frac{|S|!(M-|S|-1)!}{M!}[v(S\cup m)-v(S)]`, with
      ``v(S)`` the accuracy when the modalities outside ``S`` are zeroed at the feature level through the
      model's fusion (``v(S)`` as BalanceBenchmark's, at the features; BalanceBenchmark then sums the
      marginal gains without the Shapley weights, so its numbers differ); ``contribution_ratio`` (max/min),
      ``contribution_gap``, ``contribution_imbalance`` ((max − min)/Σ|φ|) and ``contribution_lead``
      (largest − second largest);
    * ``acc_fused``, ``acc/<m>`` (unimodal logits), ``acc_without/<m>`` (``m`` missing), ``drop/<m>``
      (``acc_fused − acc_without/<m>``);
    * ``probe/<m>``: accuracy of a linear probe on ``m``'s frozen features (``probe_folds``-fold
      cross-validation on the validation samples); with ``alone_probe`` given, ``under_learned/<m>`` =
      alone − joint probe accuracy;
    * ``semantic_loss/<m>``: that probe's out-of-fold cross-entropy, the **semantic loss by linear evaluation** of
      the collapse paper's Fig. 4 (Chaudhuri et al., ICML 2025, §4.1; the estimator is ours, the paper gives none),
      logged every diagnosed epoch so that its curve over epochs is the figure's; with ``alone_semantic_loss``
      given, ``semantic_gap/<m>`` = joint − reference;
    * standard errors ``acc_fused_se``, ``acc_se/<m>``, ``acc_without_se/<m>``, ``drop_se/<m>``,
      ``contribution_se/<m>``, ``contribution_lead_se`` (bootstrap over samples, ``bootstrap`` replicates
      from a generator seeded by ``seed``), ``probe_se/<m>`` (binomial), ``under_learned_se/<m>``;
    * ``erank/<m>``, ``erank_norm/<m>``, ``nrank/<m>`` (effective and numerical rank; ``fused`` is the
      concatenation of all vectors, the fusion's input), ``cka/<m>`` (linear CKA, fused vs ``m``),
      ``vif_mean/<m>``, ``vif_max/<m>``;
    * ``samples``, ``seconds/<group>``: how many samples, what each group cost.

    How. During a diagnosed epoch every validation batch runs the ``2^M − 1`` subset fusions
    (``pl_module.fuse_subset``, the features in their own shape, ``(N, D)`` or token sequences ``(N, T, D)``,
    under the step's autocast state) and keeps, per sample, whether each subset's prediction and each
    unimodal prediction is correct, and one vector per modality, ``pl_module.pool_features(m, z)`` (``(N, D)``:
    token sequences averaged over the tokens by default), for the ranks, CKA, VIF and probes. Only these
    rows are gathered at the epoch's end, so the fusion never sees more than one batch. A ``validation_step``
    that calls ``fuse`` more than once (two views) contributes every call's rows; the rows of one sample are
    resampled together by the bootstrap and kept in one probe fold, and ``samples`` counts samples, not rows.

    Under DDP the rows of all ranks are gathered (one all-gather of sizes, one of the rows) and every rank
    computes the same values. With Lightning's default validation sampler (``DistributedSampler``) the
    sampler's padding duplicates are dropped and the rows are put back into one-process order
    (``sample_order="auto"``), so the values, standard errors included, equal a one-process run on the same
    data. With another sampler they are concatenated rank by rank: every value but the probe's fold split and
    the bootstrap's draws is order-free.

    After each diagnosis a table (values with their 95% intervals) and the verdict
    (:func:`~lightning_balance.functional.imbalance_verdict`: which modality dominates, which is ignored,
    whether an encoder is under-learned compared with training it alone, how the fused model compares with
    the best modality alone and the unimodal ensemble, each reported only when its interval excludes 0, and a
    last line "Next step: ...") are printed on rank 0 (``verbose``), kept in :attr:`reports`, and a PNG of
    per-modality accuracy, probe and contribution over epochs is written to ``plot_dir`` (default
    ``<log_dir>/balance``) and sent to W&B as an image when a ``WandbLogger`` is attached. A measurement that
    cannot be made (non-finite features, fewer samples than the probe's folds need, a failing
    decomposition) is NaN, not logged, with a warning naming it and why; the fit goes on.

    Args:
        every_n_epochs: diagnose every this many validation epochs (and the last one). The probe fits an
            L-BFGS logistic regression per modality and fold; Shapley values need ``2^M`` fusion passes.
        probe: fit the linear probes.
        probe_folds: folds of the probe's cross-validation (>= 2).
        vif: compute variance inflation factors (one ``d × d`` inverse per modality; NaN, with a warning,
            when a modality has as many features as samples − 1 or more).
        max_samples: diagnose at most this many labelled validation samples (the first ones, in sample order,
            with all their views); each rank keeps its first ``max_samples`` samples at most. ``None``: all.
        alone_probe: probe accuracy of each modality's encoder trained alone (e.g. from a unimodal run), the
            reference of the "under-learned" verdict: an accuracy, or ``[accuracy, standard error]`` (e.g.
            that run's ``probe_se``). A bare number is taken as exact: only the joint probe's standard error
            enters the rule.
        tolerance: the smallest accuracy gap that counts: a probe is "under-learned" only when its gap to
            the alone reference is above this and its 95% interval excludes 0; "learned as well as alone" and
            "ignored" need the upper ends of the intervals at or below it.
        bootstrap: bootstrap replicates of the standard errors (0: none).
        seed: seed of the bootstrap's generator (the same values on every rank and every run).
        sample_order: ``"auto"``, ``"interleaved"`` (rank ``r`` of ``W`` read samples ``r, r+W, ...``) or
            ``"rank"`` (rank-by-rank concatenation).
        verbose: print the table and verdict on rank 0 after each diagnosis.
        plot: write the PNG (``None``: when matplotlib is installed).
        plot_dir: folder of the PNG.
        missing: see :class:`ModalityMonitor`.
        prefix: namespace of the monitor's per-epoch keys (the diagnosis uses ``balance/diagnostics``).
        robustness_rates: test-time missing rates of a robustness sweep (e.g. ``(0, 0.1, 0.2, 0.3, 0.4, 0.5)``;
            ``None``: none). Per rate, the fused accuracy with each modality absent at that rate, and with
            every modality absent independently at it (``"all"``, never all of a sample's), through
            ``fuse_subset(..., present=...)`` (the model's own ``missing`` fill);
            :func:`~lightning_balance.functional.sweep_presence` draws each sample's mask from its position, so
            DDP equals one process with the interleaved order of Lightning's ``DistributedSampler`` (with
            ``sample_order="rank"`` the position is rank-local: the masks, and the sweep, differ from one
            process's). With a presence mask in validation, the sweep, like the whole diagnosis, is of the
            complete samples. Logged as ``robust/<which>/<rate>`` and the normalised area under each
            curve ``robust_auc/<which>``; a PNG ``robustness.png`` next to the other one. Costs
            ``(M + 1) × len(rates)`` fusion passes per validation batch on diagnosed epochs.
        noise_rates: noise rates of a feature-noise sweep (e.g. ``(0, 0.05, 0.1, 0.2, 0.3, 0.5)``, as in the
            collapse paper's denoising experiment; ``None``: none). Per modality and rate, the fused accuracy when
            that modality's features (what ``fuse`` receives) carry additive uniform noise of standard deviation
            ``rate ×`` each sample's feature RMS (:func:`~lightning_balance.functional.position_noise`, drawn from the
            sample's position: DDP equals one process). Noise on the encoders' **inputs** needs the inputs, which
            this callback never sees: ``examples/robustness.py`` does that one. Logged as
            ``robust_noise/<modality>/<rate>`` and ``robust_noise_auc/<modality>``; drawn in ``robustness.png``.
            Costs ``M × len(rates)`` fusion passes per validation batch on diagnosed epochs.
        polysemantic_layer: attribute path of a layer inside the fusion (e.g. ``"fusion.hidden"``) whose neurons
            get a cross-modal polysemanticity score (**ours**, not the collapse paper's unpublished estimator;
            :mod:`~lightning_balance.functional.polysemantic`): each neuron's mean absolute change when each
            modality is removed, its modality shares, their normalised entropy (0: one modality drives it, 1:
            all equally). Logged as ``polysemantic/mean``, ``polysemantic/fraction`` (the share of live neurons
            above ``polysemantic_threshold``) and ``polysemantic/live``; printed under the verdict. Costs ``M``
            fusion passes per validation batch on diagnosed epochs; DDP equals one process.
        polysemantic_threshold: the score above which a neuron counts as cross-modal polysemantic.
        alone_semantic_loss: the reference of ``semantic_gap/<m>`` and of the verdict's semantic-loss line: the
            semantic loss of each modality's encoder trained with its own unimodal loss (the paper's "unimodal
            baseline"; e.g. this callback's ``semantic_loss/<m>`` in such a run), a loss or ``[loss, standard
            error]``. Drawn as a dotted line in the plot's semantic-loss panel.
        semantic_tolerance: the smallest semantic-loss difference (nats) that the verdict calls higher or lower
            than ``alone_semantic_loss`` (besides its 95% interval excluding 0).
        alone_accuracy: accuracy of each modality's model trained alone **on the same samples** (the validation
            data this callback diagnoses), an accuracy or ``[accuracy, standard error]``
            (``lightning_balance.fit_alone`` trains these models). The verdict compares the fused accuracy with the
            best of them (clearly above, clearly below or level with) and the table shows them as "alone acc".
        ensemble_accuracy: accuracy on the same samples of the unimodal ensemble of those models (the product of
            their probabilities), an accuracy or ``[accuracy, standard error]``. With it the verdict can tell
            whether balancing has anything to gain (its last line, "Next step: ...").
    """

    diagnostics_prefix = "balance/diagnostics"

    def __init__(self, every_n_epochs: int = 1, probe: bool = True, probe_folds: int = 2, vif: bool = True,
                 max_samples: Optional[int] = None,
                 alone_probe: Optional[dict[str, Union[float, tuple[float, float]]]] = None,
                 tolerance: float = 0.02, bootstrap: int = 1000, seed: int = 0, sample_order: str = "auto",
                 verbose: bool = True, plot: Optional[bool] = None, plot_dir: Optional[str] = None,
                 missing: bool = True, prefix: str = "balance/monitor",
                 robustness_rates: Optional[Sequence[float]] = None,
                 noise_rates: Optional[Sequence[float]] = None, polysemantic_layer: Optional[str] = None,
                 polysemantic_threshold: float = 0.5,
                 alone_semantic_loss: Optional[dict[str, Union[float, tuple[float, float]]]] = None,
                 semantic_tolerance: float = 0.05,
                 alone_accuracy: Optional[dict[str, Union[float, tuple[float, float]]]] = None,
                 ensemble_accuracy: Optional[Union[float, tuple[float, float]]] = None) -> None:
        super().__init__(missing=missing, prefix=prefix)
        for name, value in (("robustness_rates", robustness_rates), ("noise_rates", noise_rates)):
            if value is not None and (isinstance(value, (str, bytes)) or not hasattr(value, "__iter__")):
                raise ValueError(f"{name} must be a sequence of rates, e.g. (0, 0.1, 0.3, 0.5), got {value!r}.")
        if noise_rates is not None:
            rates = list(noise_rates)
            if not rates or not all(is_number(r) and 0 <= r <= 10 for r in rates) or rates != sorted(set(rates)):
                raise ValueError(f"noise_rates must be increasing noise rates in [0, 10] (noise std / feature RMS), "
                                 f"e.g. (0, 0.05, 0.1, 0.2, 0.3, 0.5), got {noise_rates!r}.")
            noise_rates = tuple(float(r) for r in rates)
        self.noise_rates = noise_rates
        if polysemantic_layer is not None and (not isinstance(polysemantic_layer, str) or not polysemantic_layer):
            raise ValueError(f"polysemantic_layer must be the attribute path of a layer of the fusion, e.g. "
                             f"'fusion.hidden', got {polysemantic_layer!r}.")
        if not is_number(polysemantic_threshold) or not 0 <= polysemantic_threshold < 1:
            raise ValueError(f"polysemantic_threshold must be in [0, 1), got {polysemantic_threshold!r}.")
        self.polysemantic_layer = polysemantic_layer
        self.polysemantic_threshold = float(polysemantic_threshold)
        if robustness_rates is not None:
            rates = list(robustness_rates)
            if not rates or not all(is_number(r) and 0 <= r < 1 for r in rates) or rates != sorted(set(rates)):
                raise ValueError(f"robustness_rates must be increasing missing rates in [0, 1), e.g. (0, 0.1, 0.2, 0.3), "
                                 f"got {robustness_rates!r}.")
            robustness_rates = tuple(float(r) for r in rates)
        self.robustness_rates = robustness_rates
        for name, count, low in (("every_n_epochs", every_n_epochs, 1), ("probe_folds", probe_folds, 2)):
            if isinstance(count, bool) or not isinstance(count, int) or count < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {count!r}.")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 2 * probe_folds):
            raise ValueError(f"max_samples must be None or an integer >= 2 * probe_folds = {2 * probe_folds}, "
                             f"got {max_samples!r}.")
        if not is_number(tolerance) or not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}.")
        if not is_number(semantic_tolerance) or not 0 <= semantic_tolerance < math.inf:
            raise ValueError(f"semantic_tolerance must be a non-negative number of nats, got {semantic_tolerance!r}.")
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0 or bootstrap == 1:
            raise ValueError(f"bootstrap must be 0 (no standard errors) or an integer >= 2 (e.g. 1000), "
                             f"got {bootstrap!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if sample_order not in _ORDERS:
            raise ValueError(f"sample_order must be one of {_ORDERS}, got {sample_order!r}.")
        if alone_probe is not None:
            alone_probe = _check_alone_probe(alone_probe)
        if alone_semantic_loss is not None:
            alone_semantic_loss = _check_alone_probe(alone_semantic_loss, "alone_semantic_loss")
        if alone_accuracy is not None:
            alone_accuracy = _check_alone_probe(alone_accuracy, "alone_accuracy")
        if ensemble_accuracy is not None:
            ensemble_accuracy = _check_accuracy(ensemble_accuracy, "ensemble_accuracy")
        if plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ImportError("plot=True needs matplotlib: `pip install matplotlib`, or pass plot=False.") from err
        self.every_n_epochs = every_n_epochs
        self.probe = probe
        self.probe_folds = probe_folds
        self.vif = vif
        self.max_samples = max_samples
        self.alone_probe = alone_probe
        self.alone_semantic_loss = alone_semantic_loss
        self.alone_accuracy = alone_accuracy
        self.ensemble_accuracy = ensemble_accuracy
        self.tolerance = float(tolerance)
        self.semantic_tolerance = float(semantic_tolerance)
        self.bootstrap = bootstrap
        self.seed = seed
        self.sample_order = sample_order
        self.verbose = verbose
        self.plot = plot
        self.plot_dir = plot_dir
        #: one ``{"epoch": e, <key>: value, ...}`` per diagnosed validation epoch
        self.diagnostics_history: list[dict[str, float]] = []
        #: the last ``trainer.test`` diagnosis
        self.test_diagnostics: Optional[dict[str, float]] = None
        #: ``(epoch or "test", text)`` of every printed report
        self.reports: list[tuple[Any, str]] = []
        self.plot_path: Optional[str] = None
        self._store: Optional[list[Tensor]] = None
        self._stored = 0
        self._storing_batch = False
        self._shape: Optional[tuple[int, list[int]]] = None
        self._precisions: dict[str, torch.dtype] = {}  # the lowest precision each modality's features came in

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.polysemantic_layer is not None:
            try:
                pl_module.get_submodule(self.polysemantic_layer)
            except AttributeError:
                import difflib

                names = [n for n, _ in pl_module.named_modules() if n]
                close = difflib.get_close_matches(self.polysemantic_layer, names, n=3)
                raise ModalityContractError(
                    f"ModalityDiagnostics(polysemantic_layer={self.polysemantic_layer!r}): {type(pl_module).__name__} has "
                    f"no such submodule{' (did you mean ' + ', '.join(map(repr, close)) + '?)' if close else ''}; give "
                    f"the attribute path of a layer inside the fusion, as in named_modules().") from None
        for reference in (self.alone_probe, self.alone_semantic_loss, self.alone_accuracy):
            for m in reference or ():
                cast("MultimodalMixin", pl_module).check_modality(m)

    # ------------------------------------------------------------------ when
    def _diagnose_now(self, trainer: pl.Trainer, stage: str) -> bool:
        if trainer.sanity_checking:
            return False
        if stage == "test":
            return True
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return (epoch + 1) % self.every_n_epochs == 0 or last

    # ------------------------------------------------------------------ collect
    def _epoch_start(self) -> None:
        super()._epoch_start()
        self._store = None
        self._stored = 0
        self._storing_batch = False
        self._shape = None
        self._precisions = {}
        self._warned_absent = getattr(self, "_warned_absent", False)
        self._saw_incomplete = False

    def _begin(self, trainer: pl.Trainer, stage: str) -> None:
        self._epoch_start()
        if self._diagnose_now(trainer, stage):
            self._store = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, "test")

    def _subset_masks(self, names: tuple[str, ...]) -> list[int]:
        if self._store is None:
            return super()._subset_masks(names)
        return list(range(2 ** len(names) - 1))  # every subset but the full model: the Shapley values need all

    def _record_end(self, pl_module: pl.LightningModule, record: ModalityRecord, names: tuple[str, ...],
                    preds: dict[int, Tensor], keep: Tensor, real: Optional[Tensor], positions: Tensor, view: int,
                    dataloader_idx: int, layout: Optional[tuple[int, int, int]]) -> None:
        super()._record_end(pl_module, record, names, preds, keep, real, positions, view, dataloader_idx, layout)
        if self._store is None:
            return
        if record.present is not None:  # the diagnosis is of complete samples (the monitor's keys count all)
            labelled = keep
            keep = keep & torch.stack([record.present[m] for m in names]).all(0)
            self._saw_incomplete = self._saw_incomplete or bool((labelled & ~keep).any())
            if not self._warned_absent:
                self._warned_absent = True
                rank_zero_warn(
                    f"{type(self).__name__}: some validation samples lack a modality; the collapse diagnosis "
                    f"(Shapley contributions, probes, ranks, CKA, VIF) and the robustness and noise sweeps are of "
                    f"the complete samples only, since an absent modality's features are the fill, not evidence. "
                    f"The monitor's accuracies count every sample (a modality's own accuracy, the samples that "
                    f"have it).")
        if view == 0:  # a batch's views are kept or dropped together
            self._storing_batch = self.max_samples is None or self._stored < self.max_samples
            if self._storing_batch:
                self._stored += int(keep.sum())
        if not self._storing_batch:
            return
        n = record.batch_size
        targets = record.valid_targets()
        vectors = {m: cast("MultimodalMixin", pl_module).pool_features(m, z.detach()).reshape(n, -1) for m, z in record.features.items()}
        for m, z in record.features.items():
            known = self._precisions.get(m)
            self._precisions[m] = lowest_precision([z.dtype] if known is None else [known, z.dtype]) or torch.float64
        uni = record.unimodal_logits()
        poly = self._polysemantic_columns(pl_module, record, names)
        if self._shape is None:
            self._shape = (record.logits.shape[-1], [vectors[m].shape[1] for m in names]
                           + ([poly.shape[1]] if poly is not None else []))
        trainer = pl_module.trainer
        if self.sample_order == "rank" or (self.sample_order == "auto" and layout is None):
            key = trainer.global_rank * 2.0**40 + positions.double()
        else:  # interleaved: rank r of W read samples r, r+W, ...
            world, rank = layout[:2] if layout is not None else (trainer.world_size, trainer.global_rank)
            key = positions.double() * world + rank
        columns = [torch.full((n,), float(dataloader_idx), dtype=torch.float64, device=keep.device), key,
                   torch.full((n,), float(view), dtype=torch.float64, device=keep.device), targets.double()]
        columns += [(preds[mask] == targets).double() for mask in range(2 ** len(names))]
        columns += [(uni[m].argmax(-1) == targets).double() for m in names]
        columns += self._sweep_columns(pl_module, record, names, key, targets)
        rows = torch.cat([torch.stack(columns, dim=1), *[vectors[m].double() for m in names],
                          *([poly] if poly is not None else [])], dim=1)
        self._store.append(rows[keep])

    def _sweep_columns(self, pl_module: pl.LightningModule, record: ModalityRecord, names: tuple[str, ...],
                       key: Tensor, targets: Tensor) -> list[Tensor]:
        """Correctness of the fused prediction at each point of the missing-rate sweep (``(M + 1) × rates``), then
        of the noise sweep (``M × noise rates``)."""
        if not self.robustness_rates and not self.noise_rates:
            return []
        features = {m: z.detach() for m, z in record.features.items()}
        positions = key.to(torch.int64)
        out = []
        for which in (*names, "all") if self.robustness_rates else ():
            for rate in self.robustness_rates or ():
                mask = sweep_presence(positions, names, rate, which, self.seed, record.present)
                with record.autocast():
                    logits = cast("MultimodalMixin", pl_module).fuse_subset(features, names, present=mask)
                out.append((logits.argmax(-1) == targets).double())
        for i, m in enumerate(names if self.noise_rates else ()):
            for rate in self.noise_rates or ():
                noisy = {**features, m: position_noise(features[m], positions, rate, 1000 + i, self.seed)}
                with record.autocast():
                    logits = cast("MultimodalMixin", pl_module).fuse_subset(noisy, names, present=record.present)
                out.append((logits.argmax(-1) == targets).double())
        return out

    def _polysemantic_columns(self, pl_module: pl.LightningModule, record: ModalityRecord,
                              names: tuple[str, ...]) -> Optional[Tensor]:
        """``(N, M·K)``: each sample's ``|h_k(x) − h_k(x without m)|`` for the ``K`` neurons of the chosen layer,
        modality-major."""
        if self.polysemantic_layer is None:
            return None
        layer = pl_module.get_submodule(self.polysemantic_layer)
        features = {m: z.detach() for m, z in record.features.items()}
        try:
            with record.autocast():
                changes = layer_ablation_changes(pl_module, features, layer, record.present, names)  # (M, N, K)
        except ValueError as err:
            raise ModalityContractError(f"ModalityDiagnostics(polysemantic_layer={self.polysemantic_layer!r}): {err}") from None
        return changes.permute(1, 0, 2).reshape(changes.shape[1], -1)  # modality-major columns

    def _extra_sums(self, pl_module: pl.LightningModule, device: torch.device, dtype: torch.dtype) -> Tensor:
        # every rank learns the row layout (also a rank that stored nothing) in the monitor's one all-reduce
        if self._store is None:
            return super()._extra_sums(pl_module, device, dtype)
        m = len(cast("MultimodalMixin", pl_module).modalities)
        if self._shape is None:
            return torch.zeros(2 + m + (self.polysemantic_layer is not None), device=device, dtype=dtype)
        classes, widths = self._shape
        return torch.tensor([1.0, classes, *widths], device=device, dtype=dtype)

    # ------------------------------------------------------------------ reduce and diagnose
    def _ordered_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layout: Tensor) -> Optional[dict[str, Any]]:
        """Every rank's stored rows, on every rank, in sample order ``(loader, sample, view)``; ``None`` when no
        rank stored a labelled sample. ``layout``: the reduced ``[ranks with rows, classes, widths...]``."""
        assert self._store is not None
        names = list(cast("MultimodalMixin", pl_module).modalities)
        m = len(names)
        ranks = float(layout[0])
        if ranks == 0:
            return None
        classes = round(float(layout[1]) / ranks)
        widths = [round(float(w) / ranks) for w in layout[2:]]
        sweep = (m + 1) * len(self.robustness_rates or ()) + m * len(self.noise_rates or ())
        head = 4 + 2**m + m + sweep
        device = pl_module.device
        local = (torch.cat(self._store) if self._store else
                 torch.zeros(0, head + sum(widths), dtype=torch.float64, device=device))
        rows = gather_samples(local.to(device), trainer.strategy)
        if rows.shape[0] == 0:
            return None
        order = torch.argsort(rows[:, 2], stable=True)  # view, then sample, then loader (stable sorts)
        order = order[torch.argsort(rows[order, 1], stable=True)]
        order = order[torch.argsort(rows[order, 0], stable=True)]
        rows = rows[order]
        _, groups = torch.unique_consecutive(rows[:, :2].long(), dim=0, return_inverse=True)
        if self.max_samples is not None:
            rows, groups = rows[groups < self.max_samples], groups[groups < self.max_samples]
        out: dict[str, Any] = {"groups": groups, "targets": rows[:, 3].long(), "classes": classes,
                               "correct": rows[:, 4: 4 + 2**m].T.bool(),
                               "unimodal": {mod: rows[:, 4 + 2**m + i].bool() for i, mod in enumerate(names)},
                               "sweep": rows[:, 4 + 2**m + m: head].bool()}
        start = head
        out["vectors"] = {}
        for mod, w in zip(names, widths):
            out["vectors"][mod] = rows[:, start: start + w].float()
            start += w
        if self.polysemantic_layer is not None:
            out["polysemantic"] = rows[:, start: start + widths[m]]
        return out

    def _diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, layout: Tensor) -> None:
        clock = time.perf_counter()
        samples = self._ordered_samples(trainer, pl_module, layout)  # collective: every rank, before any skip
        where = "the test data" if stage == "test" else f"epoch {trainer.current_epoch}"
        if samples is None:
            if getattr(self, "_saw_incomplete", False):
                reason = ("no validation sample has every modality: the diagnosis and its sweeps are of complete "
                          "samples (keep some complete samples in validation, e.g. missing_splits=('train',))")
            else:
                reason = "every target is ignore_index, or every batch is empty"
            rank_zero_warn(f"ModalityDiagnostics: no labelled sample to diagnose in {where} ({reason}); the diagnosis "
                           f"(and any robustness or noise sweep) is skipped.")
            return
        try:
            self._measure(trainer, pl_module, stage, samples, clock, where)
        except Exception as err:  # a failing diagnosis must not end the fit
            rank_zero_warn(f"ModalityDiagnostics: the diagnosis of {where} failed ({type(err).__name__}: {err}) and "
                           f"was skipped; training goes on.")

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, samples: dict[str, Any],
                 clock: float, where: str) -> None:
        names = list(cast("MultimodalMixin", pl_module).modalities)
        gather_seconds = time.perf_counter() - clock
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = diagnostics_from_correctness(
                samples["correct"], names, vectors=samples["vectors"], targets=samples["targets"],
                num_classes=samples["classes"], unimodal_correct=samples["unimodal"], groups=samples["groups"],
                probe=self.probe, probe_folds=self.probe_folds, vif=self.vif, bootstrap=self.bootstrap,
                seed=self.seed, errors="warn", precisions=self._precisions or None)
        for caught_warning in caught:
            rank_zero_warn(f"ModalityDiagnostics ({where}): {caught_warning.message}")
        if self.robustness_rates:
            sweep = samples["sweep"].float().mean(0).tolist()
            rates = list(self.robustness_rates)
            for w, which in enumerate((*names, "all")):
                curve = sweep[w * len(rates): (w + 1) * len(rates)]
                for rate, acc in zip(rates, curve):
                    values[f"robust/{which}/{rate:g}"] = acc
                values[f"robust_auc/{which}"] = curve_area(rates, curve)
        if self.noise_rates:
            sweep = samples["sweep"].float().mean(0).tolist()[(len(names) + 1) * len(self.robustness_rates or ()):]
            rates = list(self.noise_rates)
            for w, m in enumerate(names):
                curve = sweep[w * len(rates): (w + 1) * len(rates)]
                for rate, acc in zip(rates, curve):
                    values[f"robust_noise/{m}/{rate:g}"] = acc
                values[f"robust_noise_auc/{m}"] = curve_area(rates, curve)
        if self.polysemantic_layer is not None and samples["polysemantic"].shape[0]:
            attributions = samples["polysemantic"].mean(0).reshape(len(names), -1).T  # (K, M)
            summary = polysemanticity_summary(polysemanticity_scores(attributions), self.polysemantic_threshold)
            values.update({f"polysemantic/{k}": v for k, v in summary.items()})
        values["seconds/gather"] = gather_seconds
        values["seconds/total"] = time.perf_counter() - clock
        if self.alone_probe:
            for m, ref in self.alone_probe.items():
                if math.isfinite(values.get(f"probe/{m}", math.nan)):
                    mean, se = _reference(ref)
                    values[f"under_learned/{m}"] = mean - values[f"probe/{m}"]
                    if f"probe_se/{m}" in values:
                        values[f"under_learned_se/{m}"] = math.sqrt(values[f"probe_se/{m}"] ** 2 + se**2)
        for m, ref in (self.alone_semantic_loss or {}).items():
            if math.isfinite(values.get(f"semantic_loss/{m}", math.nan)):
                mean, se = _reference(ref)
                values[f"semantic_gap/{m}"] = values[f"semantic_loss/{m}"] - mean
                if math.isfinite(values.get(f"semantic_loss_se/{m}", math.nan)):
                    values[f"semantic_gap_se/{m}"] = math.sqrt(values[f"semantic_loss_se/{m}"] ** 2 + se**2)
        p = self.diagnostics_prefix
        log_balance_metrics(pl_module, {f"{p}/{k}": torch.tensor(v) for k, v in values.items() if math.isfinite(v)},
                            on_step=False, on_epoch=True)
        label: Any = "test" if stage == "test" else trainer.current_epoch
        text = self.format_report(values, names, label)
        self.reports.append((label, text))
        if stage == "test":
            self.test_diagnostics = values
        else:
            self.diagnostics_history.append({"epoch": float(trainer.current_epoch), **values})
        if self.verbose:
            rank_zero_info(text)
        if stage == "val" and self._should_plot():
            # trainer.log_dir broadcasts from rank 0: every rank asks for it, only rank 0 draws
            folder = self.plot_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "balance")
            if trainer.is_global_zero:
                self._plot(trainer, names, folder)

    def format_report(self, values: Mapping[str, float], modalities: list[str], label: Any = "") -> str:
        """The printed report: a table of the measurements and the verdict."""
        where = f"epoch {label}" if isinstance(label, int) else str(label)
        head = (f"Modality diagnostics ({where}, {int(values['samples'])} samples, "
                f"{values['seconds/total']:.2f} s)")
        verdict = imbalance_verdict(values, modalities, self.alone_probe, self.tolerance,
                                    alone_semantic_loss=self.alone_semantic_loss,
                                    semantic_tolerance=self.semantic_tolerance, alone_accuracy=self.alone_accuracy,
                                    ensemble_accuracy=self.ensemble_accuracy)
        table = diagnostics_table(values, modalities, self.alone_probe, alone_accuracy=self.alone_accuracy)
        lines = [head, table, *("  " + line for line in verdict)]
        if self.robustness_rates:
            rates = ", ".join(f"{r:g}" for r in self.robustness_rates)
            lines.append(f"  fused accuracy at test-time missing rates {rates} (area under the curve):")
            for which in (*modalities, "all"):
                what = f"{which} missing" if which != "all" else "every modality missing independently"
                curve = " ".join(f"{values[f'robust/{which}/{r:g}']:.3f}" for r in self.robustness_rates)
                lines.append(f"    {what}: {curve} (area {values[f'robust_auc/{which}']:.3f})")
        if self.polysemantic_layer is not None and "polysemantic/mean" in values:
            lines.append(f"  cross-modal polysemanticity of {self.polysemantic_layer} (our ablation-entropy score, 0 "
                         f"monosemantic to 1 shared by all): mean {values['polysemantic/mean']:.3f}; "
                         f"{100 * values['polysemantic/fraction']:.0f}% of {int(values['polysemantic/live'])} live "
                         f"neurons above {self.polysemantic_threshold:g}")
        if self.noise_rates:
            rates = ", ".join(f"{r:g}" for r in self.noise_rates)
            lines.append(f"  fused accuracy with feature noise at rates {rates} (area under the curve):")
            for m in modalities:
                curve = " ".join(f"{values[f'robust_noise/{m}/{r:g}']:.3f}" for r in self.noise_rates)
                lines.append(f"    noise on {m}: {curve} (area {values[f'robust_noise_auc/{m}']:.3f})")
        return "\n".join(lines)

    def report(self) -> str:
        """The last report (run ``trainer.validate`` or ``trainer.test`` to get one on demand)."""
        if not self.reports:
            raise RuntimeError("No diagnosis yet: it runs at the end of validation every `every_n_epochs` epochs "
                               "and at every trainer.test; call trainer.validate(...) to run one now. (Under "
                               "strategy='ddp_spawn' the diagnoses ran in the worker processes and their reports "
                               "stay there: read them from the logger, or train with strategy='ddp'.)")
        return self.reports[-1][1]

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Optional[Tensor]:
        layout = super()._epoch_end(trainer, pl_module, stage)
        if self._store is not None and layout is not None:
            self._diagnose(trainer, pl_module, stage, layout)
        self._store = None
        return layout

    # ------------------------------------------------------------------ plots
    def _should_plot(self) -> bool:
        if self.plot is not None:
            return bool(self.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return False
        return True

    def _plot(self, trainer: pl.Trainer, names: list[str], folder: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "diagnostics.png")
        semantic = self.probe and any(math.isfinite(row.get(f"semantic_loss/{m}", math.nan))
                                      for row in self.diagnostics_history for m in names)
        fig, axes = plt.subplots(1, 3 if semantic else 2, figsize=(16.5 if semantic else 11, 3.8))
        left, right = axes[0], axes[1]
        epochs = [row["epoch"] for row in self.history]
        if epochs:
            left.plot(epochs, [row["val_acc_fused"] for row in self.history], color="k", label="fused")
        diag_epochs = [row["epoch"] for row in self.diagnostics_history]
        for i, m in enumerate(names):
            if epochs:
                left.plot(epochs, [row[f"val_acc/{m}"] for row in self.history], color=f"C{i}", label=f"{m} (unimodal logits)")
            if self.probe:
                left.plot(diag_epochs, [row.get(f"probe/{m}", math.nan) for row in self.diagnostics_history], "o--",
                          color=f"C{i}", label=f"{m} probe")
            if self.alone_probe and m in self.alone_probe:
                left.axhline(_reference(self.alone_probe[m])[0], color=f"C{i}", ls=":", lw=1, label=f"{m} probe, trained alone")
            right.plot(diag_epochs, [row[f"contribution/{m}"] for row in self.diagnostics_history], "o-",
                       color=f"C{i}", label=m)
        left.set(title="validation accuracy", xlabel="epoch")
        right.set(title="Shapley contribution to accuracy", xlabel="epoch")
        left.legend(fontsize=7, loc="center right")
        right.legend(fontsize=8)
        if semantic:  # the collapse paper's Fig. 4: each encoder's semantic loss over epochs, against its reference
            ax = axes[2]
            for i, m in enumerate(names):
                ax.plot(diag_epochs, [row.get(f"semantic_loss/{m}", math.nan) for row in self.diagnostics_history],
                        "o-", color=f"C{i}", label=f"{m}, joint training")
                if self.alone_semantic_loss and m in self.alone_semantic_loss:
                    ax.axhline(_reference(self.alone_semantic_loss[m])[0], color=f"C{i}", ls=":", lw=1,
                               label=f"{m}, with its own loss")
            ax.set(title="semantic loss by linear evaluation (probe CE)", xlabel="epoch")
            ax.legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.plot_path = path
        if (self.robustness_rates or self.noise_rates) and self.diagnostics_history:
            last = self.diagnostics_history[-1]
            panels = [p for p in ("missing", "noise") if (self.robustness_rates if p == "missing" else self.noise_rates)]
            fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
            axes = dict(zip(panels, axes[0]))
            for i, m in enumerate(names if self.noise_rates else ()):
                ax = axes["noise"]
                curve = [last.get(f"robust_noise/{m}/{r:g}", math.nan) for r in self.noise_rates or ()]
                ax.plot(self.noise_rates, curve, "s-", color=f"C{i}",
                        label=f"noise on {m} (area {last.get(f'robust_noise_auc/{m}', math.nan):.3f})")
                ax.set(title=f"fused accuracy vs feature noise (epoch {int(last['epoch'])})",
                       xlabel="noise rate (std / feature RMS)", ylabel="accuracy")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            ax = axes.get("missing")
            for i, which in enumerate((*names, "all") if self.robustness_rates else ()):
                curve = [last.get(f"robust/{which}/{r:g}", math.nan) for r in self.robustness_rates or ()]
                label = f"{which} missing" if which != "all" else "all, independently"
                assert ax is not None
                ax.plot(self.robustness_rates, curve, "o-", color=f"C{i}" if which != "all" else "k",
                        label=f"{label} (area {last.get(f'robust_auc/{which}', math.nan):.3f})")
            if ax is not None:
                ax.set(title=f"fused accuracy vs test-time missing rate (epoch {int(last['epoch'])})",
                       xlabel="missing rate", ylabel="accuracy")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(folder, "robustness.png"), dpi=100)
            plt.close(fig)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{self.diagnostics_prefix}/plot", images=[path], step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "diagnostics_history": list(self.diagnostics_history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.diagnostics_history = list(state_dict.get("diagnostics_history", []))
