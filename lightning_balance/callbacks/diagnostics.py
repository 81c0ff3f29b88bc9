"""Collapse diagnostics on validation data: which modality dominates, which is ignored, which encoder is
under-learned, with the evidence (Shapley contribution, missing-modality accuracy, probes, rank, CKA, VIF)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_balance._distributed import gather_samples
from lightning_balance.callbacks.base import is_number, log_balance_metrics
from lightning_balance.callbacks.monitor import ModalityMonitor
from lightning_balance.functional.diagnostics import collapse_diagnostics, diagnostics_table, imbalance_verdict

__all__ = ["ModalityDiagnostics"]

_ORDERS = ("auto", "interleaved", "rank")


class ModalityDiagnostics(ModalityMonitor):
    r"""Everything :class:`ModalityMonitor` logs every epoch, plus, every ``every_n_epochs`` validation
    epochs (and at every ``trainer.test``), a collapse diagnosis of the validation samples and a verdict.

    Measured on the features that ``validation_step`` passes to ``self.fuse(features, targets)``
    (:func:`~lightning_balance.functional.collapse_diagnostics`), logged under ``balance/diagnostics/...``:

    * ``contribution/<m>``: dataset-level Shapley contribution of ``m`` to accuracy,
      :math:`\phi_m=\sum_{S\subseteq M\setminus m}\frac{|S|!(M-|S|-1)!}{M!}[v(S\cup m)-v(S)]`, with
      ``v(S)`` the accuracy when the modalities outside ``S`` are zeroed at the feature level through the
      model's fusion (BalanceBenchmark's definition, at the features); ``contribution_ratio`` (max/min),
      ``contribution_gap`` and ``contribution_imbalance`` ((max − min)/Σ|φ|);
    * ``acc_fused``, ``acc/<m>`` (unimodal logits), ``acc_without/<m>`` (``m`` missing);
    * ``probe/<m>``: accuracy of a linear probe on ``m``'s frozen features (``probe_folds``-fold
      cross-validation on the validation samples); with ``alone_probe`` given, ``under_learned/<m>`` =
      alone − joint probe accuracy;
    * ``erank/<m>``, ``erank_norm/<m>``, ``nrank/<m>`` (effective and numerical rank; ``fused`` is the
      concatenation of all features, the fusion's input), ``cka/<m>`` (linear CKA, fused vs ``m``),
      ``vif_mean/<m>``, ``vif_max/<m>``;
    * ``seconds/<group>``: what each group cost.

    Under DDP the validation features of all ranks are gathered (one all-gather of sizes, one of the
    packed samples) and every rank computes the same values. With Lightning's default validation sampler
    (``DistributedSampler``, no shuffle) the samples are put back into the one-process order and the
    sampler's padding is dropped, so the values equal a one-process run on the same data
    (``sample_order="auto"``). With another sampler they are concatenated rank by rank: every value but the
    probe's fold split is order-free.

    After each diagnosis a table and the verdict (:func:`~lightning_balance.functional.imbalance_verdict`:
    which modality dominates, which is ignored, whether an encoder is under-learned compared with
    training it alone) are printed on rank 0 (``verbose``), kept in :attr:`reports`, and a PNG of
    per-modality accuracy, probe and contribution over epochs is written to ``plot_dir`` (default
    ``<log_dir>/balance``) and sent to W&B as an image when a ``WandbLogger`` is attached.

    Args:
        every_n_epochs: diagnose every this many validation epochs (and the last one). The probe fits an
            L-BFGS logistic regression per modality and fold; Shapley values need ``2^M`` fusion passes.
        probe: fit the linear probes.
        probe_folds: folds of the probe's cross-validation (>= 2).
        vif: compute variance inflation factors (one ``d × d`` inverse per modality).
        max_samples: diagnose at most this many validation samples (the first ones, in sample order); each
            rank keeps ``max_samples`` samples' features at most. ``None``: all.
        alone_probe: probe accuracy of each modality's encoder trained alone (e.g. from a unimodal run),
            the reference of the "under-learned" verdict.
        tolerance: accuracy gap below which a probe counts as "learned as well as alone" and a contribution
            as "ignored".
        sample_order: ``"auto"``, ``"interleaved"`` (rank ``r`` of ``W`` read samples ``r, r+W, ...``) or
            ``"rank"`` (rank-by-rank concatenation).
        verbose: print the table and verdict on rank 0 after each diagnosis.
        plot: write the PNG (``None``: when matplotlib is installed).
        plot_dir: folder of the PNG.
        missing: see :class:`ModalityMonitor`.
        prefix: namespace of the monitor's per-epoch keys (the diagnosis uses ``balance/diagnostics``).
    """

    diagnostics_prefix = "balance/diagnostics"

    def __init__(self, every_n_epochs: int = 1, probe: bool = True, probe_folds: int = 2, vif: bool = True,
                 max_samples: Optional[int] = None, alone_probe: Optional[dict[str, float]] = None,
                 tolerance: float = 0.02, sample_order: str = "auto", verbose: bool = True,
                 plot: Optional[bool] = None, plot_dir: Optional[str] = None, missing: bool = True,
                 prefix: str = "balance/monitor") -> None:
        super().__init__(missing=missing, prefix=prefix)
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("probe_folds", probe_folds, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 2 * probe_folds):
            raise ValueError(f"max_samples must be None or an integer >= 2 * probe_folds = {2 * probe_folds}, "
                             f"got {max_samples!r}.")
        if not is_number(tolerance) or not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}.")
        if sample_order not in _ORDERS:
            raise ValueError(f"sample_order must be one of {_ORDERS}, got {sample_order!r}.")
        if alone_probe is not None:
            if not isinstance(alone_probe, Mapping) or not all(
                    isinstance(k, str) and is_number(v) and 0 <= v <= 1 for k, v in alone_probe.items()):
                raise ValueError(f"alone_probe must map modality names to accuracies in [0, 1], got {alone_probe!r}.")
            alone_probe = {k: float(v) for k, v in alone_probe.items()}
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
        self.tolerance = float(tolerance)
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
        self._store: Optional[dict[str, list[Tensor]]] = None
        self._stored = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.alone_probe is not None:
            for m in self.alone_probe:
                pl_module.check_modality(m)  # type: ignore[attr-defined]

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

    def _begin(self, trainer: pl.Trainer, stage: str) -> None:
        self._epoch_start()
        if self._diagnose_now(trainer, stage):
            self._store = {"targets": []}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, "test")

    @torch.no_grad()
    def _batch_end(self, pl_module: pl.LightningModule, stage: str) -> None:
        record, uni = super()._batch_end(pl_module, stage)
        if self._store is None or (self.max_samples is not None and self._stored >= self.max_samples):
            return
        for m, z in record.features.items():
            self._store.setdefault(f"feature:{m}", []).append(z.detach().reshape(z.shape[0], -1))
            self._store.setdefault(f"logits:{m}", []).append(uni[m].detach())
        self._store["targets"].append(record.targets.detach())
        self._stored += record.targets.shape[0]

    # ------------------------------------------------------------------ reduce and diagnose
    def _ordered_samples(self, trainer: pl.Trainer, stage: str) -> dict[str, Tensor]:
        assert self._store is not None
        keys = [k for k in self._store if k != "targets"]
        parts = {k: torch.cat(v) for k, v in self._store.items()}
        widths = [parts[k].shape[1] for k in keys]
        packed = torch.cat([parts[k].double() for k in keys] + [parts["targets"].double()[:, None]], dim=1)
        order, total = self._order(trainer, stage)
        packed = gather_samples(packed, trainer.strategy, interleave=order == "interleaved", total=total)
        if self.max_samples is not None:
            packed = packed[: self.max_samples]
        out, start = {}, 0
        for k, w in zip(keys, widths):
            out[k] = packed[:, start: start + w].float()
            start += w
        out["targets"] = packed[:, -1].long()
        return out

    def _order(self, trainer: pl.Trainer, stage: str) -> tuple[str, Optional[int]]:
        if trainer.world_size == 1:
            return "rank", None
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        if isinstance(loaders, (list, tuple)):
            if len(loaders) != 1:  # samples of several loaders: no single one-process order to restore
                return "rank", None
            loaders = loaders[0]
        loader = loaders
        sampler = getattr(loader, "sampler", None)
        if self.sample_order == "auto":
            if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
                return "interleaved", len(sampler.dataset)  # type: ignore[arg-type]
            return "rank", None
        total = len(sampler.dataset) if isinstance(sampler, DistributedSampler) else None  # type: ignore[arg-type]
        return self.sample_order, total

    def _diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        clock = time.perf_counter()
        samples = self._ordered_samples(trainer, stage)
        names = list(pl_module.modalities)  # type: ignore[attr-defined]
        features = {m: samples[f"feature:{m}"] for m in names}
        device = next(iter(features.values())).device
        model_device = pl_module.device
        logits = {m: samples[f"logits:{m}"] for m in names}
        num_classes = logits[names[0]].shape[-1]
        fuse = pl_module.fuse_subset  # type: ignore[attr-defined]

        def fuse_subset(f: Mapping[str, Tensor], present) -> Tensor:
            with torch.no_grad():
                out = fuse({m: z.to(model_device) for m, z in f.items()}, present)
            return out.float().to(device)

        gather_seconds = time.perf_counter() - clock
        values = collapse_diagnostics(features, samples["targets"], fuse_subset, num_classes,
                                      unimodal_logits=logits, probe=self.probe, probe_folds=self.probe_folds,
                                      vif=self.vif)
        values["seconds/gather"] = gather_seconds
        values["seconds/total"] = time.perf_counter() - clock
        values["samples"] = float(samples["targets"].shape[0])
        if self.alone_probe:
            for m, ref in self.alone_probe.items():
                if f"probe/{m}" in values:
                    values[f"under_learned/{m}"] = ref - values[f"probe/{m}"]
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
        if stage == "val" and trainer.is_global_zero and self._should_plot():
            self._plot(trainer, names)

    def format_report(self, values: Mapping[str, float], modalities: list[str], label: Any = "") -> str:
        """The printed report: a table of the measurements and the verdict."""
        where = f"epoch {label}" if isinstance(label, int) else str(label)
        head = (f"Modality diagnostics ({where}, {int(values['samples'])} samples, "
                f"{values['seconds/total']:.2f} s)")
        verdict = imbalance_verdict(values, modalities, self.alone_probe, self.tolerance)
        table = diagnostics_table(values, modalities, self.alone_probe)
        return "\n".join([head, table, *("  " + line for line in verdict)])

    def report(self) -> str:
        """The last report (run ``trainer.validate`` or ``trainer.test`` to get one on demand)."""
        if not self.reports:
            raise RuntimeError("No diagnosis yet: it runs at the end of validation every `every_n_epochs` epochs "
                               "and at every trainer.test; call trainer.validate(...) to run one now.")
        return self.reports[-1][1]

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super()._epoch_end(trainer, pl_module, stage)
        if self._store is not None and self._store["targets"]:
            self._diagnose(trainer, pl_module, stage)
        self._store = None

    # ------------------------------------------------------------------ plots
    def _should_plot(self) -> bool:
        if self.plot is not None:
            return bool(self.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return False
        return True

    def _plot(self, trainer: pl.Trainer, names: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = self.plot_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "balance")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "diagnostics.png")
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        epochs = [row["epoch"] for row in self.history]
        if epochs:
            left.plot(epochs, [row["val_acc_fused"] for row in self.history], color="k", label="fused")
        diag_epochs = [row["epoch"] for row in self.diagnostics_history]
        for i, m in enumerate(names):
            if epochs:
                left.plot(epochs, [row[f"val_acc/{m}"] for row in self.history], color=f"C{i}", label=f"{m} (unimodal logits)")
            if self.probe:
                left.plot(diag_epochs, [row[f"probe/{m}"] for row in self.diagnostics_history], "o--", color=f"C{i}",
                          label=f"{m} probe")
            if self.alone_probe and m in self.alone_probe:
                left.axhline(self.alone_probe[m], color=f"C{i}", ls=":", lw=1, label=f"{m} probe, trained alone")
            right.plot(diag_epochs, [row[f"contribution/{m}"] for row in self.diagnostics_history], "o-",
                       color=f"C{i}", label=m)
        left.set(title="validation accuracy", xlabel="epoch")
        right.set(title="Shapley contribution to accuracy", xlabel="epoch")
        left.legend(fontsize=7, loc="center right")
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.plot_path = path
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
