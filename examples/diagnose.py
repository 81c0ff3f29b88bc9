"""Diagnose modality imbalance of a trained joint model, from measurements.

    python examples/diagnose.py --seeds 0 1 2 3 4 --out docs/results
    python examples/diagnose.py --dataset synthetic

Per seed: trains each modality alone and the joint baseline (checkpoints chosen on validation). The joint
model trains with :class:`~lightning_balance.ModalityDiagnostics` (every 10 epochs: a report on validation
data, with each encoder's probe accuracy when trained alone and its standard error as the reference, and a
PNG of per-modality accuracy and contribution over epochs). The restored model is then measured on test data with
:func:`~lightning_balance.functional.collapse_diagnostics`: Shapley contribution, accuracy with each
modality missing, effective/numerical rank, CKA, VIF; each encoder's linear probe is fitted on the training
split and scored on test, after joint training and trained alone. Prints the table and the verdict (means
over seeds) and writes the per-seed values to JSON.
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
from _common import AVDigitsNet, UnimodalNet, fit, make_data, mean_std, modality_count, training_runs  # noqa: E402

from lightning_balance import ModalityDiagnostics  # noqa: E402
from lightning_balance.functional import (  # noqa: E402
    collapse_diagnostics,
    cross_validated_probe_accuracy,
    diagnostics_table,
    imbalance_verdict,
    linear_probe_accuracy,
)
from lightning_balance.functional.diagnostics import probe_standard_error  # noqa: E402


@torch.no_grad()
def diagnose(joint: AVDigitsNet, alone: dict[str, UnimodalNet], data) -> dict[str, float]:
    """Test-split diagnosis of the joint model; probes trained on the training split, scored on test."""
    test, train = data.splits["test"], data.splits["train"]
    feats, train_feats = joint.features(test), joint.features(train)
    y, c = test["target"], data.num_classes
    out = collapse_diagnostics(feats, y, joint.fuse_subset, c, unimodal_logits=joint.compute_unimodal_logits(feats),
                               probe=False)
    for m in joint.modalities:
        out[f"probe/{m}"] = linear_probe_accuracy(train_feats[m], train["target"], feats[m], y, c)
        out[f"probe_se/{m}"] = probe_standard_error(out[f"probe/{m}"], len(y))
        enc = alone[m].encoder
        out[f"probe_alone/{m}"] = linear_probe_accuracy(enc(train[m]), train["target"], enc(test[m]), y, c)
        out[f"probe_alone_se/{m}"] = probe_standard_error(out[f"probe_alone/{m}"], len(y))
    return {k: v for k, v in out.items() if not k.startswith("seconds/")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="av_digits", choices=["av_digits", "synthetic"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    start = time.time()
    total = len(args.seeds) * (modality_count(args.dataset) + 1)  # each modality alone and the joint model
    with tempfile.TemporaryDirectory() as root, training_runs(total):  # quiet fits, one line per finished fit
        for seed in args.seeds:
            data = make_data(args.dataset, seed)
            alone = {}
            for m, dim in data.feature_dims.items():
                pl.seed_everything(seed, verbose=False)
                alone[m], _ = fit(UnimodalNet(m, dim, num_classes=data.num_classes), data, [], args.epochs,
                                  f"{root}/{seed}-{m}", progress=False, label=f"seed {seed} {m} alone")
            val = data.splits["val"]
            with torch.no_grad():  # the monitor's reference: each encoder trained alone, probed like the monitor does,
                alone_val = {}     # with its binomial standard error
                for m, net in alone.items():
                    acc = cross_validated_probe_accuracy(net.encoder(val[m]), val["target"], data.num_classes)
                    alone_val[m] = (acc, probe_standard_error(acc, len(val["target"])))
            first = seed == args.seeds[0]
            monitor = ModalityDiagnostics(every_n_epochs=10, alone_probe=alone_val, verbose=first, plot=first,
                                          plot_dir=args.out)
            pl.seed_everything(seed, verbose=False)
            joint, _ = fit(AVDigitsNet(input_dims=dict(data.feature_dims), num_classes=data.num_classes), data,
                           [monitor], args.epochs, f"{root}/{seed}-joint", progress=False, label=f"seed {seed} joint")
            if first and monitor.plot_path:
                os.replace(monitor.plot_path, os.path.join(args.out, f"diagnostics_{args.dataset}_baseline.png"))
            rows.append({"seed": seed, **diagnose(joint, alone, data),
                         "monitor": monitor.diagnostics_history})
            print(f"seed {seed} done", flush=True)
    mods = list(data.feature_dims)
    keys = [k for k in rows[0] if k not in ("seed", "monitor")]
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys}
    print(f"\nTest split, mean over seeds {args.seeds}; probes fitted on the training split; "
          f"{time.time() - start:.0f} s.\n")
    alone_mean = {m: (mean[f"probe_alone/{m}"], mean[f"probe_alone_se/{m}"]) for m in mods}
    print(diagnostics_table(mean, mods, alone_mean))
    print("\n| measurement | mean ± std over seeds |\n|---|---|")
    for k in keys:
        print(f"| {k} | {mean_std([r[k] for r in rows])} |")
    print("\nVerdict (means over seeds, with the mean of the per-seed standard errors):")
    for line in imbalance_verdict(mean, mods, alone_mean):
        print("  " + line)
    with open(os.path.join(args.out, f"diagnose_{args.dataset}_baseline.json"), "w") as f:
        json.dump({"command": "python examples/diagnose.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
