"""The collapse paper's claims on our data (Chaudhuri et al., ICML 2025): baseline, cross-modal distillation (CRD and
in-batch InfoNCE), EBR and EBR with test-time substitution, over seeds, with the parameters chosen on validation.

Three stages:

``--stage calibrate`` finds a synthetic setting in which the weak modality is truly **under-learned** by joint
training (the paper's premise; the ``dominant`` preset's weak modality is not: its joint probe equals its alone
probe). For a grid of generator settings, per seed: each modality trained alone and the joint baseline; the weak
encoder's linear probe (fitted on train, scored on validation) alone and after joint training, the fused and each-alone
accuracies. Writes ``calibrate_underlearned.{json,md}``; the chosen row is the preset ``underlearned``.

``--stage select`` chooses the KD weight (CRD and in-batch) and EBR's adversarial weight lambda on **validation**
accuracy (mean over the seeds); writes ``select_collapse_<dataset>.json``. ``--stage run`` reads it.

``--stage run`` per dataset and seed: each modality alone (the weak one, its probe and rank are the references),
the joint baseline, ``kd_crd``, ``kd_infonce`` and ``ebr``, each restored to its best-validation epoch, scored on
test: fused accuracy, the weak encoder's probe against the same encoder trained alone, the effective rank of the
fused representation (the fusion's input), the cross-modal polysemanticity of the head's neurons (ours:
:func:`lightning_balance.functional.fusion_polysemanticity`), and the area under the missing-rate curve (each
modality and all of them absent independently at test-time rates 0 to 0.5, zero fill; for ``ebr`` also the
paper's substitution, ``ebr + substitution``, its order fitted on validation). Writes ``collapse_<dataset>.{json,md}``.
With ``--fusion-hidden K`` the fusion has a hidden ReLU layer of K neurons (``HiddenFusion``), whose
polysemanticity is scored instead of the logits'; it writes ``collapse_<dataset>_hidden<K>.{json,md}``.

    python examples/collapse_study.py --stage calibrate --seeds 0 1 --out docs/results
    python examples/collapse_study.py --stage select --seeds 0 1 2 --out docs/results
    python examples/collapse_study.py --stage run --seeds 0 1 2 3 4 --out docs/results
    python examples/collapse_study.py --stage semantic --seeds 0 1 2 --out docs/results

``--stage semantic`` is the paper's Fig. 4: the weak encoder's semantic loss by linear evaluation over epochs under
joint training, against the same model with the weak modality's own loss added, and with KD and EBR; writes
``semantic_loss.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DATASET_NAMES,
    AVDigitsNet,
    HiddenFusion,
    UnimodalNet,
    add_run_arguments,
    chosen_parameters,
    collapse_terms,
    evaluate_unimodal,
    fit,
    make_data,
    mean_std,
    modality_count,
    training_runs,
)

from lightning_balance.data import SyntheticCollapseDataModule  # noqa: E402
from lightning_balance.functional import (  # noqa: E402
    curve_area,
    effective_rank,
    fusion_polysemanticity,
    linear_probe_accuracy,
    sweep_presence,
)

RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DATASETS = ("av_digits", "underlearned")
METHODS = ("baseline", "kd_crd", "kd_infonce", "ebr")
# the selection grids: the KD weight (official CRD -b 0.8) and EBR's lambda (the third-party sweep's range 1e-3..1,
# default 0.01)
GRIDS = {"kd_crd": ("weight", [0.2, 0.8, 2.0]), "kd_infonce": ("weight", [0.2, 0.8, 2.0]),
         "ebr": ("adversarial_weight", [0.001, 0.01, 0.1, 1.0])}
# --extend adds these values to a saved selection (the first grids' best were at their ends: KD's weight 2 and
# 0.2, EBR's lambda 1), runs only them and merges them in
EXTENDED = {"kd_crd": [0.05, 5.0], "kd_infonce": [5.0], "ebr": [3.0]}
# the calibration grid: the snr of m0 (strong) and of m1 (weak), and m1's pure-noise dimensions (a random encoder
# passes them on to the probe; a trained one learns to suppress them: with few of them even an untrained encoder
# reads well, and under-learning cannot show in a probe); both see every class
CALIBRATION = [{"snr": [s0, s1], "classes_seen": [10, 10], "noise_dims": [16, n1]}
               for s0, s1, n1 in itertools.product([3.0, 4.0], [1.5, 2.0, 2.5], [16, 240])]


# ---------------------------------------------------------------------------------------------------- calibrate
def calibrate(seeds: list[int], epochs: int, root: str, progress: bool) -> dict:
    rows = []
    for i, setting in enumerate(CALIBRATION):
        per_seed = []
        for seed in seeds:
            data = SyntheticCollapseDataModule(num_samples=3000, seed=seed, **setting)
            data.setup()
            dims = dict(data.feature_dims)
            out = {}
            for m, d in dims.items():
                pl.seed_everything(seed, verbose=False)
                model, _ = fit(UnimodalNet(m, d, num_classes=data.num_classes), data, [], epochs, f"{root}/c{i}{m}", progress,
                               label=f"calibration {i + 1} seed {seed} {m} alone")
                r = evaluate_unimodal(model, data, split="val")  # the preset is chosen on validation
                out[f"alone_acc_{m}"], out[f"alone_probe_{m}"] = r["acc"], r[f"probe_{m}"]
            pl.seed_everything(seed, verbose=False)
            joint, _ = fit(AVDigitsNet(input_dims=dims, num_classes=data.num_classes), data, [], epochs,
                           f"{root}/c{i}joint", progress, label=f"calibration {i + 1} seed {seed} joint")
            out.update(_scores(joint, data, "m1", split="val"))
            per_seed.append(out)
        rows.append({"setting": setting, "seeds": per_seed})
        gap = statistics.mean(s["alone_probe_m1"] - s["probe_weak"] for s in per_seed)
        print(f"calibration {i + 1}/{len(CALIBRATION)} {setting}: m1 under-learned by {gap:+.3f}", flush=True)
    return {"rows": rows}


def calibration_table(saved: dict) -> str:
    lines = ["| snr (m0, m1) | noise dims of m1 | m0 alone | m1 alone | fused | m1 probe alone | m1 probe joint | "
             "under-learned (alone − joint) |", "|---|---|---|---|---|---|---|---|"]
    for row in saved["rows"]:
        s, seeds = row["setting"], row["seeds"]

        def col(key: str) -> str:
            return mean_std([x[key] for x in seeds])
        gap = mean_std([x["alone_probe_m1"] - x["probe_weak"] for x in seeds])
        lines.append(f"| {s['snr'][0]:g}, {s['snr'][1]:g} | {s['noise_dims'][1]} | {col('alone_acc_m0')} | "
                     f"{col('alone_acc_m1')} | {col('acc')} | {col('alone_probe_m1')} | {col('probe_weak')} | {gap} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def _scores(model: AVDigitsNet, data, weak: str, substitution: bool = False, split: str = "test") -> dict[str, float]:
    """Metrics of a joint model on ``split``: fused accuracy, the weak encoder's probe (fitted on train), the fused
    effective rank, the head's polysemanticity and the missing-rate curves (through ``fusion_inputs``, so EBR
    substitutes when its order is fitted and ``substitution``)."""
    model.eval()
    test, train = data.splits[split], data.splits["train"]
    names, y, c = list(model.modalities), test["target"], data.num_classes
    encoded = model.features(test)
    feats, _ = model.fusion_inputs(encoded)
    out = {"acc": float((model.fuse_features(feats).argmax(-1) == y).float().mean())}
    out["probe_weak"] = linear_probe_accuracy(model.features(train)[weak], train["target"], encoded[weak], y, c)
    out["erank"] = effective_rank(torch.cat([feats[m] for m in names], 1))
    # the fusion neurons: the hidden layer of a HiddenFusion, else the linear head's logits
    layer = model.head.act if isinstance(model.head, HiddenFusion) else model.head
    poly = fusion_polysemanticity(model, feats, layer)
    out["polysemantic"], out["polysemantic_fraction"] = float(poly["mean"]), float(poly["fraction"])
    out["polysemantic_live"] = float(poly["live"])  # neurons that some removal moves (ReLU neurons can die)
    positions = torch.arange(len(y))
    for which in (*names, "all"):
        curve = []
        for rate in RATES:
            mask = sweep_presence(positions, names, rate, which)
            if substitution:
                sub, sub_mask = model.fusion_inputs(encoded, present=mask)  # EBR's substitution marks them present
                logits = model.fuse_subset(sub, names, present=sub_mask)
            else:
                logits = model.fuse_subset(feats, names, present=mask)
            curve.append(float((logits.argmax(-1) == y).float().mean()))
        out[f"auc_missing/{which}"] = curve_area(RATES, curve)
        out.update({f"missing/{which}/{r:g}": a for r, a in zip(RATES, curve)})
    return out


# ---------------------------------------------------------------------------------------------------- select, run
def references(dataset: str, seed: int, epochs: int, root: str, progress: bool):
    """The data, each modality trained alone (its test scores), and the modalities weakest first by validation."""
    data = make_data(dataset, seed)
    alone, val = {}, {}
    for m, d in data.feature_dims.items():
        pl.seed_everything(seed, verbose=False)
        alone[m], val[m] = fit(UnimodalNet(m, d, num_classes=data.num_classes), data, [], epochs, f"{root}/{m}", progress,
                               label=f"{dataset} seed {seed} {m} alone")
    return data, alone, sorted(val, key=val.get)


def train(method: str, data, weakest_first: list[str], seed: int, epochs: int, root: str, progress: bool,
          value: float | None = None, fusion_hidden: int = 0, dataset: str = ""):
    """The joint model of ``method`` (``value``: its searched parameter; ``fusion_hidden``: the width of a hidden
    fusion layer, 0 for the linear head), restored to its best-validation epoch (``dataset``: its name in the
    progress line)."""
    kwargs = {GRIDS[method][0]: value} if value is not None else {}
    pl.seed_everything(seed, verbose=False)
    terms = collapse_terms(method, data, weakest_first, **kwargs)
    model = AVDigitsNet(input_dims=dict(data.feature_dims), num_classes=data.num_classes, loss_terms=terms or None,
                        fusion_hidden=fusion_hidden)
    label = f"{dataset + ' ' if dataset else ''}seed {seed} {method}{'' if value is None else f' {value:g}'}"
    return fit(model, data, [], epochs, f"{root}/{method}_{value}", progress, label=label)


def select(datasets: list[str], seeds: list[int], epochs: int, root: str, progress: bool,
           grids: dict | None = None, baseline: bool = True) -> dict:
    grids = GRIDS if grids is None else grids
    out: dict = {}
    for dataset in datasets:
        out[dataset] = {method: {f"{v:g}": [] for v in grid} for method, (_, grid) in grids.items()}
        if baseline:
            out[dataset]["baseline"] = {"-": []}
        for seed in seeds:
            data, _, weakest_first = references(dataset, seed, epochs, root, progress)
            if baseline:
                out[dataset]["baseline"]["-"].append(
                    train("baseline", data, weakest_first, seed, epochs, root, progress, dataset=dataset)[1])
            for method, (_, grid) in grids.items():
                for v in grid:
                    _, best = train(method, data, weakest_first, seed, epochs, root, progress, v, dataset=dataset)
                    out[dataset][method][f"{v:g}"].append(best)
                    print(f"select {dataset} seed {seed} {method} {v:g}: val {best:.4f}", flush=True)
        out[dataset]["chosen"] = choose(out[dataset])
    return out


def choose(values_by_method: dict) -> dict[str, float]:
    """Per method, the value of the highest mean validation accuracy over the seeds."""
    return {method: float(max(values, key=lambda k: statistics.mean(values[k])))
            for method, values in values_by_method.items() if method in GRIDS}


def run(dataset: str, seed: int, chosen: dict[str, float], epochs: int, root: str, progress: bool,
        fusion_hidden: int = 0) -> dict:
    data, alone, weakest_first = references(dataset, seed, epochs, root, progress)
    weak = weakest_first[0]
    test, train_split = data.splits["test"], data.splits["train"]
    with torch.no_grad():
        z_alone = alone[weak].encoder(test[weak])
        probe_alone = linear_probe_accuracy(alone[weak].encoder(train_split[weak]), train_split["target"], z_alone,
                                            test["target"], data.num_classes)
    out: dict = {"weak": weak, "alone": {"probe_weak": probe_alone, "erank_weak": effective_rank(z_alone),
                                         **{f"acc_{m}": evaluate_unimodal(a, data)["acc"] for m, a in alone.items()}},
                 "methods": {}}
    for method in METHODS:
        start = time.perf_counter()
        model, best = train(method, data, weakest_first, seed, epochs, root, progress, chosen.get(method), fusion_hidden,
                            dataset=dataset)
        seconds = time.perf_counter() - start
        out["methods"][method] = {**_scores(model, data, weak), "val_acc": best, "fit_s": seconds}
        if method == "ebr":
            term = model.balance_losses["ebr"]
            term.fit_substitution(model, data.val_dataloader())
            term.substitute = True
            out["methods"]["ebr + substitution"] = {**_scores(model, data, weak, substitution=True), "val_acc": best,
                                                    "order": term.order.tolist()}
    return out


SEMANTIC_RUNS = ("unimodal baseline", "baseline", "kd_infonce", "ebr")


def semantic(dataset: str, seed: int, chosen: dict[str, float], epochs: int, every: int, root: str,
             progress: bool) -> dict:
    """The collapse paper's Fig. 4 (and the loss dynamics of its Fig. 6): the weak encoder's semantic loss by
    linear evaluation (``ModalityDiagnostics``' ``semantic_loss/<weak>``, a 2-fold probe on validation) every
    ``every`` epochs, for the joint baseline ("multimodal prefix"), the same model with the weak modality's own
    unimodal loss added ("unimodal baseline": weight 1, through an auxiliary linear head), KD and EBR (for EBR the
    diagnosis reads what the fusion receives, the decoded features). The baseline's
    diagnosis takes the unimodal baseline's last value as ``alone_semantic_loss``: its verdict is kept."""
    from lightning_balance import ModalityDiagnostics

    data, _, weakest_first = references(dataset, seed, epochs, root, progress)
    weak = weakest_first[0]
    out: dict = {"weak": weak, "curves": {}}
    reference = None
    for run_name in SEMANTIC_RUNS:
        method = "baseline" if run_name == "unimodal baseline" else run_name
        pl.seed_everything(seed, verbose=False)
        value = chosen.get(method)
        terms = collapse_terms(method, data, weakest_first, **({GRIDS[method][0]: value} if value is not None else {}))
        # the unimodal baseline's own loss goes through an auxiliary linear head, so that it trains the encoder and
        # leaves the fusion head as the multimodal prefix's (the paper: the encoder "additionally optimized")
        extra = {"aux_heads": True, "unimodal_losses": True} if run_name == "unimodal baseline" else {}
        model = AVDigitsNet(input_dims=dict(data.feature_dims), num_classes=data.num_classes, loss_terms=terms or None,
                            **extra)
        if run_name == "unimodal baseline":
            model.loss_weights = {"fused": 1.0, **{m: float(m == weak) for m in data.feature_dims}}
        diag = ModalityDiagnostics(every_n_epochs=every, vif=False, bootstrap=0, verbose=False, plot=False,
                                   alone_semantic_loss=reference if run_name == "baseline" else None)
        fit(model, data, [diag], epochs, f"{root}/semantic_{run_name}", progress,
            label=f"{dataset} seed {seed} {run_name}")
        out["curves"][run_name] = [(row["epoch"], row[f"semantic_loss/{weak}"], row[f"probe/{weak}"])
                                   for row in diag.diagnostics_history]
        if run_name == "unimodal baseline":
            last = diag.diagnostics_history[-1]
            reference = {weak: (last[f"semantic_loss/{weak}"], last[f"semantic_loss_se/{weak}"])}
        if run_name == "baseline":
            out["verdict"] = diag.reports[-1][1]
    return out


def plot_semantic(saved: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(saved["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        seeds = saved["datasets"][dataset]
        for i, run_name in enumerate(SEMANTIC_RUNS):
            curves = [seeds[s]["curves"][run_name] for s in seeds]
            epochs = [e for e, _, _ in curves[0]]
            values = [[c[j][1] for c in curves] for j in range(len(epochs))]
            mean = [statistics.mean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.plot(epochs, mean, "o-", ms=3, color=f"C{i}", label=run_name)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=f"C{i}", alpha=0.15)
        weak = next(iter(seeds.values()))["weak"]
        ax.set(title=f"{dataset}: semantic loss of the weak encoder ({weak})", xlabel="epoch",
               ylabel="linear-evaluation cross-entropy (validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def semantic_table(saved: dict) -> str:
    lines = ["| data | run | weak encoder's semantic loss, first diagnosis | last | min | probe, last |",
             "|---|---|---|---|---|---|"]
    for dataset, seeds in saved["datasets"].items():
        for run_name in SEMANTIC_RUNS:
            curves = [seeds[s]["curves"][run_name] for s in seeds]
            lines.append(f"| {dataset} | {run_name} | {mean_std([c[0][1] for c in curves])} | "
                         f"{mean_std([c[-1][1] for c in curves])} | {mean_std([min(x[1] for x in c) for c in curves])} | "
                         f"{mean_std([c[-1][2] for c in curves])} |")
    return "\n".join(lines)


COLUMNS = [("acc", "fused acc"), ("probe_weak", "weak probe"), ("probe_gap", "weak probe − alone"),
           ("erank", "fused erank"), ("polysemantic", "polysemanticity"),
           ("polysemantic_fraction", "polysemantic neurons"), ("auc_missing/weak", "area, weak missing"),
           ("auc_missing/strong", "area, strong missing"), ("auc_missing/all", "area, all missing")]


def run_table(saved: dict) -> str:
    seeds = saved["seeds"]
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    alone = [seeds[s]["alone"] for s in seeds]
    lines.append(f"| weak modality alone | {mean_std([a['acc_' + seeds[s]['weak']] for s, a in zip(seeds, alone)])} | "
                 f"{mean_std([a['probe_weak'] for a in alone])} | 0 | {mean_std([a['erank_weak'] for a in alone])} | – | – | – | – | – |")
    for method in (*METHODS, "ebr + substitution"):
        cells = []
        for key, _ in COLUMNS:
            values = []
            for s in seeds:
                row, weak = seeds[s]["methods"][method], seeds[s]["weak"]
                strong = next(m for m in saved["modalities"] if m != weak)
                if key == "probe_gap":
                    values.append(row["probe_weak"] - seeds[s]["alone"]["probe_weak"])
                elif key == "polysemantic_fraction":  # not in the files of runs before it was added
                    values.append(row.get(key, math.nan))
                else:
                    values.append(row[key.replace("/weak", f"/{weak}").replace("/strong", f"/{strong}")])
            cells.append(mean_std(values))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=["calibrate", "select", "run", "semantic"])
    parser.add_argument("--every", type=int, default=2, help="--stage semantic: diagnose every this many epochs")
    parser.add_argument("--extend", action="store_true", help="--stage select: add the EXTENDED values to the grids")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASET_NAMES)
    parser.add_argument("--fusion-hidden", type=int, default=0,
                        help="--stage run: a hidden fusion layer of this width (the polysemanticity of its neurons); "
                             "0: the linear head. The parameters stay those selected with the linear head")
    add_run_arguments(parser, selection_default="--out")
    args = parser.parse_args(argv)
    if args.fusion_hidden < 0:
        parser.error(f"--fusion-hidden must be >= 0 (0: the linear head), got {args.fusion_hidden}.")
    if args.fusion_hidden and args.stage != "run":
        parser.error("--fusion-hidden is an option of --stage run (calibration, selection and the semantic stage use "
                     "the linear head).")
    os.makedirs(args.out, exist_ok=True)
    command = "python examples/collapse_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    root = tempfile.mkdtemp(prefix="collapse_")
    with training_runs(fit_count(args), enabled=not args.no_progress):  # quiet fits, one line per finished fit
        return stage(args, command, root, args.progress)


def fit_count(args: argparse.Namespace) -> int:
    """The number of fits of the stage of ``args`` (for the progress line)."""
    seeds = len(args.seeds)
    if args.stage == "calibrate":  # each modality alone and the joint baseline, per setting and seed
        return seeds * sum(len(setting["snr"]) + 1 for setting in CALIBRATION)
    per_dataset = {"select": (sum(len(EXTENDED[m]) for m in EXTENDED) if args.extend
                              else 1 + sum(len(grid) for _, grid in GRIDS.values())),
                   "run": len(METHODS), "semantic": len(SEMANTIC_RUNS)}[args.stage]
    return seeds * sum(modality_count(d) + per_dataset for d in args.datasets)  # + the modalities alone


def stage(args: argparse.Namespace, command: str, root: str, progress: bool) -> dict:
    """Run the stage of ``args`` and write its files (``progress``: Lightning's bar inside each fit)."""
    start = time.perf_counter()
    if args.stage == "calibrate":
        saved = {"command": command, "epochs": args.epochs, "seeds": args.seeds,
                 **calibrate(args.seeds, args.epochs, root, progress)}
        saved["seconds"] = time.perf_counter() - start
        text = calibration_table(saved)
        with open(os.path.join(args.out, "calibrate_underlearned.json"), "w") as f:
            json.dump(saved, f, indent=1)
        with open(os.path.join(args.out, "calibrate_underlearned.md"), "w") as f:
            f.write(f"`{command}` ({saved['seconds']:.0f} s; validation split, mean ± std over seeds {args.seeds})\n\n{text}\n")
        print(text)
        return saved
    if args.stage == "select" and args.extend:
        saved = {}
        extra = {method: (GRIDS[method][0], values) for method, values in EXTENDED.items()}
        for dataset in args.datasets:
            path = os.path.join(args.out, f"select_collapse_{dataset}.json")
            with open(path) as f:
                one = json.load(f)
            if one["seeds"] != args.seeds:
                raise SystemExit(f"--extend: {path} was selected on seeds {one['seeds']}, not {args.seeds}.")
            fresh = select([dataset], args.seeds, args.epochs, root, progress, grids=extra, baseline=False)[dataset]
            for method, values in fresh.items():
                if method in GRIDS:
                    one[dataset][method].update(values)
                    one["grids"][method][1] = sorted({*one["grids"][method][1], *extra[method][1]})
            one[dataset]["chosen"] = choose(one[dataset])
            one.setdefault("extensions", []).append({"command": command, "values": EXTENDED,
                                                      "seconds": time.perf_counter() - start})
            with open(path, "w") as f:
                json.dump(one, f, indent=1)
            print(dataset, "chosen on validation:", one[dataset]["chosen"])
            saved[dataset] = one[dataset]
        return saved
    if args.stage == "select":
        saved = {}
        for dataset in args.datasets:  # one file per dataset: the datasets can be selected in parallel processes
            one = {"command": command, "epochs": args.epochs, "seeds": args.seeds, "grids": GRIDS,
                   **select([dataset], args.seeds, args.epochs, root, progress)}
            one["seconds"] = time.perf_counter() - start
            with open(os.path.join(args.out, f"select_collapse_{dataset}.json"), "w") as f:
                json.dump(one, f, indent=1)
            print(dataset, "chosen on validation:", one[dataset]["chosen"])
            saved[dataset] = one[dataset]
        return saved
    chosen_by_dataset = {dataset: chosen_parameters(args.selection or args.out, dataset) for dataset in args.datasets}
    if args.stage == "semantic":
        saved = {"command": command, "epochs": args.epochs, "seeds": args.seeds, "datasets": {}}
        for dataset in args.datasets:
            saved["datasets"][dataset] = {str(seed): semantic(dataset, seed, chosen_by_dataset[dataset], args.epochs,
                                                              args.every, root, progress) for seed in args.seeds}
        saved["seconds"] = time.perf_counter() - start
        stem = os.path.join(args.out, "semantic_loss")
        with open(stem + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        text = semantic_table(saved)
        with open(stem + ".md", "w") as f:
            f.write(f"`{command}` ({saved['seconds']:.0f} s). Validation split, 2-fold probe; mean ± std over seeds "
                    f"{args.seeds}.\n\n{text}\n")
        print(text)
        try:
            plot_semantic(saved, stem + ".png")
        except ImportError:
            print("matplotlib is not installed: no PNG", file=sys.stderr)
        return saved
    everything = {}
    for dataset in args.datasets:
        chosen = chosen_by_dataset[dataset]
        saved = {"command": command, "dataset": dataset, "epochs": args.epochs, "chosen": chosen, "rates": RATES,
                 "fusion_hidden": args.fusion_hidden, "modalities": list(make_data(dataset, 0).modalities), "seeds": {}}
        for seed in args.seeds:
            saved["seeds"][str(seed)] = run(dataset, seed, chosen, args.epochs, root, progress, args.fusion_hidden)
            print(f"{dataset} seed {seed}: " + ", ".join(f"{m} {r['acc']:.3f}" for m, r in
                                                         saved["seeds"][str(seed)]["methods"].items()), flush=True)
        saved["seconds"] = time.perf_counter() - start
        text = run_table(saved)
        stem = os.path.join(args.out, f"collapse_{dataset}" + (f"_hidden{args.fusion_hidden}" if args.fusion_hidden else ""))
        with open(stem + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"`{command}` ({saved['seconds']:.0f} s). Test split, mean ± std over seeds {args.seeds}; each model "
                    f"at its best-validation epoch; parameters chosen on validation: {chosen}.\n\n{text}\n")
        print(text)
        everything[dataset] = saved
    return everything


if __name__ == "__main__":
    main()
