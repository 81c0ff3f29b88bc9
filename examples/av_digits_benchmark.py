"""AV-Digits benchmark: joint training with and without balancing methods, and the references.

Trains, per seed: each modality alone, the joint baseline, and the joint model with each requested
method; every model is restored to its epoch of best **validation** accuracy before it is scored on
test. Prints a table (mean ± std over seeds), writes per-seed values to JSON and a PNG of per-modality
validation accuracy over epochs.

    python examples/av_digits_benchmark.py                    # the demo: baseline vs OGM-GE, 1 seed
    python examples/av_digits_benchmark.py --seeds 0 1 2      # what the README reports
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    AVDigitsNet,
    UnimodalNet,
    evaluate_ensemble,
    evaluate_joint,
    evaluate_ume,
    evaluate_unimodal,
    fit,
    format_table,
    setup_for,
)

from lightning_balance import (  # noqa: E402
    AGM,
    OGMGE,
    PMR,
    GradientBlending,
    InfoReg,
    MMPareto,
    ModalityMonitor,
    UMTLoss,
    UnimodalEnsemble,
)
from lightning_balance.data import AVDigitsDataModule  # noqa: E402

# Balancing methods: name -> factory of the callbacks added to the joint model's Trainer.
# Each method's main parameter was chosen on validation accuracy (seeds 0-2) with
# examples/select_on_validation.py --method <name>; the grids and results are in docs/results.md.
METHODS: dict[str, Callable[[], list[pl.Callback]]] = {
    "baseline": lambda: [],
    "ogm_ge": lambda: [OGMGE(alpha=0.1, params="weights")],
    "ogm": lambda: [OGMGE(alpha=0.1, params="weights", noise=False)],
    "inforeg": lambda: [InfoReg(strength=0.3)],
    "inforeg_official": lambda: [InfoReg.official()],  # the paper's constants (0.95 audio, 0.10 visual), not tuned
    "agm": lambda: [AGM(alpha=0.5)],
    "pmr": lambda: [PMR(alpha=4.0)],
    # multimodal + unimodal losses (auxiliary linear heads), alone and combined by MMPareto / G-Blending
    "uni_losses": lambda: [],
    "mmpareto": lambda: [MMPareto(gamma=2.0)],
    "gblend": lambda: [GradientBlending(every_n_epochs=20)],
    # loss terms and heads (their parameters are in _common.SETUPS: they change the model, not the Trainer)
    "cml": lambda: [],
    "mmcosine": lambda: [],
    "contrastive": lambda: [],
    "reconstruction": lambda: [],
    "ogm_ge+cml": lambda: [OGMGE(alpha=0.1, params="weights")],
    # UMT: the unimodal references' encoders are the frozen teachers (needs the references)
    "umt": lambda: [],
    "ogm_ge+umt": lambda: [OGMGE(alpha=0.1, params="weights")],
}
UMT_WEIGHT = 10.0  # BalanceBenchmark's lambda; not tuned

COLUMNS = [
    ("acc", "fused acc"), ("f1", "macro-F1"),
    ("acc_audio", "audio (unimodal logits)"), ("acc_visual", "visual (unimodal logits)"),
    ("probe_audio", "audio probe"), ("probe_visual", "visual probe"),
    ("acc_without_audio", "acc, audio missing"), ("acc_without_visual", "acc, visual missing"),
    ("val_acc", "best val acc"),
]


def run_seed(seed: int, methods: list[str], epochs: int, root: str, progress: bool,
             references: bool) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, float]]]]:
    data = AVDigitsDataModule(seed=seed)
    data.setup()
    results: dict[str, dict[str, float]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    alone_by_modality: dict = {}
    if references:
        alone = []
        for modality, dim in data.feature_dims.items():
            pl.seed_everything(seed, verbose=False)
            model, val = fit(UnimodalNet(modality, dim), data, [], epochs, f"{root}/{modality}", progress)
            results[f"{modality} alone"] = {**evaluate_unimodal(model, data), "val_acc": val}
            alone.append(model)
            alone_by_modality[modality] = model
        results["unimodal ensemble"] = evaluate_ensemble(alone, data)
        ume = UnimodalEnsemble({m: torch.nn.Sequential(model.encoder, model.head) for m, model in alone_by_modality.items()},
                               combine="mean")
        results["UME (mean of probabilities)"] = evaluate_ume(ume, data)
    for method in methods:
        pl.seed_everything(seed, verbose=False)
        model_kwargs, data_kwargs = setup_for(method)
        if method in ("umt", "ogm_ge+umt"):
            if not alone_by_modality:
                raise SystemExit("umt needs the unimodal references (drop --no-references): they are its teachers.")
            teachers = {m: copy.deepcopy(model.encoder) for m, model in alone_by_modality.items()}
            model_kwargs["loss_terms"] = [UMTLoss(teachers, weight=UMT_WEIGHT)]
        method_data = data
        if data_kwargs:
            method_data = AVDigitsDataModule(seed=seed, **data_kwargs)
            method_data.setup()
        watch = ModalityMonitor()
        callbacks = METHODS[method]()
        model, val = fit(AVDigitsNet(**model_kwargs), method_data, [*callbacks, watch], epochs,
                         f"{root}/{method}", progress)
        results[method] = {**evaluate_joint(model, data), "val_acc": val}
        for cb in callbacks:
            if isinstance(cb, MMPareto):
                results[method].update({f"conflict_rate_{m}": r for m, r in cb.conflict_rate.items()})
        curves[method] = watch.history
    return results, curves


def plot(curves_by_seed: list[dict[str, list[dict[str, float]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    keys = [("val_acc/audio", "audio (unimodal logits)"), ("val_acc/visual", "visual (unimodal logits)"),
            ("val_acc_fused", "fused")]
    methods = list(curves_by_seed[0])
    for ax, (key, title) in zip(axes, keys):
        for i, method in enumerate(methods):
            runs = [c[method] for c in curves_by_seed]
            epochs = [row["epoch"] for row in runs[0]]
            values = torch.tensor([[row[key] for row in run] for run in runs])
            mean = values.mean(0)
            ax.plot(epochs, mean, color=f"C{i}", label=method)
            if len(runs) > 1:
                std = values.std(0)
                ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[-1].legend(loc="lower right")
    fig.suptitle(f"AV-Digits: validation accuracy per modality ({len(curves_by_seed)} seed(s), mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["baseline", "ogm_ge"], choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="results", help="folder for the JSON and the PNG")
    parser.add_argument("--no-references", action="store_true", help="skip the unimodal references")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    per_seed: dict[str, list[dict[str, float]]] = {}
    curves = []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            results, seed_curves = run_seed(seed, args.methods, args.epochs, f"{root}/{seed}",
                                            not args.no_progress, not args.no_references)
            for name, values in results.items():
                per_seed.setdefault(name, []).append({"seed": seed, **values})
            curves.append(seed_curves)
    tag = f"av_digits_{'_'.join(args.methods)}_{len(args.seeds)}seeds"
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump({"command": "python examples/av_digits_benchmark.py " + " ".join(argv or sys.argv[1:]),
                   "epochs": args.epochs, "seeds": args.seeds, "results": per_seed}, f, indent=1)
    plot(curves, os.path.join(args.out, f"{tag}.png"))
    print(f"\nAV-Digits test metrics, checkpoint chosen on validation accuracy; "
          f"{len(args.seeds)} seed(s) {args.seeds}, mean ± std; {time.time() - start:.0f} s\n")
    print(format_table(per_seed, COLUMNS))
    print(f"\nper-seed values: {args.out}/{tag}.json   curves: {args.out}/{tag}.png")
    return per_seed


if __name__ == "__main__":
    main()
