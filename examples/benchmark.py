"""The benchmark runner: balancing methods (and stacked combinations) against the references, over seeds.

Per dataset and seed it trains each modality alone, the unimodal ensembles, the joint baseline and the
joint model with each requested method. Every model is restored to its epoch of best **validation**
accuracy before it is scored on test. Writes per dataset a JSON file (every value of every seed), a
markdown table (mean ± std over seeds) and two PNGs (test metrics per method; validation accuracy per
modality over epochs).

    python examples/benchmark.py                                      # baseline vs OGM-GE, 1 seed
    python examples/benchmark.py --methods all --seeds 0 1 2 3 4      # every method, as in docs/results.md
    python examples/benchmark.py --datasets synthetic --methods baseline mmpareto pmr+cml --seeds 0 1 2
    python examples/benchmark.py --update --methods cml --seeds 0 1 2 3 4 --out docs/results  # re-run rows only

``--update`` re-runs the given methods (and, for the cost ratios only, the baseline in the same process) and
merges their rows into the saved ``benchmark_<dataset>.json`` of ``--out``: those methods' rows are replaced
(the replaced rows are kept under ``"replaced"`` in the JSON), every other row, the baseline and the
references are kept, and the table and plots are regenerated from the merged file.

A stacked method is its parts joined by ``+`` (``ogm_ge+cml``): their callbacks share one Trainer and their
loss terms one model. Columns: fused test accuracy, each encoder's linear-probe accuracy (probe fitted on the
training split, scored on test), test accuracy with each modality missing (its features zeroed), the best
validation accuracy, and the cost: median training-step time and whole-fit time, each divided by the
baseline's in the same seed and process.

Output: Lightning's per-fit banners are silenced, and one line per finished fit goes to stderr (fits done of
total, its best validation accuracy, elapsed time, time left); ``--progress`` adds Lightning's progress bar inside
each fit, ``--no-progress`` drops the lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    AVDigitsNet,
    collapse_terms,
    UnimodalNet,
    add_progress_arguments,
    evaluate_ensemble,
    evaluate_joint,
    evaluate_ume,
    evaluate_unimodal,
    fit,
    make_data,
    mean_std,
    median_range,
    modality_count,
    setup_for,
    training_runs,
)

from lightning_balance import (  # noqa: E402
    AGM,
    AMCo,
    OGMGE,
    OPM,
    PMR,
    GradientBlending,
    Greedy,
    Relearning,
    SampleValuation,
    InfoReg,
    MMPareto,
    ModalityMonitor,
    UMTLoss,
    UnimodalEnsemble,
)

# Balancing methods: name -> factory of the callbacks added to the joint model's Trainer (model and data
# changes are in _common.SETUPS). Each method's main parameter was chosen on AV-Digits validation accuracy
# (seeds 0-2) with examples/select_on_validation.py; the grids and results are in docs/results.md. The
# synthetic setting reuses them untuned.
METHODS: dict[str, Callable[[], list[pl.Callback]]] = {
    "baseline": lambda: [],
    "ogm_ge": lambda: [OGMGE(alpha=0.1, params="weights")],
    "ogm": lambda: [OGMGE(alpha=0.1, params="weights", noise=False)],
    # the published method (the paper's constants 0.95 audio / 0.10 visual, the audio trace's window, the unimodal
    # losses of the split head: _common.SETUPS), not tuned; and the generalised variant earlier tables called
    # "InfoReg": one strength (0.3, chosen on validation) for both modalities, each modality's own window, no
    # unimodal losses
    "inforeg": lambda: [InfoReg()],
    "inforeg_variant": lambda: [InfoReg(strength=0.3, window_from="own", unimodal_losses=False)],
    "agm": lambda: [AGM(alpha=0.5)],
    "pmr": lambda: [PMR(alpha=4.0)],
    # multimodal + unimodal losses (auxiliary linear heads), alone and combined by MMPareto / G-Blending
    "uni_losses": lambda: [],
    # the same objective through the split head instead of auxiliary heads: InfoReg's objective without InfoReg
    "uni_losses_split": lambda: [],
    "mmpareto": lambda: [MMPareto(gamma=2.0)],
    "gblend": lambda: [GradientBlending(every_n_epochs=20)],
    # the remaining survey methods (issue 14)
    "opm": lambda: [OPM(q_base=0.85)],
    "amco": lambda: [AMCo(eps=AMCO_EPS)],  # the benchmark's sigma 0.5; eps selected on validation
    "lfm": lambda: [],  # loss terms: see _common.SETUPS
    "lfm_learnable": lambda: [],
    "mbsd": lambda: [],
    # the official schedule (re-inits at epochs 20, 40, 60 of 90) scaled to the 40 epochs: 10, 20, 30; strength selected
    "relearning": lambda: [Relearning(strength=RELEARNING_STRENGTH, every_n_epochs=10, max_reinits=3)],
    # modality valuation: the official warm-up (5 of 60 epochs) scaled to the 40 epochs is 3; selected on validation
    "valuation": lambda: [SampleValuation(start_epoch=VALUATION_START)],
    "valuation_modality": lambda: [SampleValuation(level="modality", start_epoch=3, alpha=VALUATION_ALPHA)],
    "mla": lambda: [],  # a model change: see _common.SETUPS (projection off: selected on validation)
    "mla_projected": lambda: [],  # the same with the paper's head-gradient projection
    "reconboost": lambda: [],  # a model change: see _common.SETUPS
    # Greedy: its MMTM architecture trained plainly, and with the guided re-balancing (official window 5 and
    # starting epoch 2; epsilon selected on validation)
    "mmtm": lambda: [],
    "greedy": lambda: [Greedy(epsilon=GREEDY_EPSILON, branch_heads="unimodal_heads")],
    # loss terms and heads
    "cml": lambda: [],
    "mmcosine": lambda: [],
    "contrastive": lambda: [],
    "reconstruction": lambda: [],
    # UMT: the unimodal references' encoders are the frozen teachers (needs the references)
    "umt": lambda: [],
    # the collapse paper (issue 13): the student is the weakest modality alone, the teachers the others (weakest first)
    "kd_crd": lambda: [],
    "kd_infonce": lambda: [],
    "ebr": lambda: [],
}
# methods defined for one dataset only
ONLY_ON: dict[str, tuple[str, ...]] = {}
UMT_WEIGHT = 10.0  # BalanceBenchmark's lambda; not tuned
RELEARNING_STRENGTH = 3.0  # chosen on AV-Digits validation (docs/results.md)
VALUATION_START = 3  # chosen on AV-Digits validation (docs/results.md)
VALUATION_ALPHA = 2  # chosen on AV-Digits validation (docs/results.md)
AMCO_EPS = 10.0  # chosen on AV-Digits validation (0.3: 0.949, 1: 0.949, 3: 0.952, 10: 0.953; docs/results.md)
GREEDY_EPSILON = 0.1  # chosen on AV-Digits validation (0.001: 0.927, 0.01: 0.925, 0.1: 0.929; docs/results.md)

# every method on main, and the stacked combinations the docs report ("--methods all")
ALL = ["baseline", "ogm_ge", "ogm", "inforeg", "inforeg_variant", "agm", "pmr", "uni_losses", "uni_losses_split",
       "mmpareto", "gblend", "cml", "mmcosine", "contrastive", "reconstruction", "umt", "ogm_ge+cml", "ogm_ge+umt", "pmr+cml",
       "opm", "amco", "lfm", "lfm_learnable", "mbsd", "relearning", "valuation",
       "valuation_modality", "mla", "mla_projected", "reconboost", "mmtm", "greedy"]


def _check_method(name: str) -> str:
    if name == "all":
        return name
    unknown = [part for part in name.split("+") if part not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method part(s) {unknown} in {name!r}; choose from "
                                         f"{sorted(METHODS)}, joined by '+' to stack them, or 'all'.")
    return name


class StepTimer(pl.Callback):
    """Wall time of every training step (forward, backward, the callbacks' edits and the optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_seed(dataset: str, seed: int, methods: list[str], epochs: int, root: str, progress: bool,
             references: bool) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, float]]]]:
    data = make_data(dataset, seed)
    dims = dict(data.feature_dims)
    num_classes = data.num_classes
    results: dict[str, dict[str, float]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    alone: dict[str, UnimodalNet] = {}
    if references:
        for modality, dim in dims.items():
            pl.seed_everything(seed, verbose=False)
            model, val = fit(UnimodalNet(modality, dim, num_classes=num_classes), data, [], epochs,
                             f"{root}/{modality}", progress, label=f"{dataset} seed {seed} {modality} alone")
            results[f"{modality} alone"] = {**evaluate_unimodal(model, data), "val_acc": val}
            alone[modality] = model
        results["unimodal ensemble (product)"] = evaluate_ensemble(list(alone.values()), data)
        ume = UnimodalEnsemble({m: torch.nn.Sequential(model.encoder, model.head) for m, model in alone.items()},
                               combine="mean")
        results["UME (mean of probabilities)"] = evaluate_ume(ume, data)
    for method in methods:
        parts = method.split("+")
        pl.seed_everything(seed, verbose=False)
        model_kwargs, data_kwargs = setup_for(method, dims)
        if "umt" in parts:
            if not alone:
                raise SystemExit("umt needs the unimodal references (drop --no-references): they are its teachers.")
            teachers = {m: copy.deepcopy(model.encoder) for m, model in alone.items()}
            model_kwargs["loss_terms"] = [*model_kwargs.get("loss_terms", []), UMTLoss(teachers, weight=UMT_WEIGHT)]
        if any(part.startswith("kd_") for part in parts) and not alone:
            raise SystemExit("kd_* needs the unimodal references (drop --no-references): the weakest modality alone "
                             "is the student.")
        weakest_first = sorted(alone, key=lambda m: results[f"{m} alone"]["val_acc"]) if alone else list(dims)
        for part in parts:
            model_kwargs["loss_terms"] = [*model_kwargs.get("loss_terms", []),
                                          *collapse_terms(part, data, weakest_first)]
        method_data = make_data(dataset, seed, **data_kwargs) if data_kwargs else data
        watch, timer = ModalityMonitor(), StepTimer()
        callbacks = [cb for part in parts for cb in METHODS[part]()]
        start = time.perf_counter()
        model, val = fit(AVDigitsNet(input_dims=dims, num_classes=num_classes, **model_kwargs), method_data,
                         [*callbacks, watch, timer], epochs, f"{root}/{method}", progress,
                         label=f"{dataset} seed {seed} {method}")
        fit_seconds = time.perf_counter() - start
        results[method] = {**evaluate_joint(model, data), "val_acc": val, "step_ms": 1e3 * statistics.median(timer.times),
                           "fit_s": fit_seconds}
        for cb in callbacks:
            if isinstance(cb, MMPareto):
                results[method].update({f"conflict_rate_{m}": r for m, r in cb.conflict_rate.items()})
        curves[method] = watch.history
    if "baseline" in results:
        for method in methods:
            results[method]["step_ratio"] = results[method]["step_ms"] / results["baseline"]["step_ms"]
            results[method]["fit_ratio"] = results[method]["fit_s"] / results["baseline"]["fit_s"]
    return results, curves


def columns(modalities: list[str]) -> list[tuple[str, str]]:
    return [("acc", "fused acc"),
            *((f"probe_{m}", f"{m} probe") for m in modalities),
            *((f"acc_without_{m}", f"acc, {m} missing") for m in modalities),
            ("val_acc", "best val acc"), ("step_ratio", "step time ×, median (range)"),
            ("fit_ratio", "fit time ×, median (range)")]


def format_table(rows: dict[str, list[dict[str, float]]], cols: list[tuple[str, str]]) -> str:
    """Markdown table: one row per model, mean ± std over seeds; the best method mean of each accuracy
    column in bold (references excluded)."""
    def mean(name: str, key: str) -> float:
        values = [r[key] for r in rows[name] if key in r and not math.isnan(r[key])]
        return statistics.mean(values) if values else math.nan

    methods = [name for name in rows if "alone" not in name and "ensemble" not in name and "UME" not in name]
    best = {key: max((mean(n, key) for n in methods), default=math.nan)
            for key, _ in cols if not key.endswith("ratio") and key != "val_acc"}
    lines = ["| model | " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, runs in rows.items():
        cells = []
        for key, _ in cols:
            values = [r.get(key, math.nan) for r in runs]
            text = mean_std(values) if not key.endswith("ratio") else median_range(values)
            if name in methods and key in best and len(methods) > 1 and mean(name, key) == best[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bars(rows: dict[str, list[dict[str, float]]], modalities: list[str], title: str, path: str) -> None:
    """Fused accuracy and each encoder's probe per model (mean ± std over seeds), references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [n for n in rows if "alone" not in n and "ensemble" not in n and "UME" not in n]
    keys = [("acc", "fused accuracy")] + [(f"probe_{m}", f"{m} probe") for m in modalities]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.32 * len(methods) + 1.6), sharey=True)
    for ax, (key, label) in zip(axes, keys):
        stats = []
        for n in methods:
            values = [r[key] for r in rows[n] if key in r]
            stats.append((statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
        y = list(range(len(methods)))
        ax.barh(y, [s[0] for s in stats], xerr=[s[1] for s in stats], color="C0", alpha=0.75)
        base = stats[methods.index("baseline")][0] if "baseline" in methods else None
        if base is not None:
            ax.axvline(base, color="k", lw=1, ls=":", label="baseline")
        ref_name = "unimodal ensemble (product)" if key == "acc" else f"{key[6:]} alone"
        if ref_name in rows and key in rows[ref_name][0]:
            ax.axvline(statistics.mean(r[key] for r in rows[ref_name]), color="C3", lw=1.5, ls="--",
                       label="ensemble" if key == "acc" else "trained alone")
        lo = min(s[0] - s[1] for s in stats)
        ax.set_xlim(max(0.0, lo - 0.05), min(1.0, max(s[0] + s[1] for s in stats) + 0.03))
        ax.set_title(label)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves_by_seed: list[dict[str, list[dict[str, float]]]], modalities: list[str], title: str,
                path: str, methods: list[str]) -> None:
    """Validation accuracy over epochs, per modality (unimodal logits) and fused, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(f"val_acc/{m}", f"{m} (unimodal logits)") for m in modalities] + [("val_acc_fused", "fused")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.8), sharey=True)
    for ax, (key, label) in zip(axes, keys):
        for i, method in enumerate(methods):
            runs = [c[method] for c in curves_by_seed]
            epochs = [row["epoch"] for row in runs[0]]
            values = torch.tensor([[row[key] for row in run] for run in runs])
            mean = values.mean(0)
            ax.plot(epochs, mean, color=f"C{i % 10}", ls="-" if i < 10 else "--", label=method)
            if len(runs) > 1:
                std = values.std(0)
                ax.fill_between(epochs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.12)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[-1].legend(loc="lower right", fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(saved: dict, stem: str) -> None:
    """The JSON file, the markdown table and the two PNGs of one dataset's run (also from a saved JSON)."""
    dataset, per_seed, seeds = saved["dataset"], saved["results"], saved["seeds"]
    modalities = [k[len("probe_"):] for k in per_seed["baseline" if "baseline" in per_seed else saved["methods"][0]][0]
                  if k.startswith("probe_")]
    title = f"{TITLES[dataset]}: {len(seeds)} seed(s), test metrics at the best-validation epoch"
    table = format_table(per_seed, columns(modalities))
    header = (f"{title}; mean ± std over seeds {seeds}; {saved['epochs']} epochs; {saved['seconds']:.0f} s on "
              f"{saved.get('threads', 2)} CPU thread(s).\n\nCommand: `{saved['command']}`\n")
    for update in saved.get("updates", []):
        header += (f"\nRows {', '.join(update['methods'])} re-run and merged ({update['seconds']:.0f} s): "
                   f"`{update['command']}`\n")
    with open(f"{stem}.md", "w") as f:
        f.write(header + "\n" + table + "\n")
    with open(f"{stem}.json", "w") as f:
        json.dump(saved, f, indent=1)
    plot_bars(per_seed, modalities, title, f"{stem}.png")
    plot_curves(saved["curves"], modalities, f"{TITLES[dataset]}: validation accuracy ({len(seeds)} seed(s), "
                f"mean ± std)", f"{stem}_curves.png", saved["methods"])
    print(f"\n{header}\n{table}\n\nfiles: {stem}.json .md .png _curves.png")


def merge_update(saved: dict, fresh: dict, methods: list[str], command: str, seconds: float,
                 drop: Sequence[str] = ()) -> dict:
    """``saved`` with the rows and curves of ``methods`` replaced by those of ``fresh`` (same dataset, seeds and
    epochs); every other row (the baseline and the references included) is kept, except those in ``drop``. The
    replaced and dropped rows are kept under ``"replaced"``, and the update is listed under ``"updates"``."""
    for key in ("dataset", "seeds", "epochs"):
        if saved[key] != fresh[key]:
            raise SystemExit(f"--update: the saved file has {key} {saved[key]!r}, this run {fresh[key]!r}; they must match.")
    merged = copy.deepcopy(saved)
    for method in methods:
        if method in merged["results"]:
            merged.setdefault("replaced", {}).setdefault(method, []).append(merged["results"][method])
        merged["results"][method] = fresh["results"][method]
        for old_curves, new_curves in zip(merged["curves"], fresh["curves"]):
            old_curves[method] = new_curves[method]
        if method not in merged["methods"]:
            merged["methods"].append(method)
    for method in drop:
        if method in merged["results"]:
            merged.setdefault("replaced", {}).setdefault(method, []).append(merged["results"].pop(method))
            merged["methods"] = [m for m in merged["methods"] if m != method]
            for curves in merged["curves"]:
                curves.pop(method, None)
    merged.setdefault("updates", []).append({"command": command, "methods": methods, "seconds": seconds,
                                             **({"dropped": list(drop)} if drop else {})})
    return merged


TITLES = {"av_digits": "AV-Digits", "synthetic": "Synthetic, weak but necessary modality (preset 'dominant')"}


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[dict[str, float]]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", type=_check_method, default=["baseline", "ogm_ge"],
                        help=f"methods {sorted(METHODS)}, stacked with '+', or 'all' ({' '.join(ALL)})")
    parser.add_argument("--datasets", nargs="+", default=["av_digits"], choices=sorted(TITLES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="results", help="folder for the JSON, markdown and PNG files")
    parser.add_argument("--tag", default="", help="added to the output file names")
    parser.add_argument("--no-references", action="store_true", help="skip the unimodal references")
    add_progress_arguments(parser)
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only redraw the table and plots of saved runs")
    parser.add_argument("--update", action="store_true",
                        help="re-run only --methods and merge their rows into the saved benchmark_<dataset>.json of --out")
    parser.add_argument("--drop", nargs="+", default=[], metavar="METHOD",
                        help="with --update: rows to remove from the saved file (kept under 'replaced'), e.g. a method "
                             "that no longer exists")
    args = parser.parse_args(argv)
    methods = list(dict.fromkeys(m for name in args.methods for m in (ALL if name == "all" else [name])))
    updated = [m for m in methods if m != "baseline"]
    if args.update:
        if not updated or "all" in args.methods:
            parser.error("--update re-runs the methods named in --methods (not 'all', not only the baseline).")
        if any(part == "umt" for m in updated for part in m.split("+")):
            parser.error("--update does not re-run umt (it needs the references as teachers); re-run the benchmark.")
        args.no_references = True  # the saved references are kept
        methods = ["baseline", *updated]  # the baseline of this process is only the denominator of the cost ratios
    if "baseline" in methods:  # first, so that every cost ratio has its denominator in the same process state
        methods.remove("baseline")
        methods.insert(0, "baseline")

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    command = "python examples/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    everything = {}
    if args.render:
        for path in args.render:
            with open(path) as f:
                saved = json.load(f)
            write_outputs(saved, os.path.splitext(path)[0])
        return {}
    def runnable(dataset: str) -> list[str]:
        return [m for m in methods if all(dataset in ONLY_ON.get(p, (dataset,)) for p in m.split("+"))]

    # one progress line per fit of the whole job: per dataset and seed, each modality alone and each method
    total = sum(len(args.seeds) * (len(runnable(d)) + (0 if args.no_references else modality_count(d)))
                for d in args.datasets)
    with training_runs(total, enabled=not args.no_progress):
        for dataset in args.datasets:
            names = runnable(dataset)
            if "all" not in args.methods and names != methods:
                parser.error(f"{sorted(set(methods) - set(names))} cannot run on {dataset}: "
                             f"{ {p: ONLY_ON[p] for p in ONLY_ON} } lists the datasets of one-dataset methods.")
            stem = os.path.join(args.out, f"benchmark_{dataset}{'_' + args.tag if args.tag else ''}")
            if args.update:  # before any training: the saved file must exist and match this run
                if not os.path.exists(f"{stem}.json"):
                    parser.error(f"--update merges into {stem}.json, which does not exist.")
                with open(f"{stem}.json") as f:
                    saved = json.load(f)
                if (saved["seeds"], saved["epochs"]) != (args.seeds, args.epochs):
                    parser.error(f"--update: {stem}.json has seeds {saved['seeds']} and {saved['epochs']} epochs; "
                                 f"re-run with the same.")
            start = time.time()
            per_seed: dict[str, list[dict[str, float]]] = {}
            curves = []
            with tempfile.TemporaryDirectory() as root:
                for seed in args.seeds:
                    results, seed_curves = run_seed(dataset, seed, names, args.epochs, f"{root}/{seed}",
                                                    args.progress, not args.no_references)
                    for name, values in results.items():
                        per_seed.setdefault(name, []).append({"seed": seed, **values})
                    curves.append(seed_curves)
                    print(f"[{dataset}] seed {seed} done ({time.time() - start:.0f} s)", flush=True)
            seconds = time.time() - start
            fresh = {"command": command, "dataset": dataset, "epochs": args.epochs, "seeds": args.seeds,
                     "seconds": seconds, "threads": torch.get_num_threads(), "methods": names,
                     "results": per_seed, "curves": curves}
            if args.update:
                check = [(a["acc"], b["acc"]) for a, b in zip(saved["results"]["baseline"], per_seed["baseline"])]
                same = all(abs(a - b) < 1e-6 for a, b in check)
                print(f"[{dataset}] baseline re-run {'reproduces' if same else 'DIFFERS FROM'} the saved baseline "
                      f"(test acc per seed, saved vs now: {check})", flush=True)
                fresh = merge_update(saved, fresh, updated, command, seconds, drop=args.drop)
            write_outputs(fresh, stem)
            everything[dataset] = per_seed
    return everything


if __name__ == "__main__":
    main()
