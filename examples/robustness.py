"""Robustness to absent and noisy modalities: methods trained with a missing rate, scored on complete test data
and against test-time missing rates and input noise.

Per dataset, seed, training missing rate and method: the joint model (AV-Digits MLPs, concat head) is trained on
the training split with that share of each modality absent (MUSE-style independent masking, never all of a
sample's; ``missing_rate`` of the data module), the validation split masked the same way; it is restored to
its epoch of best **validation** accuracy, then scored on the complete test split and on test-time sweeps:

* missing rate 0 to 0.5: each modality absent at that rate, and every modality absent independently at it
  (masks from the sample positions, :func:`lightning_balance.functional.sweep_presence`); the absent features
  replaced by the model's own fill (zeros, or the learned embedding of ``baseline_learned``), and, as another
  baseline of absent inputs, by the mean of the training features ("mean fill");
* uniform input noise on the weakest modality (the one with the lower trained-alone validation accuracy) at
  noise rates 0.05 to 0.5 (noise standard deviation = rate × the feature's training standard deviation), the
  collapse paper's denoising sweep read at test time.

Each curve is summarised by its normalised area (the mean accuracy over the sweep). Writes
``robustness_<dataset>.json`` (every value), a markdown table (mean ± std over seeds) and a PNG of the mean curves.

    python examples/robustness.py --seeds 0 1 2 3 4 --train-missing 0 0.3 --out docs/results
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DATASET_NAMES,
    AVDigitsNet,
    UnimodalNet,
    add_run_arguments,
    chosen_parameters,
    collapse_terms,
    fit,
    make_data,
    mean_std,
    modality_count,
    setup_for,
    training_runs,
)

from lightning_balance import MMPareto, ModalityDropout, UMTLoss  # noqa: E402
from lightning_balance.functional import curve_area, sweep_presence, uniform_noise  # noqa: E402

RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
NOISE = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
DROPOUT_P = 0.3  # not tuned (the seed's "careful scheduling" is the schedules below)
WARMUP = 300  # optimizer steps of the linear and cosine warm-ups (about 10 epochs of AV-Digits at batch 64)

# method -> (setup_for name, callbacks factory, model overrides)
METHODS: dict[str, tuple[str, Callable[[], list[pl.Callback]], dict]] = {
    "baseline": ("baseline", lambda: [], {}),
    "baseline_learned": ("baseline", lambda: [], {"missing": "learned"}),
    "dropout_constant": ("uni_losses_split", lambda: [ModalityDropout(p=DROPOUT_P, seed=0)], {}),
    "dropout_linear": ("uni_losses_split", lambda: [ModalityDropout(p=DROPOUT_P, schedule="linear",
                                                                    warmup_steps=WARMUP, seed=0)], {}),
    "dropout_cosine": ("uni_losses_split", lambda: [ModalityDropout(p=DROPOUT_P, schedule="cosine",
                                                                    warmup_steps=WARMUP, seed=0)], {}),
    "dropout_adaptive": ("uni_losses_split", lambda: [ModalityDropout(p=DROPOUT_P, schedule="adaptive", seed=0)], {}),
    "uni_losses_split": ("uni_losses_split", lambda: [], {}),
    "cml": ("cml", lambda: [], {}),
    "mmpareto": ("mmpareto", lambda: [MMPareto(gamma=2.0)], {}),
    "umt": ("umt", lambda: [], {}),
    # the collapse paper's EBR (lambda chosen on validation by examples/collapse_study.py), with the absent modalities
    # zero-filled, and with its test-time substitution h_j^-1(h_k(z_k)) from the best-ranked present modality k (the
    # order fitted on the validation split)
    "ebr": ("ebr", lambda: [], {}),
    "ebr_substitution": ("ebr", lambda: [], {}),
}
EBR_LAMBDA = 0.01  # the term's default; --selection reads the one examples/collapse_study.py --stage select chose
DEFAULT = ["baseline", "dropout_constant", "dropout_linear", "dropout_cosine", "dropout_adaptive", "cml", "mmpareto", "umt"]


@torch.no_grad()
def sweeps(model: AVDigitsNet, data, weakest: str, split: str = "test", substitute: bool = False) -> dict[str, float]:
    """Accuracy on ``split``, the missing-rate curves (model fill and mean fill) and the noise curve. On the
    (masked) validation split the sweep's masks come on top of the split's own (the selection of ``--dropout-p``)."""
    model.eval()
    test, train = data.splits[split], data.splits["train"]
    names = list(model.modalities)
    y = test["target"]
    encoded = model.features(test)
    feats, _ = model.fusion_inputs(encoded)  # what the fusion sees (EBR's decoded features)
    train_feats, _ = model.fusion_inputs(model.features(train))
    keep = train.get("present")
    means = {m: (train_feats[m][keep[:, i]] if keep is not None else train_feats[m]).mean(0) for i, m in enumerate(names)}
    positions = torch.arange(len(y))
    base = None if "present" not in test else {m: test["present"][:, i] for i, m in enumerate(names)}
    full = model.fuse_features(feats) if base is None else model.fuse_subset(feats, names, present=base)
    out: dict[str, float] = {"acc": float((full.argmax(-1) == y).float().mean())}
    for which in (*names, "all"):
        own, mean_fill = [], []
        for rate in RATES:
            mask = sweep_presence(positions, names, rate, which, present=base)
            if substitute:  # EBR substitutes the absent modalities in fusion_inputs and marks them present
                sub, sub_mask = model.fusion_inputs(encoded, present=mask)
                logits = model.fuse_subset(sub, names, present=sub_mask)
            else:
                logits = model.fuse_subset(feats, names, present=mask)
            own.append(float((logits.argmax(-1) == y).float().mean()))
            filled = {m: torch.where(mask[m][:, None], feats[m], means[m]) for m in names}
            mean_fill.append(float((model.fuse_features(filled).argmax(-1) == y).float().mean()))
        for rate, a, b in zip(RATES, own, mean_fill):
            out[f"missing/{which}/{rate:g}"] = a
            out[f"missing_mean_fill/{which}/{rate:g}"] = b
        out[f"auc_missing/{which}"] = curve_area(RATES, own)
        out[f"auc_missing_mean_fill/{which}"] = curve_area(RATES, mean_fill)
    w = names.index(weakest)
    std = (train[weakest][keep[:, w]] if keep is not None else train[weakest]).std(0)  # of the present inputs
    noisy_curve = []
    for rate in NOISE:
        noisy = dict(test)
        noisy[weakest] = uniform_noise(test[weakest], rate, std, torch.Generator().manual_seed(1))
        noisy_feats, _ = model.fusion_inputs(model.features(noisy))
        logits = model.fuse_subset(noisy_feats, names, present=base)  # the split's own mask, if any
        noisy_curve.append(float((logits.argmax(-1) == y).float().mean()))
    for rate, a in zip(NOISE, noisy_curve):
        out[f"noise/{weakest}/{rate:g}"] = a
    out[f"auc_noise/{weakest}"] = curve_area(NOISE, noisy_curve)
    return out


def run(dataset: str, seed: int, train_missing: float, methods: list[str], epochs: int, root: str,
        progress: bool, split: str = "test") -> dict[str, dict[str, float]]:
    kwargs = {"missing_rate": train_missing, "missing_splits": ("train", "val")} if train_missing > 0 else {}
    data = make_data(dataset, seed, **kwargs)
    dims, classes = dict(data.feature_dims), data.num_classes
    # the references: each modality alone (the weakest modality; UMT's teachers), on the same masked data
    alone, val = {}, {}
    for m, d in dims.items():
        pl.seed_everything(seed, verbose=False)
        alone[m], val[m] = fit(UnimodalNet(m, d, num_classes=classes), data, [], epochs, f"{root}/{m}", progress,
                               label=f"missing {train_missing:g} seed {seed} {m} alone")
    weakest = min(val, key=val.get)
    results: dict[str, dict[str, float]] = {}
    trained: dict[str, tuple] = {}  # ebr and ebr_substitution score one EBR model (in either list order)
    for method in methods:
        setup, callbacks, overrides = METHODS[method]
        shared = setup == "ebr" and "ebr" in trained
        if shared:
            model, best, seconds = trained["ebr"]
            model = copy.deepcopy(model)  # the stored one stays without substitution
        else:
            pl.seed_everything(seed, verbose=False)
            model_kwargs, _ = setup_for(setup, dims)
            model_kwargs.update(overrides)
            if setup == "umt":  # the modalities alone are the frozen teachers (BalanceBenchmark's lambda 10, not tuned)
                model_kwargs["loss_terms"] = [UMTLoss({m: copy.deepcopy(alone[m].encoder) for m in dims}, weight=10.0)]
            if setup == "ebr":
                model_kwargs["loss_terms"] = collapse_terms("ebr", data, sorted(val, key=val.get),
                                                            adversarial_weight=EBR_LAMBDA)
            start = time.perf_counter()
            model, best = fit(AVDigitsNet(input_dims=dims, num_classes=classes, **model_kwargs), data, callbacks(),
                              epochs, f"{root}/{method}", progress, label=f"missing {train_missing:g} seed {seed} {method}")
            seconds = time.perf_counter() - start
            if setup == "ebr" and {"ebr", "ebr_substitution"} <= set(methods):  # the other EBR row comes later
                trained["ebr"] = (copy.deepcopy(model), best, seconds)
        substitute = method == "ebr_substitution"
        if substitute:  # the ranking of the modalities by their bases' similarity, fitted on validation
            term = model.balance_losses["ebr"]
            term.fit_substitution(model, data.val_dataloader())
            term.substitute = True
        # fit_s: the training time; a row that shares the EBR fit says so (do not add its fit_s twice)
        results[method] = {**sweeps(model, data, weakest, split, substitute), "val_acc": best, "fit_s": seconds,
                           **({"fit_shared": True} if shared else {})}
    return results


def joint_fits(methods: list[str]) -> int:
    """The joint models :func:`run` trains for ``methods``: one each, except that ``ebr`` and ``ebr_substitution``
    share one EBR fit when both are asked for."""
    shared, count = {"ebr", "ebr_substitution"} <= set(methods), 0
    trained_ebr = False
    for method in methods:
        if METHODS[method][0] == "ebr" and trained_ebr:
            continue
        count += 1
        trained_ebr = trained_ebr or (METHODS[method][0] == "ebr" and shared)
    return count


def table(saved: dict, methods: list[str]) -> str:
    names = saved["modalities"]
    weakest = saved["weakest"]
    where = "validation (masked as in training)" if saved.get("split") == "val" else "complete test"
    head = (f"| train missing | method | {where} | " + " | ".join(f"area, {m} missing" for m in names)
            + " | area, all missing | area, all missing (mean fill) | area, noise on " + weakest + " |")
    lines = [head, "|" + "---|" * (5 + len(names) + 1)]
    for rate, by_seed in saved["runs"].items():
        for method in methods:
            rows = [seed_rows[method] for seed_rows in by_seed.values() if method in seed_rows]
            if not rows:
                continue

            def col(key: str) -> str:
                return mean_std([r[key] for r in rows])
            cells = [col("acc"), *[col(f"auc_missing/{m}") for m in names], col("auc_missing/all"),
                     col("auc_missing_mean_fill/all"), col(f"auc_noise/{weakest}")]
            lines.append(f"| {rate} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(saved: dict, methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = saved["modalities"]
    panels = [(f"missing/{w}", RATES, f"{w} missing" if w != "all" else "all missing, independently") for w in
              (*names, "all")] + [(f"noise/{saved['weakest']}", NOISE, f"noise on {saved['weakest']}")]
    rates = list(saved["runs"])
    fig, axes = plt.subplots(len(rates), len(panels), figsize=(4 * len(panels), 3.2 * len(rates)), squeeze=False)
    for r, rate in enumerate(rates):
        for c, (key, xs, title) in enumerate(panels):
            ax = axes[r][c]
            for i, method in enumerate(methods):
                rows = [s[method] for s in saved["runs"][rate].values() if method in s]
                if rows:
                    ax.plot(xs, [statistics.mean(row[f"{key}/{x:g}"] for row in rows) for x in xs], "o-", ms=3,
                            color=f"C{i}", label=method)
            ax.set(title=f"{title} (trained with {rate} missing)", xlabel="rate", ylabel="test accuracy")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(paths: list[str], methods: list[str], stem: str, command: str) -> dict:
    """One table and plot from several saved runs of one dataset and split: their runs merged per training missing
    rate, seed and method (a method saved twice must have the same values: the runs are deterministic)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            one = json.load(f)
        one.setdefault("split", "test")  # files written before the split was saved scored on test
        for key in ("modalities", "weakest", "split", "rates", "noise"):
            if merged.setdefault(key, one.get(key)) != one.get(key):
                raise SystemExit(f"{path}: its {key} {one.get(key)!r} differs from the first file's {merged[key]!r}; "
                                 f"only runs of one dataset and split merge.")
        merged.setdefault("sources", []).append({"path": path, "command": one["command"]})
        for rate, by_seed in one["runs"].items():
            for seed, rows in by_seed.items():
                target = merged.setdefault("runs", {}).setdefault(rate, {}).setdefault(seed, {})
                for method, row in rows.items():
                    if method in target and target[method]["acc"] != row["acc"]:
                        raise SystemExit(f"{path}: {method} (train missing {rate}, seed {seed}) differs from an "
                                         f"earlier file's; merge runs of one protocol only.")
                    target[method] = row
    lacking = sorted({m for m in methods if not any(m in rows for by_seed in merged["runs"].values()
                                                    for rows in by_seed.values())})
    if lacking:
        raise SystemExit(f"--methods {lacking} are in none of the files {paths}.")
    text = table(merged, methods)
    sources = "; ".join(f"`{s['command']}`" for s in merged["sources"])
    with open(stem + ".md", "w") as f:
        f.write(f"`{command}`, from {sources}\n\n{text}\n")
    print(text)
    try:
        plot(merged, methods, stem + ".png")
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
    return merged


def main(argv: list[str] | None = None) -> dict:
    global DROPOUT_P, EBR_LAMBDA
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT, choices=sorted(METHODS))
    parser.add_argument("--dataset", default="av_digits", choices=DATASET_NAMES)
    parser.add_argument("--train-missing", nargs="+", type=float, default=[0.0, 0.3])
    add_run_arguments(parser, selection_default=f"EBR's lambda {EBR_LAMBDA}")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="score on test (the reported numbers) or on validation (choosing --dropout-p)")
    parser.add_argument("--dropout-p", type=float, default=None, help=f"p of the dropout methods (default {DROPOUT_P})")
    parser.add_argument("--tag", default="", help="added to the output file names (e.g. _ebr)")
    parser.add_argument("--ebr-lambda", type=float, default=None,
                        help=f"EBR's adversarial weight (default: the one chosen in --selection, else {EBR_LAMBDA})")
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="train nothing: merge saved runs (e.g. the baselines' and EBR's) into one table and plot "
                             "of --methods, written as robustness_<dataset><tag>.{md,png} in --out")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, args.methods, os.path.join(args.out, f"robustness_{args.dataset}{args.tag}"),
                      "python examples/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.ebr_lambda is not None and args.selection:
        parser.error("--ebr-lambda and --selection both set EBR's lambda: pass one.")
    if args.ebr_lambda is not None:
        EBR_LAMBDA = args.ebr_lambda
    elif args.selection:
        EBR_LAMBDA = chosen_parameters(args.selection, args.dataset)["ebr"]
    if args.dropout_p is not None:
        DROPOUT_P = args.dropout_p
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    saved: dict = {"command": "python examples/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "rates": RATES, "noise": NOISE, "runs": {}}
    root = tempfile.mkdtemp(prefix="robustness_")  # the checkpoints of model selection stay out of --out
    # quiet fits, one progress line per finished fit: per rate and seed, each modality alone and the joint models
    total = len(args.train_missing) * len(args.seeds) * (modality_count(args.dataset) + joint_fits(args.methods))
    with training_runs(total, enabled=not args.no_progress):
        for rate in args.train_missing:
            saved["runs"][f"{rate:g}"] = {}
            for seed in args.seeds:
                results = run(args.dataset, seed, rate, args.methods, args.epochs, root, args.progress, args.split)
                saved["runs"][f"{rate:g}"][str(seed)] = results
                print(f"train missing {rate:g}, seed {seed}: " + ", ".join(
                    f"{m} {r['acc']:.3f}/{r['auc_missing/all']:.3f}" for m, r in results.items()), flush=True)
    data = make_data(args.dataset, 0)
    saved["modalities"] = list(data.modalities)
    first = next(iter(next(iter(saved["runs"].values())).values()))
    saved["weakest"] = next(k.split("/")[1] for k in next(iter(first.values())) if k.startswith("auc_noise/"))
    saved["seconds"] = time.perf_counter() - start
    saved["split"], saved["dropout_p"], saved["ebr_lambda"] = args.split, DROPOUT_P, EBR_LAMBDA
    suffix = "" if args.split == "test" and args.dropout_p is None else f"_{args.split}_p{DROPOUT_P:g}"
    stem = os.path.join(args.out, f"robustness_{args.dataset}{suffix}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(saved, f, indent=1)
    text = table(saved, args.methods)
    with open(stem + ".md", "w") as f:
        f.write(f"`{saved['command']}` ({saved['seconds']:.0f} s)\n\n{text}\n")
    print(text)
    try:
        plot(saved, args.methods, stem + ".png")
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
    return saved


if __name__ == "__main__":
    main()
