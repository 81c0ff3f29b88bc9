"""One call to diagnose a trained model: is a modality ignored, is an encoder under-learned, is there anything
to gain, and what to try next.

:func:`diagnose` runs :class:`~lightning_balance.ModalityDiagnostics` over one data loader with
``Trainer.validate`` (the module's own ``validation_step``, which fuses through ``self.fuse``), measures the
trained-alone references on the same samples when they are given (or fits them, :func:`~lightning_balance.fit_alone`),
and returns a :class:`DiagnosisReport`: the values, the table, the verdict and its suggested next step, and a
figure of each encoder's probe against its trained-alone reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl

from lightning_balance.functional.diagnostics import Z95, _reference, _verdict, diagnostics_table
from lightning_balance.references import AloneReferences, fit_alone

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_balance.modality import MultimodalMixin

__all__ = ["DiagnosisReport", "diagnose", "plot_probes"]

Reference = Union[float, tuple[float, float]]


@dataclass
class DiagnosisReport:
    """What :func:`diagnose` found.

    Attributes:
        values: every diagnostics value (``acc_fused``, ``contribution/<m>``, ``probe/<m>``, their ``*_se``, ...; the
            keys of :class:`~lightning_balance.ModalityDiagnostics`, without the ``balance/diagnostics/`` prefix).
        modalities: the module's modalities, in declared order.
        verdict: the verdict's lines (:func:`~lightning_balance.functional.imbalance_verdict`); the last one is the
            suggested next step.
        table: the values as a markdown table (95% intervals).
        alone_probe: modality → ``(probe accuracy, SE)`` of the encoder trained alone, on the same samples.
        alone_accuracy: modality → ``(accuracy, SE)`` of the model trained alone, on the same samples.
        ensemble_accuracy: ``(accuracy, SE)`` of the unimodal ensemble (product of the alone models' probabilities).
        label: a name for plots and tables (e.g. the method).
        next_step_kind: the kind of the next step (:data:`~lightning_balance.functional.NEXT_STEPS`).
    """

    values: dict[str, float]
    modalities: tuple[str, ...]
    verdict: list[str]
    table: str
    alone_probe: dict[str, tuple[float, float]] = field(default_factory=dict)
    alone_accuracy: dict[str, tuple[float, float]] = field(default_factory=dict)
    ensemble_accuracy: Optional[tuple[float, float]] = None
    label: str = "model"
    next_step_kind: str = ""

    @property
    def suggested_method(self) -> Optional[str]:
        """The name in :data:`~lightning_balance.compare.METHODS` of what the next step recommends first, from the
        project's evidence (docs/which_method.md): ``"uni_losses"`` for an under-learned encoder (or an ignored
        modality that is informative alone), ``"umt"`` when the fused model loses to a modality alone or to the
        ensemble; ``None`` when there is nothing to gain, the model is untrained, or references are missing."""
        return {"own_signal": "uni_losses", "ensemble": "umt", "ensemble_or_own_signal": "umt"}.get(self.next_step_kind)

    @property
    def next_step(self) -> Optional[str]:
        """The verdict's suggested next step (its line starting with "Next step"), if any."""
        for line in reversed(self.verdict):
            if line.startswith("Next step"):
                return line
        return None

    def __str__(self) -> str:
        lines = [self.table, "", "Verdict:"]
        lines += [f"  - {line}" for line in self.verdict]
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> Figure:
        """:func:`plot_probes` of this report alone."""
        return plot_probes([self], path)


def _as_pairs(value: Optional[Mapping[str, Reference]]) -> dict[str, tuple[float, float]]:
    return {m: _reference(v) for m, v in (value or {}).items()}


def diagnose(module: MultimodalMixin, dataloader: Iterable[Any], *,
             references: Union[None, AloneReferences, Mapping[str, Any]] = None,
             fit_references: Optional[pl.LightningDataModule] = None, reference_epochs: int = 40,
             reference_kwargs: Optional[Mapping[str, Any]] = None, label: str = "model", tolerance: float = 0.02,
             bootstrap: int = 1000, probe_folds: int = 2, seed: int = 0, max_samples: Optional[int] = None,
             plot: Optional[str] = None, verbose: bool = False, **trainer_kwargs: Any) -> DiagnosisReport:
    """Diagnose a trained multimodal model on one data loader.

    Runs the module's ``validation_step`` over ``dataloader`` (``Trainer.validate``; the step must fuse through
    ``self.fuse(features, targets)``) under :class:`~lightning_balance.ModalityDiagnostics`: Shapley contributions,
    accuracy without each modality, each encoder's linear probe, ranks, CKA and VIF, with standard errors. The
    module is not changed (its train/eval mode is restored).

    The verdict can say whether an encoder is under-learned and whether there is anything to gain only against
    references trained alone, measured on the same samples:

    * ``references``: an :class:`~lightning_balance.AloneReferences` (from :func:`~lightning_balance.fit_alone`;
      measured here on ``dataloader``), or a mapping with any of ``alone_probe``, ``alone_accuracy`` (modality →
      accuracy or ``(accuracy, SE)``) and ``ensemble_accuracy`` (a number or ``(accuracy, SE)``) measured on the
      same samples by you;
    * or ``fit_references``: a datamodule to train them on (``reference_epochs`` epochs each, the best validation
      epoch kept; ``reference_kwargs`` go to :func:`~lightning_balance.fit_alone`, e.g. ``inputs=``).

    Args:
        module: a trained :class:`~lightning_balance.MultimodalMixin` LightningModule.
        dataloader: the samples to diagnose (e.g. the validation loader; the probes are cross-validated on them).
        references: see above.
        fit_references: see above.
        reference_epochs: epochs of each trained-alone run (with ``fit_references``).
        reference_kwargs: more arguments of :func:`~lightning_balance.fit_alone`.
        label: the report's name in plots and tables.
        tolerance: the smallest accuracy gap the verdict reports (see ``ModalityDiagnostics``).
        bootstrap: bootstrap replicates of the standard errors.
        probe_folds: folds of the probes' cross-validation.
        seed: the bootstrap's seed.
        max_samples: diagnose at most this many samples.
        plot: write :meth:`DiagnosisReport.plot` to this PNG path.
        verbose: print the report.
        trainer_kwargs: more :class:`lightning.pytorch.Trainer` arguments (default: CPU, no logger).

    Returns:
        The :class:`DiagnosisReport`.
    """
    from lightning_balance.callbacks.diagnostics import ModalityDiagnostics
    from lightning_balance.modality import MultimodalMixin
    from lightning_balance.progress import quiet

    if not isinstance(module, MultimodalMixin) or not isinstance(module, pl.LightningModule):
        raise TypeError(f"diagnose() takes a LightningModule with the modality contract (MultimodalMixin), got "
                        f"{type(module).__name__}.")
    if references is not None and fit_references is not None:
        raise ValueError("pass references= or fit_references=, not both.")
    if fit_references is not None:
        references = fit_alone(module, fit_references, max_epochs=reference_epochs, probe_folds=probe_folds,
                               **dict(reference_kwargs or {}))
    kwargs: dict[str, Any] = {}
    if isinstance(references, AloneReferences):
        references.evaluate(dataloader)
        kwargs = references.diagnostics_kwargs()
    elif references is not None:
        unknown = sorted(set(references) - {"alone_probe", "alone_accuracy", "ensemble_accuracy"})
        if unknown:
            raise ValueError(f"references takes the keys 'alone_probe', 'alone_accuracy' and 'ensemble_accuracy'; "
                             f"got {unknown}. Or pass an AloneReferences from fit_alone().")
        kwargs = {k: v for k, v in references.items() if v is not None}
    callback = ModalityDiagnostics(every_n_epochs=1, probe_folds=probe_folds, max_samples=max_samples,
                                   tolerance=tolerance, bootstrap=bootstrap, seed=seed, verbose=False, plot=False,
                                   **kwargs)
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
               "devices": 1, **trainer_kwargs, "callbacks": [callback, *trainer_kwargs.get("callbacks", [])]}
    was_training = module.training
    try:
        with quiet():
            pl.Trainer(**options).validate(module, dataloaders=dataloader, verbose=False)
    finally:
        module.train(was_training)
    if not callback.diagnostics_history:
        raise RuntimeError(
            f"diagnose() measured nothing: {type(module).__name__}.validation_step did not fuse through "
            f"self.fuse(features, targets) on any batch of the loader (or every target was ignore_index).")
    values = {k: float(v) for k, v in callback.diagnostics_history[-1].items() if k != "epoch"}
    names = tuple(module.modalities)
    alone_probe = kwargs.get("alone_probe")
    verdict, kind = _verdict(values, names, alone_probe, tolerance=tolerance,
                             alone_accuracy=kwargs.get("alone_accuracy"), ensemble_accuracy=kwargs.get("ensemble_accuracy"))
    ensemble = kwargs.get("ensemble_accuracy")
    report = DiagnosisReport(
        values=values, modalities=names, verdict=verdict, next_step_kind=kind,
        table=diagnostics_table(values, names, alone_probe, alone_accuracy=kwargs.get("alone_accuracy")),
        alone_probe=_as_pairs(alone_probe), alone_accuracy=_as_pairs(kwargs.get("alone_accuracy")),
        ensemble_accuracy=None if ensemble is None else _reference(ensemble), label=label)
    if plot:
        report.plot(plot)
    if verbose:
        print(report)
    return report


def _interval(se: float, z: float = Z95) -> float:
    return z * se if math.isfinite(se) else 0.0


def plot_probes(reports: Sequence[DiagnosisReport], path: Optional[str] = None, z: float = Z95,
                title: Optional[str] = None) -> Figure:
    """The diagnosis at a glance: left, each encoder's linear probe after joint training (one bar per report,
    e.g. before and after a method) next to the same encoder trained alone (grey); right, each report's fused
    accuracy against the best modality alone and the unimodal ensemble (dashed lines). Error bars: 95%
    intervals. The axes always contain every bar and every reference.

    Args:
        reports: one or more :class:`DiagnosisReport` (their ``label`` names the bars); the references are the
            first report's.
        path: write the figure to this PNG path.
        z: the width of the error bars in standard errors.
        title: the figure's title (default: the first report's first verdict line, shortened).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the diagnosis figure needs matplotlib: `pip install matplotlib`.") from err
    if not reports:
        raise ValueError("plot_probes needs at least one report.")
    first = reports[0]
    names = list(first.modalities)
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [max(len(names), 2), 2]})
    width = 0.8 / (len(reports) + 1)
    shown: list[float] = []
    for i, m in enumerate(names):
        if m in first.alone_probe:
            ref, ref_se = first.alone_probe[m]
            left.bar(i, ref, width, yerr=_interval(ref_se, z), color="#bbbbbb", edgecolor="black", capsize=3,
                     label="trained alone" if i == 0 else None)
            shown += [ref - _interval(ref_se, z), ref + _interval(ref_se, z)]
        for j, rep in enumerate(reports):
            val, se = rep.values.get(f"probe/{m}", math.nan), rep.values.get(f"probe_se/{m}", math.nan)
            if not math.isfinite(val):
                continue
            left.bar(i + (j + 1) * width, val, width, yerr=_interval(se, z), color=colours[j % len(colours)],
                     capsize=3, label=f"{rep.label} (joint)" if i == 0 else None)
            shown += [val - _interval(se, z), val + _interval(se, z)]
    left.set_xticks([i + width * len(reports) / 2 for i in range(len(names))], names)
    left.set_ylabel("linear-probe accuracy of the encoder")
    left.set_title("Each encoder: after joint training vs trained alone")
    for j, rep in enumerate(reports):
        acc, se = rep.values["acc_fused"], rep.values.get("acc_fused_se", math.nan)
        right.bar(j, acc, 0.6, yerr=_interval(se, z), color=colours[j % len(colours)], capsize=3)
        shown += [acc - _interval(se, z), acc + _interval(se, z)]
    refs: list[tuple[str, float, float]] = []
    if first.alone_accuracy:
        best = max(first.alone_accuracy, key=lambda k: first.alone_accuracy[k][0])
        refs.append((f"best alone ({best})", *first.alone_accuracy[best]))
    if first.ensemble_accuracy is not None:
        refs.append(("unimodal ensemble", *first.ensemble_accuracy))
    for (text, val, se), style in zip(refs, ["--", ":"]):
        right.axhline(val, linestyle=style, color="black", label=f"{text} {val:.3f}")
        shown += [val - _interval(se, z), val + _interval(se, z)]
    right.set_xticks(range(len(reports)), [rep.label for rep in reports])
    right.set_ylabel("fused accuracy")
    right.set_title("Fused model vs references")
    finite = [v for v in shown if math.isfinite(v)]
    low = max(0.0, min(finite) - 0.05) if finite else 0.0
    high = min(1.0, max(finite) + 0.05) if finite else 1.0
    for ax in (left, right):
        ax.set_ylim(low, high)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    # the headline: the first under-learned encoder if any (the finding the figure shows), else the first line
    findings = [line for line in first.verdict if "UNDER-LEARNED" in line] or first.verdict
    headline = title if title is not None else (findings[0] if findings else "")
    if len(headline) > 140:
        headline = headline[:137] + "..."
    fig.suptitle(headline, fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
