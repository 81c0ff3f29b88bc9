"""The library's story in about a minute: diagnose a multimodal model, apply what the diagnosis recommends, verify.

    python examples/demo.py            # or: make demo / lightning-balance demo
    python examples/demo.py --seeds 0 1 2 3 4 --out results

1. AV-Digits (bundled, no download): "audio" = mnist1d signals, "visual" = scikit-learn digits with their leading
   principal components removed; the modalities are paired by label.
2. Train each modality alone (the references) and the joint baseline; keep each model's best validation epoch.
3. Diagnose the baseline on validation: which modality dominates, which encoder is under-learned (probe after
   joint training vs trained alone), whether the fused model beats the best modality alone and the ensemble, with
   95% intervals, and the next step the project's evidence (docs/which_method.md) recommends.
4. Train with that method, diagnose again.
5. A table on test over the seeds (each modality alone, the ensemble, baseline, method: paired differences), the
   method's step-time cost measured A/B in this process, and one figure: each encoder's probe before and after
   against its trained-alone reference (``results/demo.png``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_balance import (
    MultimodalMixin,
    compare_methods,
    diagnose,
    fit_alone,
    fit_method,
    plot_probes,
    step_time_ratio,
)
from lightning_balance.data import AVDigitsDataModule


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())


class AVNet(MultimodalMixin, pl.LightningModule):
    """A late-fusion model as a user writes it: an encoder per modality, concatenation, a linear head, SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.audio, self.visual, self.head = mlp(40), mlp(64), nn.Linear(256, 10)
        self.configure_modalities({"audio": self.audio, "visual": self.visual}, head=self.head)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = {"audio": self.audio(batch["audio"]), "visual": self.visual(batch["visual"])}
        return F.cross_entropy(self.fuse(features, batch["target"]), batch["target"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.balanced_loss(self.loss(batch))  # what a method adds to the objective, if anything

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    # one thread: as fast as two for these small MLPs, and immune to the many-fold slowdown of two OpenMP threads
    # sharing two cores with another busy process (measured: 4.4 s vs 283 s for one 40-epoch fit)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    data = AVDigitsDataModule(seed=0)
    data.setup()
    val = data.val_dataloader()
    seed = args.seeds[0]

    print(f"1. Each modality alone and the joint baseline (seed {seed}, {args.epochs} epochs, best validation epoch)")
    references = fit_alone(AVNet(), data, max_epochs=args.epochs, seed=seed)
    base = fit_method(AVNet, data, "baseline", max_epochs=args.epochs, seed=seed)
    baseline, keep = base.module, base.val_accuracy
    print(f"   validation accuracy: audio alone {references.val_accuracy['audio']:.3f}, visual alone "
          f"{references.val_accuracy['visual']:.3f}, joint baseline {keep:.3f}\n")

    print("2. The diagnosis of the baseline (validation samples; ± = 95% interval)\n")
    before = diagnose(baseline, val, references=references, label="baseline")
    print(_indent(str(before)))
    chosen = before.suggested_method
    if chosen is None:
        print("\nThe diagnosis recommends no balancing method here; the demo stops.")
        return
    print(f"\n3. Apply what the diagnosis recommends: {chosen}\n")
    fixed = fit_method(AVNet, data, chosen, max_epochs=args.epochs, seed=seed, references=references).module
    after = diagnose(fixed, val, references=references, label=chosen)
    print(_indent(str(after)))

    print(f"\n4. Verified on test, {len(args.seeds)} seeds (paired: the same seed gives both runs the same initial "
          f"weights and batch order)\n")
    result = compare_methods(AVNet, data, ["baseline", chosen], seeds=args.seeds, max_epochs=args.epochs,
                             diagnose=False)
    saved = result.save(args.out, "demo_verify")
    print(result.table())
    cost = step_time_ratio(AVNet, chosen, data)
    print(f"\nCost of {chosen}: {cost['ratio']:.2f}× the baseline's training-step time (A/B alternating steps in one "
          f"fit, median of {int(cost['timed_steps'])} steps each: {cost['median_ms_with']:.2f} vs "
          f"{cost['median_ms_without']:.2f} ms).")
    path = os.path.join(args.out, "demo.png")
    plot_probes([before, after], path, title=f"AV-Digits, seed {seed}: {chosen} vs the baseline")
    print(f"\nFigure: {path}; the table and every seed's values: {saved['md']}, {saved['json']}. "
          f"Wall time {time.perf_counter() - start:.0f} s.")


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
