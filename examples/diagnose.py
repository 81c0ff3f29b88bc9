"""Diagnose modality imbalance of a trained AV-Digits joint model, from measurements.

    python examples/diagnose.py --seeds 0 1 2

Per seed: trains the joint baseline and each modality alone (checkpoints chosen on validation), then
measures on test data: each modality's Shapley contribution to accuracy (modalities removed at the
feature level through the fusion), accuracy with each modality missing, linear-probe accuracy of each
encoder after joint training vs trained alone, effective rank of each modality's features and of the
fused input, linear CKA between the fused input and each modality's features, and the mean/max VIF.
Prints the table and a verdict, and writes the per-seed values to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AVDigitsNet, UnimodalNet, fit, mean_std  # noqa: E402

from lightning_balance.data import AVDigitsDataModule  # noqa: E402
from lightning_balance.functional import (  # noqa: E402
    effective_rank,
    linear_cka,
    linear_probe_accuracy,
    masked_accuracy_value,
    shapley_contributions,
    variance_inflation,
)


@torch.no_grad()
def diagnose(joint: AVDigitsNet, alone: dict[str, UnimodalNet], data: AVDigitsDataModule) -> dict[str, float]:
    test, train = data.splits["test"], data.splits["train"]
    feats, train_feats = joint.features(test), joint.features(train)
    y = test["target"]
    value = masked_accuracy_value(joint.fuse_features, feats, y)
    out: dict[str, float] = {"acc": value(frozenset(joint.modalities))}
    phi = shapley_contributions(value, joint.modalities)
    fused_input = torch.cat([feats[m] for m in joint.modalities], dim=1)
    out["erank_fused"] = effective_rank(fused_input)
    for m in joint.modalities:
        out[f"shapley_{m}"] = phi[m]
        out[f"acc_without_{m}"] = value(frozenset(joint.modalities) - {m})
        out[f"probe_joint_{m}"] = linear_probe_accuracy(train_feats[m], train["target"], feats[m], y, 10)
        enc = alone[m].encoder
        out[f"probe_alone_{m}"] = linear_probe_accuracy(enc(train[m]), train["target"], enc(test[m]), y, 10)
        out[f"erank_{m}"] = effective_rank(feats[m])
        out[f"cka_fused_{m}"] = linear_cka(fused_input, feats[m])
        vif = variance_inflation(feats[m])
        out[f"vif_mean_{m}"], out[f"vif_max_{m}"] = float(vif.mean()), float(vif.max())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            data = AVDigitsDataModule(seed=seed)
            data.setup()
            alone = {}
            for m, dim in data.feature_dims.items():
                pl.seed_everything(seed, verbose=False)
                alone[m], _ = fit(UnimodalNet(m, dim), data, [], args.epochs, f"{root}/{seed}-{m}", progress=False)
            pl.seed_everything(seed, verbose=False)
            joint, _ = fit(AVDigitsNet(), data, [], args.epochs, f"{root}/{seed}-joint", progress=False)
            rows.append({"seed": seed, **diagnose(joint, alone, data)})
            print(f"seed {seed} done", flush=True)
    keys = [k for k in rows[0] if k != "seed"]
    print("\n| measurement | mean ± std over seeds |\n|---|---|")
    for k in keys:
        print(f"| {k} | {mean_std([r[k] for r in rows])} |")
    mods = ["audio", "visual"]
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys}
    dominant = max(mods, key=lambda m: mean[f"shapley_{m}"])
    weak = min(mods, key=lambda m: mean[f"shapley_{m}"])
    print(f"\nVerdict: {dominant} dominates (Shapley contribution {mean[f'shapley_{dominant}']:.3f} vs "
          f"{weak} {mean[f'shapley_{weak}']:.3f}).")
    for m in mods:
        gap = mean[f"probe_alone_{m}"] - mean[f"probe_joint_{m}"]
        state = "UNDER-LEARNED by joint training" if gap > 0.02 else "learned as well as alone"
        print(f"  {m} encoder: linear probe {mean[f'probe_joint_{m}']:.3f} after joint training vs "
              f"{mean[f'probe_alone_{m}']:.3f} trained alone -> {state}.")
    with open(os.path.join(args.out, "diagnose_av_digits_baseline.json"), "w") as f:
        json.dump({"command": "python examples/diagnose.py " + " ".join(argv or sys.argv[1:]), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
