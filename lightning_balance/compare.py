"""Compare balancing methods on your own model and data: each method (or stack ``"a+b"``) trained from your
module factory over several seeds, the epoch chosen on validation, scored on test, against the modalities
trained alone and their ensemble, with the paired difference to the baseline.

    from lightning_balance import compare_methods
    result = compare_methods(MyModel, MyDataModule(), ["baseline", "uni_losses", "cml", "ogm_ge"], seeds=[0, 1, 2])
    print(result.table())

The model's ``training_step`` returns ``self.balanced_loss(loss)`` (so that methods that add an objective can
switch it on) and its ``validation_step`` fuses through ``self.fuse``; nothing else changes between methods.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import lightning.pytorch as pl

from lightning_balance._errors import ModalityContractError
from lightning_balance.references import AloneReferences, KeepBest, datamodule_for, fit_alone, loader_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_balance.losses.base import LossTerm
    from lightning_balance.modality import MultimodalMixin

__all__ = ["METHODS", "Comparison", "FittedMethod", "Method", "MethodContext", "compare_methods", "fit_method", "method",
           "paired_difference", "step_time_ratio"]

# two-sided 95% Student t quantiles by degrees of freedom (the paired differences' interval)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


@dataclass(frozen=True)
class MethodContext:
    """What a method's factories may read: the run's epochs, the modalities, the trained-alone references (or
    ``None``), the seed."""

    max_epochs: int
    modalities: tuple[str, ...]
    references: Optional[AloneReferences]
    seed: int


@dataclass(frozen=True)
class Method:
    """One entry of a comparison: the callbacks it adds to the Trainer, the loss terms it attaches to the module
    and whether it trains with the unimodal losses (both through ``self.balanced_loss(loss)``).

    Attributes:
        name: the row's name.
        callbacks: ``context -> [Callback, ...]``, called once per run.
        loss_terms: ``context -> [LossTerm, ...]``, called once per run (after the module is built).
        unimodal_losses: switch on :attr:`~lightning_balance.MultimodalMixin.balance_unimodal_losses`.
        needs_references: the method reads the trained-alone references (UMT's teachers).
        needs_encode_batch: the method makes its own passes over batches (PMR's prototypes): the module must override
            :meth:`~lightning_balance.MultimodalMixin.encode_batch`.
    """

    name: str
    callbacks: Callable[[MethodContext], list[pl.Callback]] = lambda ctx: []
    loss_terms: Optional[Callable[[MethodContext], list[LossTerm]]] = None
    unimodal_losses: bool = False
    needs_references: bool = False
    needs_encode_batch: bool = False

    @property
    def adds_objective(self) -> bool:
        return self.loss_terms is not None or self.unimodal_losses

    def __add__(self, other: Method) -> Method:
        """The stack of two methods: both callbacks in one Trainer, both loss terms on one module."""
        mine, theirs = self.loss_terms, other.loss_terms

        def terms(ctx: MethodContext) -> list[LossTerm]:
            return [*(mine(ctx) if mine else []), *(theirs(ctx) if theirs else [])]

        return Method(f"{self.name}+{other.name}", lambda ctx: [*self.callbacks(ctx), *other.callbacks(ctx)],
                      terms if (mine or theirs) else None, self.unimodal_losses or other.unimodal_losses,
                      self.needs_references or other.needs_references,
                      self.needs_encode_batch or other.needs_encode_batch)


def _registry() -> dict[str, Method]:
    from lightning_balance import AGM, AMCo, OGMGE, OPM, PMR, InfoReg, MMPareto, ModalityDropout
    from lightning_balance.losses import CMLLoss, LFMLoss, MBSDLoss, UMTLoss

    def umt(ctx: MethodContext) -> list[LossTerm]:
        if ctx.references is None:
            raise ValueError("umt needs the trained-alone references: compare_methods(..., references=True).")
        return [UMTLoss(ctx.references.encoders)]

    # each method's main parameter as selected on AV-Digits validation (docs/results.md, examples/benchmark.py)
    entries = [
        Method("baseline"),
        Method("uni_losses", unimodal_losses=True),
        Method("ogm_ge", lambda ctx: [OGMGE(alpha=0.1, params="weights")]),
        Method("inforeg", lambda ctx: [InfoReg()], unimodal_losses=True),  # the published objective
        Method("agm", lambda ctx: [AGM(alpha=0.5)]),
        Method("pmr", lambda ctx: [PMR(alpha=4.0)], needs_encode_batch=True),
        Method("mmpareto", lambda ctx: [MMPareto(gamma=2.0)], unimodal_losses=True),
        Method("opm", lambda ctx: [OPM(q_base=0.85)]),
        Method("amco", lambda ctx: [AMCo(eps=10.0)], unimodal_losses=True),
        Method("dropout", lambda ctx: [ModalityDropout(p=0.3)]),
        Method("cml", loss_terms=lambda ctx: [CMLLoss(rank_weight=0.1)]),
        Method("lfm", loss_terms=lambda ctx: [LFMLoss(horizon=ctx.max_epochs)]),
        Method("mbsd", loss_terms=lambda ctx: [MBSDLoss(weight=1.0)]),
        Method("umt", loss_terms=umt, needs_references=True),
    ]
    return {m.name: m for m in entries}


class _Registry(Mapping[str, Method]):
    """The methods :func:`compare_methods` knows by name (built on first use: the callbacks import lazily)."""

    def __init__(self) -> None:
        self._methods: Optional[dict[str, Method]] = None

    def _get(self) -> dict[str, Method]:
        if self._methods is None:
            self._methods = _registry()
        return self._methods

    def __getitem__(self, key: str) -> Method:
        return self._get()[key]

    def __iter__(self) -> Any:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


#: name → :class:`Method`: ``baseline``, ``uni_losses``, ``ogm_ge``, ``inforeg``, ``agm``, ``pmr``, ``mmpareto``,
#: ``opm``, ``amco``, ``dropout``, ``cml``, ``lfm``, ``mbsd``, ``umt``; stacks as ``"a+b"``.
METHODS: Mapping[str, Method] = _Registry()


def method(spec: Union[str, Method]) -> Method:
    """A :class:`Method` from its name in :data:`METHODS`, a stack ``"a+b"``, or a :class:`Method` as it is."""
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"a method is a name of METHODS, a stack 'a+b' or a Method, got {spec!r}.")
    parts = spec.split("+")
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)} (stack them as 'a+b'), or pass a "
                         f"Method(name, callbacks=..., loss_terms=...).")
    out = METHODS[parts[0]]
    for p in parts[1:]:
        out = out + METHODS[p]
    return out


class _ChecksObjective(pl.Callback):
    """Raises at the first training batch when a method adds an objective that ``training_step`` never adds
    (``balanced_loss`` not called)."""

    checked = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.checked:
            return
        self.checked = True
        if not getattr(pl_module, "_lb_balanced_loss_called", False):
            raise ModalityContractError(
                f"this method adds an objective (loss terms or unimodal losses), but {type(pl_module).__name__}."
                f"training_step did not call self.balanced_loss(loss): return self.balanced_loss(loss) from it.")


def _score(module: pl.LightningModule, loader: Any, trainer_kwargs: Mapping[str, Any]) -> dict[str, float]:
    """Fused accuracy, each modality's unimodal accuracy and the accuracy without it, on ``loader``
    (:class:`~lightning_balance.ModalityMonitor` over the module's own ``validation_step``)."""
    from lightning_balance.callbacks.monitor import ModalityMonitor
    from lightning_balance.progress import quiet

    monitor = ModalityMonitor(prefix="score")
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
               "devices": 1, **trainer_kwargs, "callbacks": [monitor]}
    with quiet():
        metrics = pl.Trainer(**options).validate(module, dataloaders=loader, verbose=False)[0]
    prefix = "score/val_"
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, float]:
    """The paired per-seed differences ``a[s] − b[s]`` over the seeds both have (non-finite values left out):
    ``mean``, its two-sided 95% Student t interval ``low``..``high`` (NaN with one seed), ``better`` (seeds with a
    positive difference) and ``n``."""
    diff = [a[s] - b[s] for s in sorted(a) if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    if not diff:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "better": 0, "n": 0}
    mean = statistics.mean(diff)
    half = (_T95.get(len(diff) - 1, 1.96) * statistics.stdev(diff) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "better": sum(d > 0 for d in diff), "n": len(diff)}


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


@dataclass
class Comparison:
    """The result of :func:`compare_methods`.

    Attributes:
        rows: row name → one dict per seed: ``seed``, ``val_acc`` (the selected epoch's validation accuracy),
            ``epoch``, ``acc`` (test fused accuracy, or NaN without test data), ``acc/<m>``, ``acc_without/<m>``,
            ``probe/<m>`` (validation probe of each encoder, with ``diagnose``), ``seconds`` (wall time of the fit).
            References: ``"<m> alone"`` and ``"unimodal ensemble"``.
        methods: the methods' names, in order (the first is the reference of the paired differences).
        modalities: the module's modalities.
        settings: the run's settings (seeds, epochs, ...), saved with the results.
    """

    rows: dict[str, list[dict[str, float]]]
    methods: list[str]
    modalities: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def _metric(self) -> str:
        first = self.rows[self.methods[0]]
        return "acc" if any(math.isfinite(r.get("acc", math.nan)) for r in first) else "val_acc"

    def paired(self, name: str, against: Optional[str] = None) -> dict[str, float]:
        """The paired per-seed difference of ``name`` minus ``against`` (default: the first method) on the test
        accuracy (validation without test data): mean, 95% t interval, seeds better."""
        key = self._metric()
        ref = against or self.methods[0]
        per = {int(r["seed"]): r.get(key, math.nan) for r in self.rows[name]}
        base = {int(r["seed"]): r.get(key, math.nan) for r in self.rows[ref]}
        return paired_difference(per, base)

    def table(self) -> str:
        """A markdown table: mean ± std over seeds; the paired difference to the first method."""
        key = self._metric()
        what = "test acc" if key == "acc" else "val acc (no test data)"
        probes = [m for m in self.modalities if any(f"probe/{m}" in r for rows in self.rows.values() for r in rows)]
        head = ["row", what, f"Δ vs {self.methods[0]} (95% CI; seeds better)", "val acc (selection)",
                *[f"{m} acc alone/unimodal" for m in self.modalities], *[f"probe {m}" for m in probes]]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, rows in self.rows.items():
            delta = "–"
            if name in self.methods and name != self.methods[0]:
                p = self.paired(name)
                if p["n"] > 1:
                    delta = f"{p['mean']:+.3f} ({p['low']:+.3f} to {p['high']:+.3f}; {p['better']}/{p['n']})"
                elif p["n"] == 1:
                    delta = f"{p['mean']:+.3f} (1 seed)"
            cells = [name, _mean_std([r.get(key, math.nan) for r in rows]), delta,
                     _mean_std([r.get("val_acc", math.nan) for r in rows]),
                     *[_mean_std([r.get(f"acc/{m}", math.nan) for r in rows]) for m in self.modalities],
                     *[_mean_std([r.get(f"probe/{m}", math.nan) for r in rows]) for m in probes]]
            lines.append("| " + " | ".join(cells) + " |")
        seeds = self.settings.get("seeds", [])
        lines.append(f"\n({len(seeds)} seed(s) {seeds}; {self.settings.get('max_epochs')} epochs, the epoch of best "
                     f"validation accuracy kept; mean ± std over seeds; Δ: paired per-seed differences, 95% t interval. "
                     f"Probes: linear probe of each encoder, cross-validated on validation samples.)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "methods": self.methods, "modalities": list(self.modalities),
                "rows": self.rows}

    def save(self, folder: str, name: str = "compare") -> dict[str, str]:
        """Write ``<name>.json`` (every value of every seed), ``<name>.md`` (the table) and, with matplotlib,
        ``<name>.png`` (:meth:`plot`) to ``folder``; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = {"json": os.path.join(folder, f"{name}.json"), "md": os.path.join(folder, f"{name}.md")}
        with open(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with open(paths["md"], "w") as f:
            f.write(self.table() + "\n")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return paths
        paths["png"] = os.path.join(folder, f"{name}.png")
        self.plot(paths["png"])
        return paths

    def plot(self, path: Optional[str] = None) -> Figure:
        """Each row's accuracy (mean, error bars: std over seeds, dots: seeds), the best modality alone and the
        ensemble as dashed lines; the axis contains every bar, dot and line."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        key = self._metric()
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(self.methods) + 2), 3.8))
        shown: list[float] = []
        for i, name in enumerate(self.methods):
            vals = [r.get(key, math.nan) for r in self.rows[name]]
            vals = [v for v in vals if math.isfinite(v)]
            if not vals:
                continue
            mean = statistics.mean(vals)
            err = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(i, mean, 0.6, yerr=err, color="#1f77b4" if i else "#999999", capsize=3)
            ax.scatter([i] * len(vals), vals, color="black", s=8, zorder=3)
            shown += [*vals, mean - err, mean + err]
        refs = [(n, rows) for n, rows in self.rows.items() if n not in self.methods]
        alone = [(n, statistics.mean(r.get(key, math.nan) for r in rows)) for n, rows in refs if n.endswith(" alone")]
        lines = []
        if alone:
            lines.append(max(alone, key=lambda t: t[1]))
        lines += [(n, statistics.mean(r.get(key, math.nan) for r in rows)) for n, rows in refs if n == "unimodal ensemble"]
        for (text, val), style in zip(lines, ["--", ":"]):
            if math.isfinite(val):
                ax.axhline(val, linestyle=style, color="black", label=f"{text} {val:.3f}")
                shown.append(val)
        ax.set_xticks(range(len(self.methods)), self.methods, rotation=30, ha="right")
        ax.set_ylabel("test accuracy" if key == "acc" else "validation accuracy")
        finite = [v for v in shown if math.isfinite(v)]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 0.03), min(1.0, max(finite) + 0.03))
        ax.grid(axis="y", alpha=0.3)
        if lines:
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        plt.close(fig)
        return fig


@dataclass
class FittedMethod:
    """One run of :func:`fit_method`: the module at its best validation epoch, that accuracy and epoch, the fit's
    wall time (seconds; not a cost measurement: :func:`step_time_ratio` is)."""

    module: Any
    val_accuracy: float
    epoch: int
    seconds: float
    curve: list[float] = field(default_factory=list)


def _check_requirements(module: Any, entries: Sequence[Method]) -> None:
    """Refuse, before any training, the methods whose needs the module does not meet."""
    from lightning_balance.modality import MultimodalMixin

    if not isinstance(module, MultimodalMixin):
        raise ModalityContractError(f"make_module() returned {type(module).__name__}, not a MultimodalMixin module.")
    needing = [e.name for e in entries if e.needs_encode_batch]
    if needing and type(module).encode_batch is MultimodalMixin.encode_batch:
        raise ModalityContractError(
            f"{needing} make their own passes over batches: {type(module).__name__} must override encode_batch(batch) "
            f"to return ({{modality: encoder(batch[...])}}, targets) (docs/methods/pmr.md), or leave them out.")


def fit_method(make_module: Callable[[], MultimodalMixin], datamodule: Any, spec: Union[str, Method], *,
               max_epochs: int = 20, seed: Optional[int] = 0, references: Optional[AloneReferences] = None,
               trainer_kwargs: Optional[Mapping[str, Any]] = None) -> FittedMethod:
    """Train one method on a fresh module: ``pl.seed_everything(seed)``, ``make_module()``, the method's loss terms
    attached and its unimodal losses switched on (through ``self.balanced_loss(loss)``, checked at the first step),
    its callbacks in the Trainer, ``max_epochs`` epochs; the weights of the epoch with the best validation fused
    accuracy (:class:`~lightning_balance.ModalityMonitor` on the module's ``validation_step``) are restored.

    Args:
        make_module: returns a fresh module (called after the seed is set).
        datamodule: a LightningDataModule, or a function ``(seed=...)`` returning one.
        spec: a name of :data:`METHODS`, a stack ``"a+b"`` or a :class:`Method`.
        max_epochs: epochs.
        seed: the seed (``None``: the global RNG as it is).
        references: the trained-alone references (UMT's teachers).
        trainer_kwargs: more :class:`lightning.pytorch.Trainer` arguments (default: CPU, one device, no logger).
    """
    from lightning_balance.callbacks.monitor import ModalityMonitor
    from lightning_balance.progress import quiet

    entry = method(spec)
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    dm = datamodule_for(datamodule, seed or 0)
    module = make_module()
    _check_requirements(module, [entry])
    ctx = MethodContext(max_epochs, tuple(module.modalities), references, seed or 0)
    if entry.loss_terms is not None:
        module.configure_loss_terms(entry.loss_terms(ctx))
    module.balance_unimodal_losses = entry.unimodal_losses
    module._lb_balanced_loss_called = False
    keeper = KeepBest("keep/val_acc_fused")
    extra = dict(trainer_kwargs or {})
    options = {"max_epochs": max_epochs, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
               "accelerator": "cpu", "devices": 1, **extra,
               "callbacks": [*entry.callbacks(ctx), *extra.get("callbacks", []),
                             ModalityMonitor(missing=False, prefix="keep"), keeper,
                             *([_ChecksObjective()] if entry.adds_objective else [])]}
    began = time.perf_counter()
    with quiet():
        pl.Trainer(**options).fit(module, datamodule=dm)
    seconds = time.perf_counter() - began
    keeper.restore(module)
    return FittedMethod(module.eval(), keeper.best, keeper.best_epoch, seconds, keeper.curve)


def compare_methods(make_module: Callable[[], MultimodalMixin], datamodule: Any,
                    methods: Sequence[Union[str, Method]] = ("baseline", "uni_losses", "cml", "ogm_ge"), *,
                    seeds: Sequence[int] = (0, 1, 2), max_epochs: int = 20, references: bool = True,
                    reference_kwargs: Optional[Mapping[str, Any]] = None, diagnose: bool = True,
                    out: Optional[str] = None, progress: bool = True,
                    trainer_kwargs: Optional[Mapping[str, Any]] = None) -> Comparison:
    """Train each method on your model over ``seeds``, select on validation, score on test.

    Per seed: ``pl.seed_everything(seed)``, then (with ``references``) each modality trained alone
    (:func:`~lightning_balance.fit_alone`, the same epochs, best validation epoch) and their ensemble, then for each
    method a fresh ``make_module()``, its loss terms attached and its unimodal losses switched on
    (``training_step`` must return ``self.balanced_loss(loss)``), its callbacks in the Trainer, ``max_epochs``
    epochs, the weights of the epoch with the best validation accuracy restored (selection never reads test data),
    scored on the datamodule's test loader (fused accuracy, each modality's unimodal accuracy and the accuracy
    without it) and, with ``diagnose``, each encoder's validation probe. The paired difference of each method to
    the first one (put ``"baseline"`` first) is over seeds: same seed, same initial weights and batch order.

    Args:
        make_module: a function (or class) returning a fresh module; called once per run, after the seed is set.
        datamodule: a LightningDataModule (the same split for every seed), or a function ``(seed=...)`` returning
            one (a split per seed).
        methods: names of :data:`METHODS`, stacks ``"a+b"``, or :class:`Method` entries.
        seeds: the seeds.
        max_epochs: epochs of every run.
        references: train each modality alone and the ensemble (rows ``"<m> alone"``, ``"unimodal ensemble"``);
            needed by ``umt``.
        reference_kwargs: more arguments of :func:`~lightning_balance.fit_alone` (``inputs=``, ``optimizer=``, ...).
        diagnose: also measure each trained model's encoder probes on validation (:func:`~lightning_balance.diagnose`).
        out: a folder to save the JSON, markdown table and figure to (:meth:`Comparison.save`).
        progress: print one line per finished run (runs done of total, elapsed, time left).
        trainer_kwargs: more :class:`lightning.pytorch.Trainer` arguments (default: CPU, one device, no logger).

    Returns:
        The :class:`Comparison`.
    """
    from lightning_balance.diagnosis import diagnose as run_diagnosis
    from lightning_balance.progress import RunProgress

    entries = [method(m) for m in methods]
    names = [m.name for m in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"methods must be distinct, got {names}.")
    if any(e.needs_references for e in entries) and not references:
        raise ValueError(f"{[e.name for e in entries if e.needs_references]} need the trained-alone references: "
                         f"pass references=True.")
    if not seeds:
        raise ValueError("seeds must list at least one seed.")
    _check_requirements(make_module(), entries)
    options = {"accelerator": "cpu", "devices": 1, **dict(trainer_kwargs or {})}
    score_options = {k: v for k, v in options.items() if k in ("accelerator", "devices", "precision")}
    rows: dict[str, list[dict[str, float]]] = {}
    total = len(seeds) * (len(entries) + (1 if references else 0))
    tracker = RunProgress(total) if progress else None
    modalities: tuple[str, ...] = ()
    start = time.perf_counter()
    for seed in seeds:
        dm = datamodule_for(datamodule, seed)
        dm.setup("fit")
        val, test = loader_of(dm, "val"), loader_of(dm, "test")
        if val is None:
            raise ValueError("compare_methods selects each run's epoch on validation: the datamodule needs a "
                             "val_dataloader().")
        refs: Optional[AloneReferences] = None
        if references:
            if tracker:
                tracker.start(f"references (each modality alone), seed {seed}")
            pl.seed_everything(seed, verbose=False)
            refs = fit_alone(make_module(), dm, max_epochs=max_epochs, seed=seed, **dict(reference_kwargs or {}),
                             **{k: v for k, v in score_options.items()})
            on_val = refs.evaluate(val)
            on_test = refs.evaluate(test) if test is not None else {}
            for m in refs.models:
                rows.setdefault(f"{m} alone", []).append(
                    {"seed": seed, "val_acc": refs.val_accuracy[m], "acc": on_test.get(f"acc/{m}", math.nan),
                     f"acc/{m}": on_test.get(f"acc/{m}", math.nan), f"probe/{m}": on_val[f"probe/{m}"],
                     "epoch": refs.epochs[m]})
            rows.setdefault("unimodal ensemble", []).append(
                {"seed": seed, "val_acc": on_val["ensemble"], "acc": on_test.get("ensemble", math.nan)})
            if tracker:
                tracker.done(result_text=f"best alone {on_val['best_alone']:.3f} (val)")
        for entry in entries:
            if tracker:
                tracker.start(f"{entry.name}, seed {seed}")
            fitted = fit_method(make_module, dm, entry, max_epochs=max_epochs, seed=seed, references=refs,
                                trainer_kwargs=trainer_kwargs)
            module = fitted.module
            modalities = tuple(module.modalities)
            row: dict[str, float] = {"seed": seed, "val_acc": fitted.val_accuracy, "epoch": fitted.epoch,
                                     "seconds": fitted.seconds, "acc": math.nan}
            if test is not None:
                scored = _score(module, test, score_options)
                row["acc"] = scored.get("acc_fused", math.nan)
                row.update({f"acc/{m}": scored.get(f"acc/{m}", math.nan) for m in modalities})
                row.update({f"acc_without/{m}": scored.get(f"acc_without/{m}", math.nan) for m in modalities})
            if diagnose:
                report = run_diagnosis(module, val, bootstrap=0, **score_options)
                row.update({f"probe/{m}": report.values.get(f"probe/{m}", math.nan) for m in modalities})
            rows.setdefault(entry.name, []).append(row)
            if tracker:
                scores = f"val {fitted.val_accuracy:.3f}" + (f", test {row['acc']:.3f}" if test is not None else "")
                tracker.done(result_text=scores)
    ordered = {n: rows[n] for n in names}
    ordered.update({n: r for n, r in rows.items() if n not in ordered})
    result = Comparison(ordered, names, modalities,
                        {"seeds": list(seeds), "max_epochs": max_epochs, "references": references,
                         "seconds": time.perf_counter() - start})
    if tracker:
        tracker.finish()
    if out:
        result.save(out)
    return result


class _AlternateObjectives(pl.Callback):
    """A B A B ... in one fit: on A steps ``balanced_loss`` returns the task loss alone; every step is timed from
    ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step; not data loading)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: dict[str, list[float]] = {"A": [], "B": []}
        self._t0 = 0.0
        self._arm = "A"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._arm = "B" if batch_idx % 2 else "A"
        cast(Any, pl_module)._lb_skip_objectives = self._arm == "A"
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.times[self._arm].append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cast(Any, pl_module)._lb_skip_objectives = False


def step_time_ratio(make_module: Callable[[], MultimodalMixin], spec: Union[str, Method], datamodule: Any, *,
                    steps: int = 200, warmup: int = 20, seed: int = 0,
                    trainer_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, float]:
    """The step-time cost of a method that adds an objective (loss terms, unimodal losses), as a ratio measured
    A/B: one process, one model, the same batches, the steps alternating without (A) and with (B) the objective,
    the first ``warmup`` steps dropped, the median of each arm. Never from two separate fits, whose ratio
    measures the machine's load as much as the method.

    Methods with callbacks are refused (``examples/overhead.py`` times those the same way, alternating the
    callbacks in one fit). Returns ``median_ms_without``, ``median_ms_with``, ``ratio`` and ``timed_steps``.
    """
    from lightning_balance.progress import quiet

    entry = method(spec)
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    ctx = MethodContext(1, tuple(module.modalities), None, seed)
    if entry.callbacks(ctx):
        raise ValueError(f"step_time_ratio times objectives only; {entry.name} adds callbacks: time it with "
                         f"examples/overhead.py (the callbacks alternate in one fit).")
    if not entry.adds_objective:
        raise ValueError(f"{entry.name} adds nothing to time.")
    if entry.loss_terms is not None:
        module.configure_loss_terms(entry.loss_terms(ctx))
    module.balance_unimodal_losses = entry.unimodal_losses
    probe = _AlternateObjectives(warmup)
    dm = datamodule_for(datamodule, seed)
    options = {"max_steps": steps + warmup, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
               "limit_val_batches": 0, "accelerator": "cpu", "devices": 1, **dict(trainer_kwargs or {}),
               "callbacks": [probe]}
    options["max_epochs"] = -1
    with quiet():
        pl.Trainer(**options).fit(module, datamodule=dm)
    a, b = statistics.median(probe.times["A"]), statistics.median(probe.times["B"])
    return {"median_ms_without": 1e3 * a, "median_ms_with": 1e3 * b, "ratio": b / a,
            "timed_steps": float(len(probe.times["B"]))}
