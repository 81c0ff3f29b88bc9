"""Cost of the epoch-level methods (issue 14): the time of their work at an epoch boundary against one training
epoch, measured in the same fit.

Methods that act between epochs (Diagnosing & Re-learning's diagnosis and re-initialisation) add nothing to a
training step, so the step-time A/B of ``overhead.py`` reads 1.00 for them. What they cost is their epoch-end
work; this script times it with the training steps of the same fit (same process, model and data) and reports
the work against the first (plain) epoch, and the later epochs against the first (modality valuation grows
the training set).

    python examples/epoch_overhead.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AVDigitsNet, training_runs  # noqa: E402

from lightning_balance import Relearning, SampleValuation  # noqa: E402
from lightning_balance.data import AVDigitsDataModule  # noqa: E402
from lightning_balance.progress import RunProgress  # noqa: E402


class Timed(pl.Callback):
    """Times the training steps of each epoch and the wrapped callback's ``on_train_epoch_end``."""

    def __init__(self, inner: pl.Callback) -> None:
        self.inner = inner
        self.epoch_s: list[float] = []
        self.work_s: list[float] = []
        self._start = 0.0

    def setup(self, trainer, pl_module, stage):
        self.inner.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        self.inner.on_fit_start(trainer, pl_module)

    def _timed(self, hook, *args) -> None:
        done = len(getattr(self.inner, "history", []))
        t0 = time.perf_counter()
        getattr(self.inner, hook)(*args)
        if len(getattr(self.inner, "history", [])) > done:
            self.work_s.append(time.perf_counter() - t0)

    def on_train_epoch_start(self, trainer, pl_module):  # Re-learning's re-init runs here (after the last epoch)
        self._timed("on_train_epoch_start", trainer, pl_module)
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._timed("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):  # the valuation runs here
        self.epoch_s.append(time.perf_counter() - self._start)
        self._timed("on_train_epoch_end", trainer, pl_module)

    def state_dict(self):
        return self.inner.state_dict()


AB_METHODS = (("MLA (2 modality steps per batch)", {"mla": True}),
              ("ReconBoost (a phase-1 epoch: one learner, the others without gradient)", {"reconboost_stage": 1}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    methods = epoch_methods(args.epochs)
    with training_runs(len(methods) + len(AB_METHODS)) as runs:  # quiet fits, one progress line per method
        measure_all(args, methods, runs, "python examples/epoch_overhead.py " + " ".join(argv or sys.argv[1:]))


def epoch_methods(epochs: int) -> dict:
    """The epoch-level methods: name -> (callback factory, datamodule kwargs)."""
    return {"Relearning (diagnosis + re-init)": (lambda: Relearning(every_n_epochs=1, max_reinits=epochs,
                                                                    log_metrics=False), {"holdout_fraction": 0.1}),
            "SampleValuation (valuation pass)": (lambda: SampleValuation(start_epoch=1, log_metrics=False),
                                                 {"valuation": True}),
            "SampleValuation, modality level": (lambda: SampleValuation(level="modality", start_epoch=1,
                                                                        log_metrics=False), {"valuation": True})}


def measure_all(args: argparse.Namespace, methods: dict, runs: RunProgress, command: str) -> None:
    """Measure every method (a ``runs`` line each), print the tables and write the JSON (with ``command``)."""
    rows = []
    for name, (make, data_kwargs) in methods.items():
        runs.start(name)
        torch.manual_seed(0)
        data = AVDigitsDataModule(seed=0, **data_kwargs)
        timed = Timed(make())
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[timed], reload_dataloaders_every_n_epochs=1)
        trainer.fit(AVDigitsNet(input_dims={"audio": 40, "visual": 64}), datamodule=data)
        first = timed.epoch_s[0]  # the plain first epoch (the data as given)
        later = statistics.median(timed.epoch_s[1:])  # after the method's first epoch-end work
        work = statistics.median(timed.work_s)
        rows.append({"model": "AV-Digits MLP", "method": name, "first_epoch_ms": 1e3 * first,
                     "later_epoch_ms": 1e3 * later, "work_ms": 1e3 * work, "work_ratio": work / first,
                     "epoch_ratio": later / first, "train_samples": len(data.splits["train"]["target"])})
        print(f"{name}: first epoch {1e3 * first:.0f} ms, later epochs {1e3 * later:.0f} ms, epoch-end work "
              f"{1e3 * work:.0f} ms", flush=True)
        runs.done(result_text=f"work ÷ first epoch {work / first:.2f}")
    print("\n| model | method | first epoch (ms) | later epochs (ms) | epoch-end work (ms) | work ÷ first epoch | "
          "later ÷ first epoch |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['first_epoch_ms']:.0f} | {r['later_epoch_ms']:.0f} | "
              f"{r['work_ms']:.0f} | {r['work_ratio']:.2f} | {r['epoch_ratio']:.2f} |")
    # The methods that own their training step (MLA: one optimizer step per modality; ReconBoost: one learner or the
    # ensemble per step): A/B alternating epochs in one process, the plain model and the method's model on the same
    # data, median epoch time of each over the alternations after the first.
    ab = []
    for name, kwargs in AB_METHODS:
        runs.start(name)
        torch.manual_seed(0)
        data = AVDigitsDataModule(seed=0)
        models = {"plain": AVDigitsNet(input_dims={"audio": 40, "visual": 64}),
                  "method": AVDigitsNet(input_dims={"audio": 40, "visual": 64}, **kwargs)}
        times: dict[str, list[float]] = {"plain": [], "method": []}
        for _ in range(args.epochs + 1):
            for arm, model in models.items():
                trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
                t0 = time.perf_counter()
                trainer.fit(model, datamodule=data)
                times[arm].append(time.perf_counter() - t0)
        plain, method = statistics.median(times["plain"][1:]), statistics.median(times["method"][1:])
        ab.append({"model": "AV-Digits MLP", "method": name, "plain_epoch_ms": 1e3 * plain,
                   "method_epoch_ms": 1e3 * method, "ratio": method / plain})
        print(f"{name}: plain epoch {1e3 * plain:.0f} ms, with the method {1e3 * method:.0f} ms, ratio "
              f"{method / plain:.2f}", flush=True)
        runs.done(result_text=f"ratio {method / plain:.2f}")
    print("\n| model | method | plain epoch (ms) | epoch with the method (ms) | ratio |\n|---|---|---|---|---|")
    for r in ab:
        print(f"| {r['model']} | {r['method']} | {r['plain_epoch_ms']:.0f} | {r['method_epoch_ms']:.0f} | "
              f"{r['ratio']:.2f} |")
    with open(os.path.join(args.out, "overhead_epoch_level.json"), "w") as f:
        json.dump({"command": command, "device": "cpu",
                   "threads": torch.get_num_threads(), "rows": rows, "alternating_epochs": ab}, f, indent=1)


if __name__ == "__main__":
    main()
