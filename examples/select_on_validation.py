"""Choose a method's main hyper-parameter on AV-Digits **validation** accuracy (test data is never read).

    python examples/select_on_validation.py --method ogm_ge --values 0.1 0.3 0.8 1.5 3.0 --seeds 0 1 2
    python examples/select_on_validation.py --method agm                      # its default grid

Prints, per value, the best validation accuracy of the joint model (mean ± std over seeds), with the
baseline (no method) for comparison, and writes the per-seed values to JSON. The selected value is
the one with the highest mean; it is what ``benchmark.py`` then uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AV_DIMS, AVDigitsNet, fit, mean_std, setup_for, training_runs  # noqa: E402

from lightning_balance import (  # noqa: E402
    AGM,
    AMCo,
    OGMGE,
    PMR,
    Relearning,
    SampleValuation,
    CMLLoss,
    ContrastiveLoss,
    GradientBlending,
    Greedy,
    InfoReg,
    LFMLoss,
    MBSDLoss,
    MMPareto,
    OPM,
    ReconstructionLoss,
)
from lightning_balance.data import AVDigitsDataModule  # noqa: E402

# method -> (parameter name, default grid, factory of the callbacks for one value)
SEARCH: dict[str, tuple[str, list[float], Callable[[float], list[pl.Callback]]]] = {
    "ogm_ge": ("alpha", [0.1, 0.3, 0.8, 1.5, 3.0], lambda v: [OGMGE(alpha=v, params="weights")]),
    "ogm": ("alpha", [0.1, 0.3, 0.8, 1.5, 3.0], lambda v: [OGMGE(alpha=v, params="weights", noise=False)]),
    # the variant's strength (the published InfoReg uses the paper's constants, not tuned)
    "inforeg_variant": ("strength", [0.1, 0.3, 0.95, 2.0],
                        lambda v: [InfoReg(strength=v, window_from="own", unimodal_losses=False)]),
    "agm": ("alpha", [0.1, 0.5, 1.0, 2.5], lambda v: [AGM(alpha=v)]),
    "pmr": ("alpha", [0.2, 0.6, 1.0, 2.0], lambda v: [PMR(alpha=v)]),
    "mmpareto": ("gamma", [1.0, 1.5, 2.0], lambda v: [MMPareto(gamma=v)]),
    "gblend": ("every_n_epochs", [5, 10, 20], lambda v: [GradientBlending(every_n_epochs=int(v))]),
    # OPM: the base drop probability of the leading modality (official script 0.5, config 0.4); lam, p_exe and the
    # 6-epoch warm-up as published
    # AMCo: the curriculum length (the benchmark's 0.3 masks a flagged modality fully after 3 batches of epoch 1)
    "amco": ("eps", [0.3, 1.0, 3.0, 10.0], lambda v: [AMCo(eps=v)]),
    "opm": ("q_base", [0.2, 0.4, 0.5, 0.7, 0.85, 1.0], lambda v: [OPM(q_base=v)]),
    # Re-learning: lambda in alpha = tanh(lambda * |purity gap|) (official 3), on the benchmark's schedule (10, 20, 30)
    # modality valuation: the first epoch trained on re-sampled data (official warm-up 5 of 60 epochs); the
    # modality-level rule's alpha (official 1, BalanceBenchmark 0.5)
    "valuation": ("start_epoch", [1, 3, 5, 10], lambda v: [SampleValuation(start_epoch=int(v))]),
    "valuation_modality": ("alpha", [0.5, 1.0, 2.0],
                           lambda v: [SampleValuation(level="modality", start_epoch=3, alpha=v)]),
    "relearning": ("strength", [1.0, 3.0, 10.0],
                   lambda v: [Relearning(strength=v, every_n_epochs=10, max_reinits=3)]),
    # loss terms and heads: the value goes into the model (see MODEL_PARAMETER)
    # CML's rank_weight is the official beta/100 with the official batch-summed ranking term (beta 10: 0.1;
    # the official batch script tries beta 10, 20, 50, 75)
    "cml": ("rank_weight", [0.01, 0.03, 0.1, 0.2, 0.5, 0.75], lambda v: []),
    "mmcosine": ("scale", [5.0, 10.0, 15.0], lambda v: []),
    "contrastive": ("weight", [0.03, 0.1, 0.3], lambda v: []),
    "reconstruction": ("weight", [0.03, 0.1, 0.3], lambda v: []),
    # LFM: the epochs over which the official fitted schedule's 200 epochs are stretched (200: the official epoch
    # index, alpha_cls 0.20 -> 0.40 over a 40-epoch run; 40: the whole fitted trajectory, 0.20 -> 1.0 -> 0.92)
    "lfm": ("horizon", [40, 80, 200], lambda v: []),
    # MBSD: the term's weight (it has no parameter of its own; BalanceBenchmark adds it with weight 1)
    "mbsd": ("weight", [0.3, 1.0, 3.0], lambda v: []),
    # MLA: the paper's head-gradient projection on (1) or off (0, the released code, whose projection never runs)
    "mla": ("projection", [0.0, 1.0], lambda v: []),
    # ReconBoost: the epochs of each phase of a stage (official 4 + 4 of up to 1000 stages; 40 epochs here)
    "reconboost": ("epochs_per_stage", [1, 2, 4], lambda v: []),
    # Greedy: the BDR gap that starts a re-balancing window (official 0.01, BalanceBenchmark 0.001), on its MMTM model
    "greedy": ("epsilon", [0.001, 0.01, 0.1], lambda v: [Greedy(epsilon=v, branch_heads="unimodal_heads")]),
}
# methods whose searched value is a model argument: method -> function(value) -> model kwargs overrides
MODEL_PARAMETER: dict[str, Callable[[float], dict]] = {
    "cml": lambda v: {"loss_terms": lambda: [CMLLoss(rank_weight=v)]},
    "mmcosine": lambda v: {"cosine_scale": v},
    "contrastive": lambda v: {"loss_terms": lambda: [ContrastiveLoss(feature_dims={"audio": 128, "visual": 128}, weight=v)]},
    "reconstruction": lambda v: {"loss_terms": lambda: [ReconstructionLoss({"audio": 128, "visual": 128}, AV_DIMS, weight=v)]},
    "lfm": lambda v: {"loss_terms": lambda: [LFMLoss(horizon=int(v))]},
    "mbsd": lambda v: {"loss_terms": lambda: [MBSDLoss(weight=v)]},
    "mla": lambda v: {"mla": True, "mla_projection": bool(v)},
    "reconboost": lambda v: {"reconboost_stage": int(v)},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(SEARCH))
    parser.add_argument("--values", nargs="+", type=float, help="grid of the method's parameter")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    name, grid_values, factory = SEARCH[args.method]
    values = args.values or grid_values
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    grid: dict[str, list[float]] = {}
    total = len(args.seeds) * ((0 if args.no_baseline else 1) + len(values))
    with tempfile.TemporaryDirectory() as root, training_runs(total):  # quiet fits, one line per finished fit
        _, data_kwargs = setup_for(args.method)
        for seed in args.seeds:
            plain_data = AVDigitsDataModule(seed=seed)
            method_data = AVDigitsDataModule(seed=seed, **data_kwargs) if data_kwargs else plain_data
            for value in ([] if args.no_baseline else [None]) + values:
                pl.seed_everything(seed, verbose=False)
                callbacks = [] if value is None else factory(value)
                overrides = MODEL_PARAMETER[args.method](value) if args.method in MODEL_PARAMETER and value is not None else {}
                model = AVDigitsNet() if value is None else AVDigitsNet(**setup_for(args.method, **overrides)[0])
                data = plain_data if value is None else method_data
                setting = "baseline" if value is None else f"{name}={value:g}"
                _, val = fit(model, data, callbacks, args.epochs, f"{root}/{seed}-{value}", progress=False,
                             label=f"seed {seed} {setting}")
                grid.setdefault("baseline" if value is None else f"{name}={value:g}", []).append(val)
                print(f"seed {seed} {name} {value}: best val acc {val:.4f}", flush=True)
    print(f"\n{args.method}\n\n| setting | best val acc (mean ± std) |\n|---|---|")
    for key, vals in grid.items():
        print(f"| {key} | {mean_std(vals)} |")
    best = max((k for k in grid if k != "baseline"), key=lambda k: sum(grid[k]) / len(grid[k]))
    print(f"\nselected on validation: {best}")
    with open(os.path.join(args.out, f"select_{args.method}.json"), "w") as f:
        json.dump({"command": "python examples/select_on_validation.py " + " ".join(argv or sys.argv[1:]),
                   "method": args.method, "parameter": name, "seeds": args.seeds, "val_acc": grid,
                   "selected": best}, f, indent=1)


if __name__ == "__main__":
    main()
