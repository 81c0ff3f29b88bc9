"""Step-time overhead of a balancing callback: median step time with it ÷ without it.

Protocol (benchmark-protocol.md §4): one process, the same model and batch, the two settings
alternating (A B A B ...) in short fits, warm-up steps of every fit dropped, median over all timed
steps. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward,
the callback's hooks and the optimizer step (data loading excluded).

    python examples/overhead.py                       # AV-Digits model + synthetic models, M = 2, 4, 8
    python examples/overhead.py --rounds 10 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AVDigitsNet  # noqa: E402

from lightning_balance import OGMGE  # noqa: E402
from lightning_balance.data import MultimodalTensorDataset  # noqa: E402


class StepTimer(pl.Callback):
    def __init__(self, skip: int) -> None:
        self.skip, self.times, self._t0 = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t0)


def fixed_batches(dims: dict[str, int], batch_size: int, steps: int, classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batch_size * steps
    tensors = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
    tensors["target"] = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(MultimodalTensorDataset(tensors), batch_size=batch_size, shuffle=False)


def measure(model: pl.LightningModule, data: DataLoader, make_callbacks: Callable[[], list[pl.Callback]],
            rounds: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(rounds):
        for arm in ("A", "B"):
            timer = StepTimer(skip=warmup)
            callbacks = [timer] + (make_callbacks() if arm == "B" else [])
            trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                 num_sanity_val_steps=0)
            trainer.fit(model, data)
            times[arm].extend(timer.times)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    return {"median_ms_without": 1e3 * a, "median_ms_with": 1e3 * b, "ratio": b / a, "timed_steps": len(times["B"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25, help="steps per fit (the first 5 are warm-up)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)

    methods = {
        "OGM-GE": lambda: [OGMGE(alpha=0.3, params="weights", seed=0, log=False)],
        "OGM (no noise)": lambda: [OGMGE(alpha=0.3, params="weights", noise=False, log=False)],
        "OGM-GE + logging": lambda: [OGMGE(alpha=0.3, params="weights", seed=0)],
    }
    setups = [("AV-Digits model", {"audio": 40, "visual": 64}, dict(), 64)]
    for m in (2, 4, 8):
        dims = {f"m{i}": 128 for i in range(m)}
        setups.append((f"synthetic, M={m}", dims, dict(hidden=1024, feature_dim=256), 128))

    rows = []
    for name, dims, kw, batch in setups:
        torch.manual_seed(0)
        model = AVDigitsNet(input_dims=dims, **kw)
        params = sum(p.numel() for p in model.parameters())
        data = fixed_batches(dims, batch, args.steps)
        for method, make in methods.items():
            res = measure(model, data, make, args.rounds, warmup=5)
            rows.append({"model": name, "params": params, "batch": batch, "method": method, **res})
            print(f"{name:18s} {params / 1e6:5.2f}M  {method:18s} {res['median_ms_without']:7.2f} ms -> "
                  f"{res['median_ms_with']:7.2f} ms  ratio {res['ratio']:.3f}", flush=True)

    print("\n| model | parameters | batch | method | step without (ms) | step with (ms) | ratio |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['method']} | "
              f"{r['median_ms_without']:.2f} | {r['median_ms_with']:.2f} | {r['ratio']:.3f} |")
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump({"command": "python examples/overhead.py " + " ".join(argv or sys.argv[1:]),
                   "device": "cpu", "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
