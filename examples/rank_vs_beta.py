"""Rank of the fused representation against the up-weighting beta of the weak modality (the collapse paper's
Fig. 5 experiment: Chaudhuri et al., ICML 2025, §4.1), for the baseline and the basis-reallocation methods.

The paper forces the multimodal model to use the modality it would otherwise ignore by up-weighting it by beta and
reports the rank of the multimodal representation: it falls fast around a critical beta by default, and less with
KD or EBR. Our reading of "up-weighting" (the paper gives no formula): the weak modality's own cross-entropy
(its split-head unimodal logits, :meth:`add_unimodal_losses`) is added with weight beta, the others' with 0; beta = 0
is plain training. The representation is the fusion's input, the concatenation of the (EBR-decoded) features on
the test split; its effective rank (Roy & Vetterli) and numerical rank are reported, with the rank of the weak
modality's encoder trained alone as the "unimodal baseline". The weak modality is the one weaker alone on
validation.

    python examples/rank_vs_beta.py --methods baseline kd_infonce ebr --betas 0 0.5 1 2 4 --seeds 0 1 2 \
        --selection docs/results/select_collapse_av_digits.json --out docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    COLLAPSE_METHODS,
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
    training_runs,
)

from lightning_balance.functional import effective_rank, numerical_rank  # noqa: E402

METHODS = ("baseline", *COLLAPSE_METHODS)


@torch.no_grad()
def fused_ranks(model: AVDigitsNet, data) -> dict[str, float]:
    model.eval()
    test = data.splits["test"]
    feats, _ = model.fusion_inputs(model.features(test))
    z = torch.cat([feats[m] for m in model.modalities], 1)
    acc = float((model.fuse_features(feats).argmax(-1) == test["target"]).float().mean())
    return {"erank": effective_rank(z), "nrank": float(numerical_rank(z)), "acc": acc}


def _chosen(method: str, chosen: dict[str, float] | None) -> dict:
    """The term's selected parameter (``examples/collapse_study.py --stage select``), if any."""
    if not chosen or method not in chosen:
        return {}
    return {"adversarial_weight" if method == "ebr" else "weight": chosen[method]}


def run(dataset: str, seed: int, methods: list[str], betas: list[float], epochs: int, root: str,
        progress: bool, chosen: dict[str, float] | None = None) -> dict:
    data = make_data(dataset, seed)
    dims = dict(data.feature_dims)
    alone, val = {}, {}
    for m, d in dims.items():
        pl.seed_everything(seed, verbose=False)
        alone[m], val[m] = fit(UnimodalNet(m, d, num_classes=data.num_classes), data, [], epochs, f"{root}/{m}", progress,
                               label=f"seed {seed} {m} alone")
    weakest_first = sorted(dims, key=lambda m: val[m])
    weak = weakest_first[0]
    with torch.no_grad():
        z_alone = alone[weak].encoder(data.splits["test"][weak])
    out = {"weak": weak, "alone_erank": effective_rank(z_alone), "alone_nrank": float(numerical_rank(z_alone)),
           "runs": {}}
    for method in methods:
        for beta in betas:
            pl.seed_everything(seed, verbose=False)
            model = AVDigitsNet(input_dims=dims, num_classes=data.num_classes, unimodal_losses=True,
                                loss_terms=collapse_terms(method, data, weakest_first, **_chosen(method, chosen))
                                or None)
            model.loss_weights = {"fused": 1.0, **{m: (float(beta) if m == weak else 0.0) for m in dims}}
            model, _ = fit(model, data, [], epochs, f"{root}/{method}_{beta:g}", progress,
                           label=f"seed {seed} {method} beta {beta:g}")
            out["runs"][f"{method}/{beta:g}"] = fused_ranks(model, data)
    return out


def plot(saved: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas, methods = saved["betas"], saved["methods"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(methods):
        values = [[r["runs"][f"{method}/{b:g}"]["erank"] for r in saved["seeds"].values()] for b in betas]
        means = [statistics.mean(v) for v in values]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.plot(betas, means, "o-", color=f"C{i}", label=method)
        ax.fill_between(betas, [m - d for m, d in zip(means, spread)], [m + d for m, d in zip(means, spread)],
                        color=f"C{i}", alpha=0.15)
    alone = statistics.mean(r["alone_erank"] for r in saved["seeds"].values())
    ax.axhline(alone, color="grey", ls="--", label=f"{saved['weak']} encoder alone")
    ax.set(xlabel=f"beta (weight of {saved['weak']}'s own loss)", ylabel="effective rank of the fused representation",
           title=f"{saved['dataset']}: rank against the up-weighting of the weak modality\n"
                 f"(mean ± std over {len(saved['seeds'])} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(saved: dict) -> str:
    rows = ["| method | beta | effective rank | numerical rank | fused acc |", "|---|---|---|---|---|"]
    for method in saved["methods"]:
        for b in saved["betas"]:
            runs = [r["runs"][f"{method}/{b:g}"] for r in saved["seeds"].values()]
            rows.append(f"| {method} | {b:g} | {mean_std([r['erank'] for r in runs])} | "
                        f"{mean_std([r['nrank'] for r in runs])} | {mean_std([r['acc'] for r in runs])} |")
    alone = [r["alone_erank"] for r in saved["seeds"].values()]
    rows.append(f"| {saved['weak']} alone | – | {mean_std(alone)} | "
                f"{mean_std([r['alone_nrank'] for r in saved['seeds'].values()])} | – |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["baseline", "kd_infonce", "ebr"], choices=METHODS)
    parser.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--dataset", default="av_digits", choices=DATASET_NAMES)
    add_run_arguments(parser, selection_default="the terms' defaults")  # --selection: KD weights, EBR's lambda
    args = parser.parse_args(argv)
    if any(b < 0 for b in args.betas):
        parser.error("--betas must be >= 0 (0: plain training)")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    seeds = {}
    chosen = chosen_parameters(args.selection, args.dataset) if args.selection else None
    root = tempfile.mkdtemp(prefix="rank_vs_beta_")  # the checkpoints of model selection stay out of --out
    # quiet fits, one progress line per finished fit: per seed, each modality alone and each method at each beta
    total = len(args.seeds) * (modality_count(args.dataset) + len(args.methods) * len(args.betas))
    with training_runs(total, enabled=not args.no_progress):
        for seed in args.seeds:
            seeds[str(seed)] = run(args.dataset, seed, args.methods, args.betas, args.epochs,
                                   os.path.join(root, str(seed)), args.progress, chosen)
            print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    weak = {r["weak"] for r in seeds.values()}
    saved = {"command": "python examples/rank_vs_beta.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "dataset": args.dataset, "methods": args.methods, "betas": args.betas, "epochs": args.epochs,
             "weak": "/".join(sorted(weak)), "seeds": seeds, "seconds": time.perf_counter() - start, "chosen": chosen}
    base = os.path.join(args.out, f"rank_vs_beta_{args.dataset}")
    with open(base + ".json", "w") as f:
        json.dump(saved, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"`{saved['command']}` ({saved['seconds']:.0f} s)\n\n{table(saved)}\n")
    plot(saved, base + ".png")
    print(table(saved))
    return saved


if __name__ == "__main__":
    main()
