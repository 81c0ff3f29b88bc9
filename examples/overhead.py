"""Step-time overhead of a balancing callback: median step time with it ÷ without it.

Protocol (benchmark-protocol.md §4): one process, the same model and batches, the two settings
alternating step by step (A B A B ...) in one fit, warm-up steps dropped, median over the timed steps.
A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, the
callback's hooks and the optimizer step (data loading excluded).

    python examples/overhead.py                  # AV-Digits model, synthetic MLPs (M = 2, 4, 8), a Conv1d model
    python examples/overhead.py --steps 400
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
from _common import AVDigitsNet, mlp, training_runs  # noqa: E402

from lightning_balance import (  # noqa: E402
    AGM,
    AMCo,
    OGMGE,
    OPM,
    PMR,
    CMLLoss,
    ContrastiveLoss,
    CrossModalDistillation,
    ExplicitBasisReallocation,
    Greedy,
    InfoReg,
    LFMLoss,
    MBSDLoss,
    MMPareto,
    ModalityDropout,
    ReconstructionLoss,
    UMTLoss,
)
from lightning_balance.data import MultimodalTensorDataset  # noqa: E402


class ConvNet(AVDigitsNet):
    """Synthetic model with Conv1d encoders (input (N, 1, length) per modality), mean-pooled, concat head."""

    def __init__(self, input_dims: dict[str, int], channels: int = 256, layers: int = 4, kernel: int = 5,
                 num_classes: int = 10, aux_heads: bool = False, unimodal_losses: bool = False) -> None:
        pl.LightningModule.__init__(self)
        self.use_unimodal_losses = unimodal_losses
        def encoder() -> torch.nn.Sequential:
            mods: list[torch.nn.Module] = [torch.nn.Conv1d(1, channels, kernel, padding=kernel // 2), torch.nn.ReLU()]
            for _ in range(layers - 1):
                mods += [torch.nn.Conv1d(channels, channels, kernel, padding=kernel // 2), torch.nn.ReLU()]
            return torch.nn.Sequential(*mods, torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten())
        self.encoders = torch.nn.ModuleDict({m: encoder() for m in input_dims})
        self.head = torch.nn.Linear(channels * len(input_dims), num_classes)
        if aux_heads:
            self.aux_heads = torch.nn.ModuleDict({m: torch.nn.Linear(channels, num_classes) for m in input_dims})
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, head=self.head, unimodal="heads",
                                      unimodal_heads=dict(self.aux_heads.items()))
        else:
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, head=self.head)

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](batch[m].unsqueeze(1)) for m in self.modalities}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Alternating(pl.Callback):
    """Runs the wrapped callbacks on odd steps only (B) and times every step: A B A B ... in one fit.

    On a B step the wrapped callbacks join ``trainer.callbacks`` (put this probe first in the list), so Lightning
    calls their hooks itself and the library's stacked-method pipeline, which looks for its members there, runs
    them; on an A step they leave it again (their forward taps switched off). Fit-level hooks are forwarded.
    A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, the
    callbacks' hooks and the optimizer step (data loading excluded).
    """

    def __init__(self, inner: list[pl.Callback], warmup: int) -> None:
        self.inner, self.warmup = inner, warmup
        self.times: dict[str, list[float]] = {"A": [], "B": []}
        self._t0, self._arm = 0.0, "A"

    def _outside(self, trainer) -> list[pl.Callback]:
        return [cb for cb in self.inner if not any(cb is other for other in trainer.callbacks)]

    def setup(self, trainer, pl_module, stage):
        for cb in self.inner:
            cb.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        for cb in self.inner:
            cb.on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        for cb in self.inner:
            cb.on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):  # epoch-level work (snapshots, prototypes): not timed
        for cb in self._outside(trainer):
            cb.on_train_epoch_start(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage):
        for cb in self.inner:
            if any(cb is other for other in trainer.callbacks):
                trainer.callbacks.remove(cb)
            cb.teardown(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._arm = "B" if batch_idx % 2 else "A"
        if self._arm == "B":  # in place: Lightning is iterating this very list, and calls their hook next
            trainer.callbacks.extend(self._outside(trainer))
        else:
            for cb in self.inner:  # step A: out of the list, and the methods' forward taps stay out of the graph
                if any(cb is other for other in trainer.callbacks):
                    trainer.callbacks.remove(cb)
                cb._enabled = False
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._t0
        if batch_idx >= self.warmup:
            self.times[self._arm].append(elapsed)


class AlternatingTerms(Alternating):
    """A B A B ... for loss terms: the module skips its loss terms on the A steps."""

    def __init__(self, warmup: int) -> None:
        super().__init__([], warmup)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        pl_module.skip_loss_terms = self._arm == "A"
        if self._arm == "A":  # nor the feature adapters (EBR's heads) that the terms put before the fusion
            pl_module.feature_adapters = lambda: []
        elif "feature_adapters" in vars(pl_module):
            del pl_module.feature_adapters
        self._t0 = time.perf_counter()


def measure_terms(model: pl.LightningModule, data: DataLoader, warmup: int) -> dict[str, float]:
    """Median step time without (A) and with (B) the module's loss terms, alternating step by step."""
    probe = AlternatingTerms(warmup)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[probe],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, data)
    a, b = statistics.median(probe.times["A"]), statistics.median(probe.times["B"])
    return {"median_ms_without": 1e3 * a, "median_ms_with": 1e3 * b, "ratio": b / a, "timed_steps": len(probe.times["B"])}


def fixed_batches(dims: dict[str, int], batch_size: int, steps: int, classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batch_size * steps
    tensors = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
    tensors["target"] = torch.randint(0, classes, (n,), generator=g)
    tensors["index"] = torch.arange(n)  # CRD's memory index
    return DataLoader(MultimodalTensorDataset(tensors), batch_size=batch_size, shuffle=False)


def measure(model: pl.LightningModule, data: DataLoader, make_callbacks: Callable[[], list[pl.Callback]],
            warmup: int) -> dict[str, float]:
    """Median step time without (A) and with (B) the callbacks, alternating step by step in one fit."""
    probe = Alternating(make_callbacks(), warmup)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[probe],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, data)
    a, b = statistics.median(probe.times["A"]), statistics.median(probe.times["B"])
    return {"median_ms_without": 1e3 * a, "median_ms_with": 1e3 * b, "ratio": b / a, "timed_steps": len(probe.times["B"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="steps per setting (A and B alternate; 10 warm-up)")
    parser.add_argument("--out", default="results")
    parser.add_argument("--only-terms", action="store_true", help="only the loss terms (writes overhead_terms.json)")
    parser.add_argument("--only-collapse", action="store_true",
                        help="only the collapse paper's KD and EBR terms (writes overhead_collapse.json)")
    parser.add_argument("--only-dropout", action="store_true",
                        help="only modality dropout against plain training (writes overhead_dropout.json)")
    parser.add_argument("--only-survey", action="store_true",
                        help="only the survey methods of issue 14 (OPM, AMCo, LFM, MBSD) against plain training "
                             "(writes overhead_survey.json)")
    parser.add_argument("--only-greedy", action="store_true",
                        help="only Greedy on its MMTM model against that model trained plainly (writes overhead_greedy.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)

    def ogm_ge(params: str, log: bool = False) -> Callable[[], list[pl.Callback]]:
        return lambda: [OGMGE(alpha=0.3, params=params, seed=0, log_metrics=log)]

    def ogm(params: str) -> Callable[[], list[pl.Callback]]:
        return lambda: [OGMGE(alpha=0.3, params=params, noise=False, log_metrics=False)]

    def others() -> dict[str, Callable[[], list[pl.Callback]]]:
        return {"InfoReg": lambda: [InfoReg(log_metrics=False)],
                "AGM": lambda: [AGM(log_metrics=False)],
                "PMR": lambda: [PMR(log_metrics=False)]}

    # (name, model factory, input dims, batch size, {method: callbacks factory})
    setups: list[tuple[str, Callable[[], pl.LightningModule], dict[str, int], int, dict]] = []
    av = {"audio": 40, "visual": 64}
    setups.append(("AV-Digits MLP", lambda: AVDigitsNet(input_dims=av), av, 64,
                   {"OGM-GE": ogm_ge("weights"), "OGM (no noise)": ogm("weights"),
                    "OGM-GE + logging": ogm_ge("weights", log=True), **others()}))
    for m in (2, 4, 8):
        dims = {f"m{i}": 128 for i in range(m)}
        setups.append((f"synthetic MLP, M={m}", lambda dims=dims: AVDigitsNet(input_dims=dims, hidden=2048, feature_dim=512),
                       dims, 128, {"OGM-GE": ogm_ge("weights"), "OGM (no noise)": ogm("weights"), **others()}))
    # MMPareto: the model trains on multimodal + unimodal losses (auxiliary heads) in both arms; the
    # ratio is MMPareto's extra cost over a plain step of that objective
    mmpareto = {"MMPareto": lambda: [MMPareto(log_metrics=False)]}
    setups.append(("AV-Digits MLP + aux heads", lambda: AVDigitsNet(input_dims=av, aux_heads=True, unimodal_losses=True),
                   av, 64, mmpareto))
    for m in (2, 4):
        dims = {f"m{i}": 128 for i in range(m)}
        setups.append((f"synthetic MLP + aux heads, M={m}",
                       lambda dims=dims: AVDigitsNet(input_dims=dims, hidden=2048, feature_dim=512, aux_heads=True,
                                                     unimodal_losses=True), dims, 128, mmpareto))
    conv_dims = {f"m{i}": 64 for i in range(4)}
    setups.append(("synthetic Conv1d, M=4", lambda: ConvNet(conv_dims), conv_dims, 16,
                   {"OGM-GE": ogm_ge("conv"), "OGM (no noise)": ogm("conv"), **others()}))
    setups.append(("synthetic Conv1d + aux heads, M=2", lambda: ConvNet({"m0": 64, "m1": 64}, aux_heads=True, unimodal_losses=True),
                   {"m0": 64, "m1": 64}, 16, mmpareto))

    if args.only_dropout:  # the A arm trains on complete samples, the B arm with dropout (same model, batches)
        dropout = {"dropout p=0.3": lambda: [ModalityDropout(p=0.3, seed=0, log_metrics=False)],
                   "dropout adaptive": lambda: [ModalityDropout(p=0.3, schedule="adaptive", seed=0, log_metrics=False)]}
        setups = [("AV-Digits MLP", lambda: AVDigitsNet(input_dims=av), av, 64, dropout),
                  ("synthetic MLP, M=4", lambda: AVDigitsNet(input_dims={f"m{i}": 128 for i in range(4)}, hidden=2048,
                                                             feature_dim=512), {f"m{i}": 128 for i in range(4)}, 128,
                   dropout)]

    if args.only_survey:  # forward-pass methods: the A arm trains plainly, the B arm with the method (same model, batches)
        survey = {"AMCo": lambda: [AMCo(seed=0, log_metrics=False)],
                  "OPM p_exe=0.7": lambda: [OPM(start_epoch=0, seed=0, log_metrics=False)],
                  "OPM p_exe=1": lambda: [OPM(start_epoch=0, p_exe=1.0, seed=0, log_metrics=False)]}
        four = {f"m{i}": 128 for i in range(4)}
        setups = [("AV-Digits MLP", lambda: AVDigitsNet(input_dims=av), av, 64, survey),
                  ("synthetic MLP, M=4", lambda: AVDigitsNet(input_dims=four, hidden=2048, feature_dim=512), four, 128,
                   survey)]

    if args.only_greedy:  # Greedy: its MMTM model trained plainly (A) and with the callback (B); the MMTMs are the
        # model's own cost, not the method's
        greedy = {"Greedy": lambda: [Greedy(start_epoch=0, log_metrics=False, branch_heads="unimodal_heads")]}
        four = {f"m{i}": 128 for i in range(4)}
        setups = [("AV-Digits MLP + MMTM", lambda: AVDigitsNet(input_dims=av, mmtm=True), av, 64, greedy),
                  ("synthetic MLP + MMTM, M=4", lambda: AVDigitsNet(input_dims=four, hidden=2048, feature_dim=512,
                                                                    mmtm=True), four, 128, greedy)]

    rows = []
    # loss terms: the same model with and without its terms (A/B within one fit)
    def term_factories(dims: dict[str, int], feature_dim: int) -> dict[str, Callable[[], list]]:
        feats = {m: feature_dim for m in dims}
        names = list(dims)
        n_samples = {128: 64, 512: 128}[feature_dim] * args.steps  # fixed_batches: batch × steps samples
        hidden_of = {128: 256, 512: 2048}[feature_dim]
        return {"UMT": lambda: [UMTLoss({m: mlp(d, hidden_of, feature_dim) for m, d in dims.items()})],
                "CML": lambda: [CMLLoss(rank_weight=0.1)],
                "contrastive": lambda: [ContrastiveLoss(feature_dims=feats, weight=0.3)],
                "reconstruction": lambda: [ReconstructionLoss(feats, dict(dims), weight=0.03)],
                # the collapse paper: KD into the last modality from the others (weakest first), and EBR
                "KD, CRD": lambda: [CrossModalDistillation(names[-1], names[:-1], feats, num_samples=n_samples,
                                                           nce_k=round(16384 / 50000 * n_samples),
                                                           epochs_per_teacher=1 if len(names) > 2 else None)],
                "KD, in-batch": lambda: [CrossModalDistillation(names[-1], names[:-1], feats, method="infonce",
                                                                epochs_per_teacher=1 if len(names) > 2 else None)],
                "EBR": lambda: [ExplicitBasisReallocation(feats, interleave_epochs=None)]}

    def survey_terms(dims: dict[str, int], feature_dim: int) -> dict[str, Callable[[], list]]:
        return {"LFM fitted": lambda: [LFMLoss()], "MBSD": lambda: [MBSDLoss()]}

    # the loss-term measurements (model, dims, hidden, feature dim, batch, term, factory), then the callbacks'
    term_jobs = [(name, dims, hidden, feature_dim, batch, term, make)
                 for name, dims, hidden, feature_dim, batch in (() if args.only_dropout or args.only_greedy else (
                     ("AV-Digits MLP", av, 256, 128, 64), ("synthetic MLP, M=2", {"m0": 128, "m1": 128}, 2048, 512, 128)))
                 for term, make in (survey_terms if args.only_survey else term_factories)(dims, feature_dim).items()
                 if not (args.only_collapse and not term.startswith(("KD", "EBR")))]
    setups = [] if args.only_terms or args.only_collapse else setups
    with training_runs(len(term_jobs) + sum(len(methods) for *_, methods in setups)) as runs:  # quiet, a line each
        # the probes train on fixed batches only, by design (the models' validation_step is not timed)
        warnings.filterwarnings("ignore", "You defined a `validation_step` but have no `val_dataloader`")
        for name, dims, hidden, feature_dim, batch, term, make in term_jobs:
            runs.start(f"{name} · {term}")
            torch.manual_seed(0)
            model = AVDigitsNet(input_dims=dims, hidden=hidden, feature_dim=feature_dim, loss_terms=make())
            res = measure_terms(model, fixed_batches(dims, batch, args.steps), warmup=10)
            params = sum(p.numel() for p in model.parameters())
            rows.append({"model": name, "params": params, "batch": batch, "method": f"{term} (loss term)", **res})
            print(f"{name:22s} {params / 1e6:5.2f}M  {term:18s} {res['median_ms_without']:8.2f} ms -> "
                  f"{res['median_ms_with']:8.2f} ms  ratio {res['ratio']:.3f}", flush=True)
            runs.done(result_text=f"ratio {res['ratio']:.3f}")

        for name, factory, dims, batch, methods in setups:
            torch.manual_seed(0)
            model = factory()
            params = sum(p.numel() for p in model.parameters())
            data = fixed_batches(dims, batch, args.steps)
            for method, make in methods.items():
                runs.start(f"{name} · {method}")
                res = measure(model, data, make, warmup=10)
                rows.append({"model": name, "params": params, "batch": batch, "method": method, **res})
                print(f"{name:22s} {params / 1e6:5.2f}M  {method:18s} {res['median_ms_without']:8.2f} ms -> "
                      f"{res['median_ms_with']:8.2f} ms  ratio {res['ratio']:.3f}", flush=True)
                runs.done(result_text=f"ratio {res['ratio']:.3f}")

    print("\n| model | parameters | batch | method | step without (ms) | step with (ms) | ratio |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['method']} | "
              f"{r['median_ms_without']:.2f} | {r['median_ms_with']:.2f} | {r['ratio']:.3f} |")
    extra: dict[str, float] = {}
    if args.only_survey:  # LFM's learnable schedule: one hyper step per epoch (not per step), timed alone
        for name, dims, hidden, feature_dim in (("AV-Digits MLP", av, 256, 128),
                                                ("synthetic MLP, M=4", {f"m{i}": 128 for i in range(4)}, 2048, 512)):
            torch.manual_seed(0)
            model = AVDigitsNet(input_dims=dims, hidden=hidden, feature_dim=feature_dim)
            batch = next(iter(fixed_batches(dims, 8, 1)))
            term = LFMLoss(schedule="learnable")
            term._holdout = batch  # the held-out batch the term would read from holdout_dataloader()
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                term.update_alpha(model, epoch=0)
                times.append(time.perf_counter() - t0)
            extra[f"lfm_learnable_update_ms ({name})"] = 1e3 * statistics.median(times[1:])
            print(f"LFM learnable, one hyper step per epoch ({name}, 8 samples): "
                  f"{1e3 * statistics.median(times[1:]):.1f} ms", flush=True)
    # The floor under OGM-GE's extra time: drawing one Gaussian number per edited gradient element.
    buffer, generator = torch.empty(5_000_000), torch.Generator().manual_seed(0)
    draws = []
    for _ in range(11):
        t0 = time.perf_counter()
        buffer.normal_(generator=generator)
        draws.append(time.perf_counter() - t0)
    rng_ms = 1e3 * statistics.median(draws[1:])
    print(f"\nGaussian draw of 5M float32 elements (torch normal_, this device): {rng_ms:.1f} ms")
    name = ("overhead_terms.json" if args.only_terms else "overhead_dropout.json" if args.only_dropout
            else "overhead_survey.json" if args.only_survey else "overhead_greedy.json" if args.only_greedy
            else "overhead_collapse.json" if args.only_collapse else "overhead.json")
    with open(os.path.join(args.out, name), "w") as f:
        json.dump({"command": "python examples/overhead.py " + " ".join(argv or sys.argv[1:]),
                   "device": "cpu", "threads": torch.get_num_threads(), "normal_5M_ms": rng_ms, "rows": rows, **extra},
                  f, indent=1)


if __name__ == "__main__":
    main()
