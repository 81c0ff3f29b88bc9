"""Choose OGM-GE's alpha on AV-Digits **validation** accuracy (test data is never read).

    python examples/select_ogm_alpha.py --alphas 0.1 0.3 0.8 1.5 3.0 --seeds 0 1 2

Prints, per alpha, the best validation accuracy of the joint model (mean ± std over seeds), with the
baseline (no OGM-GE) for comparison, and writes the per-seed values to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AVDigitsNet, fit, mean_std  # noqa: E402

from lightning_balance import OGMGE  # noqa: E402
from lightning_balance.data import AVDigitsDataModule  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.3, 0.8, 1.5, 3.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--noise", choices=["on", "off"], default="on", help="OGM-GE (on) or OGM (off)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    grid: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            data = AVDigitsDataModule(seed=seed)
            data.setup()
            for alpha in [None, *args.alphas]:
                pl.seed_everything(seed, verbose=False)
                callbacks = [] if alpha is None else [OGMGE(alpha=alpha, params="weights", noise=args.noise == "on")]
                _, val = fit(AVDigitsNet(), data, callbacks, args.epochs, f"{root}/{seed}-{alpha}", progress=False)
                grid.setdefault("baseline" if alpha is None else f"alpha={alpha}", []).append(val)
                print(f"seed {seed} alpha {alpha}: best val acc {val:.4f}", flush=True)
    print("\n| setting | best val acc (mean ± std) |\n|---|---|")
    for name, values in grid.items():
        print(f"| {name} | {mean_std(values)} |")
    best = max((k for k in grid if k != "baseline"), key=lambda k: sum(grid[k]) / len(grid[k]))
    print(f"\nselected on validation: {best}")
    with open(os.path.join(args.out, f"select_ogm_alpha_noise-{args.noise}.json"), "w") as f:
        json.dump({"command": "python examples/select_ogm_alpha.py " + " ".join(argv or sys.argv[1:]),
                   "seeds": args.seeds, "val_acc": grid, "selected": best}, f, indent=1)


if __name__ == "__main__":
    main()
