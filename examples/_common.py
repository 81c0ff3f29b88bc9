"""Models, training and evaluation shared by the example scripts (AV-Digits benchmark protocol)."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from lightning_balance import (
    CMLLoss,
    ContrastiveLoss,
    CosineHead,
    CrossModalDistillation,
    ExplicitBasisReallocation,
    LFMLoss,
    MBSDLoss,
    MLAFusion,
    MMTM,
    MultimodalMixin,
    ReconBoostFusion,
    ReconstructionLoss,
    SampleValuation,
)
from lightning_balance.data import AVDigitsDataModule, SyntheticCollapseDataModule
from lightning_balance.functional import linear_probe_accuracy
from lightning_balance.progress import RunProgress, quiet


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.ReLU())


class HiddenFusion(nn.Module):
    """Concatenation, one hidden ReLU layer (``act``: the fusion neurons whose polysemanticity is scored), a linear
    output: the fusion head of the collapse paper's analysis, where a neuron can mix the modalities."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.hidden, self.act, self.out = nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(torch.cat(features, dim=-1))))


class BranchMean(nn.Module):
    """Greedy's prediction: one linear head per branch, the average of their logits."""

    def __init__(self, names: Sequence[str], feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(feature_dim, num_classes) for m in names})

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(z) for head, z in zip(self.heads.values(), features)]).mean(0)


class AVDigitsNet(MultimodalMixin, pl.LightningModule):
    """The calibration model of the benchmark protocol: one MLP encoder per modality, concat fusion,
    a linear head (or, with ``fusion_hidden``, a :class:`HiddenFusion`); SGD with momentum. The mixin is the only
    thing that balancing adds to it."""

    def __init__(self, input_dims: Optional[dict[str, int]] = None, hidden: int = 256, feature_dim: int = 128,
                 num_classes: int = 10, lr: float = 0.02, momentum: float = 0.9, aux_heads: bool = False,
                 unimodal_losses: bool = False, cosine_scale: Optional[float] = None,
                 loss_terms: Optional[list] = None, missing: str = "zeros", fusion_hidden: int = 0,
                 mla: bool = False, mla_projection: bool = True, reconboost_stage: int = 0, mmtm: bool = False) -> None:
        super().__init__()
        input_dims = input_dims or {"audio": 40, "visual": 64}
        self.save_hyperparameters(ignore=["loss_terms"])
        self.use_unimodal_losses = unimodal_losses
        self.encoders = nn.ModuleDict({m: mlp(d, hidden, feature_dim) for m, d in input_dims.items()})
        self.head = nn.Linear(feature_dim * len(input_dims), num_classes)
        if fusion_hidden and (cosine_scale is not None or aux_heads):
            raise ValueError("fusion_hidden is the plain joint model's option: not with cosine_scale or aux_heads.")
        if fusion_hidden:  # the collapse paper's setting: fusion neurons that can mix the modalities
            self.head = HiddenFusion(feature_dim * len(input_dims), fusion_hidden, num_classes)
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, fusion=self.head,
                                      **self._fill(missing, input_dims))
        elif mmtm:  # Greedy's architecture: MMTMs after both hidden layers of the encoders, a head per branch
            self.mmtm_layers = nn.ModuleList([MMTM({m: hidden for m in input_dims}), MMTM({m: feature_dim for m in input_dims})])
            self.head = BranchMean(list(input_dims), feature_dim, num_classes)
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, fusion=self.head,
                                      unimodal="heads", unimodal_heads=dict(self.head.heads.items()))
        elif reconboost_stage:  # ReconBoost: learners through a shared MLP head, stages of E1 + E1 epochs
            self.head = ReconBoostFusion(nn.Sequential(nn.Linear(feature_dim, 256), nn.ReLU(), nn.Linear(256, num_classes)),
                                         epochs_per_stage=reconboost_stage, correct_epochs=reconboost_stage)
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, fusion=self.head)
            self.automatic_optimization = False
        elif mla:  # MLA: one head shared by the modalities, one optimizer step per modality, entropy fusion
            self.head = MLAFusion(nn.Linear(feature_dim, num_classes), projection=mla_projection)
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, fusion=self.head)
            self.automatic_optimization = False
        elif cosine_scale is not None:  # MMCosine: the cosine head replaces the linear one
            self.head = CosineHead([feature_dim] * len(input_dims), num_classes, scale=cosine_scale)
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, fusion=self.head)
        elif aux_heads:  # one linear head per modality (MMPareto's and Gradient-Blending's unimodal heads)
            self.aux_heads = nn.ModuleDict({m: nn.Linear(feature_dim, num_classes) for m in input_dims})
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, head=self.head, unimodal="heads",
                                      unimodal_heads=dict(self.aux_heads.items()), **self._fill(missing, input_dims))
        else:
            self.configure_modalities({m: self.encoders[m] for m in input_dims}, head=self.head,
                                      **self._fill(missing, input_dims))
        if loss_terms:
            self.configure_loss_terms(loss_terms)

    def _fill(self, missing: str, input_dims: dict[str, int]) -> dict:
        """What stands in for an absent modality: zeros, or a learned embedding of the feature width."""
        if missing == "learned":
            return {"missing": "learned", "feature_dims": {m: self.hparams.feature_dim for m in input_dims}}
        return {"missing": missing}

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.hparams.get("mmtm"):  # the encoders' two layers, each followed by an MMTM across the branches
            names, present = list(self.modalities), batch.get("present")
            x = [batch[m] for m in names]
            for layer, mmtm in enumerate(self.mmtm_layers):
                x = [self.encoders[m][2 * layer + 1](self.encoders[m][2 * layer](z)) for m, z in zip(names, x)]
                x = list(mmtm(*x, present=present))
            return dict(zip(names, x))
        return {m: self.encoders[m](batch[m]) for m in self.modalities}

    def encode_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
        # the contract's optional hook (PMR's prototype pass, G-Blend's branches); the mask if the data has one
        return self.features(batch), batch["target"], batch.get("present")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.get("mla") or self.hparams.get("reconboost_stage"):
            return self.head.training_step(self, self.features(batch), batch["target"], present=batch.get("present"))
        inputs = {m: batch[m] for m in self.modalities}
        if "index" in batch:  # each sample's position in the training split (CRD's memory)
            inputs["index"] = batch["index"]
        features = self.features(batch)
        logits = self.fuse(features, batch["target"], inputs=inputs, present=batch.get("present"))
        if self.hparams.get("mmtm"):  # Greedy's objective: the sum of the branches' cross-entropies
            present = batch.get("present")
            loss = sum(F.cross_entropy(self.head.heads[m](z), batch["target"] if present is None or m not in present
                                       else batch["target"].masked_fill(~present[m], -100))
                       for m, z in features.items())
        else:
            loss = F.cross_entropy(logits, batch["target"])
        self.log("train_loss", loss, prog_bar=True)
        if getattr(self, "balance_losses", None) is not None and not getattr(self, "skip_loss_terms", False):
            loss = self.add_loss_terms(loss)
        if self.use_unimodal_losses:  # multimodal + unimodal objectives (weights: self.loss_weights)
            return self.add_unimodal_losses(loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.fuse(self.features(batch), batch["target"], present=batch.get("present"))
        self.log("val_acc", (logits.argmax(-1) == batch["target"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


AV_DIMS = {"audio": 40, "visual": 64}


DATASET_NAMES = ("av_digits", "synthetic", "underlearned")  # what make_data builds (the study scripts' --dataset)


def make_data(dataset: str, seed: int, **kwargs: Any) -> pl.LightningDataModule:
    """AV-Digits, or the synthetic setting with a weak but necessary modality: ``m0`` is easy (snr 4) but
    only tells 5 groups of 2 classes apart, ``m1`` is weak (snr 1) but sees all 10 classes."""
    if dataset == "av_digits":
        data = AVDigitsDataModule(seed=seed, **kwargs)
    else:  # "synthetic" is the preset "dominant"; any other preset by its name (e.g. "underlearned")
        preset = "dominant" if dataset == "synthetic" else dataset
        data = SyntheticCollapseDataModule(preset=preset, num_samples=3000, seed=seed, **kwargs)
    data.setup()
    return data


def modality_count(dataset: str) -> int:
    """The number of modalities of :func:`make_data`'s ``dataset``, without building its splits (run counts)."""
    if dataset == "av_digits":
        return len(AVDigitsDataModule(seed=0).feature_dims)
    preset = "dominant" if dataset == "synthetic" else dataset
    return len(SyntheticCollapseDataModule(preset=preset, num_samples=3000, seed=0).feature_dims)


def _feature_dims(input_dims: dict[str, int]) -> dict[str, int]:
    return {m: 128 for m in input_dims}  # AVDigitsNet's feature_dim


# How each benchmark method's joint model and data differ from the baseline's: method -> function of the
# dataset's input dims returning (model kwargs, datamodule kwargs). Shared by the benchmark runner and the
# validation search. Loss terms are factories, built only when a model is made (after the seed is set).
LFM_HORIZON = 40  # chosen on AV-Digits validation (docs/results.md)
MBSD_WEIGHT = 1.0  # chosen on AV-Digits validation (docs/results.md)
RECONBOOST_STAGE = 2  # chosen on AV-Digits validation (docs/results.md)
MLA_PROJECTION = False  # chosen on AV-Digits validation (0.941 off vs 0.940 on, docs/results.md); "mla_projected": on
SETUPS: dict[str, Callable[[dict[str, int]], tuple[dict, dict]]] = {
    "uni_losses": lambda dims: ({"aux_heads": True, "unimodal_losses": True}, {}),
    # InfoReg's published objective: the unimodal losses of the split head (no auxiliary heads); alone, as a control
    "inforeg": lambda dims: ({"unimodal_losses": True}, {}),
    "uni_losses_split": lambda dims: ({"unimodal_losses": True}, {}),
    "mmpareto": lambda dims: ({"aux_heads": True, "unimodal_losses": True}, {}),
    "gblend": lambda dims: ({"aux_heads": True, "unimodal_losses": True}, {"holdout_fraction": 0.1}),
    # parameters chosen on AV-Digits validation with examples/select_on_validation.py (docs/results.md)
    # CML: the official objective (ranking term summed over the batch, second term); λ = β/100 = 0.1 is also the
    # official value
    "cml": lambda dims: ({"loss_terms": lambda: [CMLLoss(rank_weight=0.1)]}, {}),
    "mmcosine": lambda dims: ({"cosine_scale": 5.0}, {}),
    "contrastive": lambda dims: ({"loss_terms": lambda: [ContrastiveLoss(feature_dims=_feature_dims(dims), weight=0.3)]},
                                 {}),
    "reconstruction": lambda dims: ({"loss_terms": lambda: [ReconstructionLoss(_feature_dims(dims), dict(dims),
                                                                               weight=0.03)]}, {}),
    # LFM (issue 14): the official fitted schedule, its 200 epochs stretched over `horizon` epochs (selected); the
    # learnable schedule with the official constants on the first 8 held-out training samples
    "lfm": lambda dims: ({"loss_terms": lambda: [LFMLoss(horizon=LFM_HORIZON)]}, {}),
    # AMCo: its objective adds the split head's unimodal losses (on the masked logits)
    "amco": lambda dims: ({"unimodal_losses": True}, {}),
    # MBSD (issue 14): its distillation and unimodal cross-entropies, weight selected
    "mbsd": lambda dims: ({"loss_terms": lambda: [MBSDLoss(weight=MBSD_WEIGHT)]}, {}),
    "lfm_learnable": lambda dims: ({"loss_terms": lambda: [LFMLoss(schedule="learnable")]}, {"holdout_fraction": 0.1}),
    # Diagnosing & Re-learning (issue 14): diagnoses on a held-out tenth of the training data
    "relearning": lambda dims: ({}, {"holdout_fraction": 0.1}),
    # modality valuation (issue 14): the training split served through a ValuationDataset
    "valuation": lambda dims: ({}, {"valuation": True}),
    "valuation_modality": lambda dims: ({}, {"valuation": True}),
    # MLA (issue 14): the shared head, alternating unimodal steps and the entropy fusion replace the concat head
    "mla": lambda dims: ({"mla": True, "mla_projection": MLA_PROJECTION}, {}),
    "mla_projected": lambda dims: ({"mla": True, "mla_projection": True}, {}),  # the paper's projection, for comparison
    # ReconBoost (issue 14): E1 = E2 epochs per stage (official 4 + 4), selected
    "reconboost": lambda dims: ({"reconboost_stage": RECONBOOST_STAGE}, {}),
# Greedy (issue 14): its intermediate fusion (MMTMs between the encoders' layers, a head per branch, the sum of
    # the branches' losses), trained plainly ("mmtm") and with the Greedy callback ("greedy")
    "mmtm": lambda dims: ({"mmtm": True}, {}),
    "greedy": lambda dims: ({"mmtm": True}, {}),
}


KD_EPOCHS_PER_TEACHER = 10  # with more than one teacher; not tuned
CRD_NEGATIVE_SHARE = 16384 / 50000  # the official K / N (CIFAR-100): the training sets here have 1-3 thousand samples
COLLAPSE_METHODS = ("kd_crd", "kd_infonce", "ebr")


def collapse_terms(part: str, data: pl.LightningDataModule, weakest_first: Sequence[str], **kwargs: Any) -> list:
    """The collapse paper's loss term of a method part (``kd_crd``, ``kd_infonce``, ``ebr``; ``[]`` otherwise): KD
    into the weakest modality (``weakest_first[0]``, e.g. by the validation accuracy of each modality alone) from
    the others, weakest first; EBR on every modality. ``kwargs`` go to the term (e.g. a selected ``weight``)."""
    dims = {m: 128 for m in data.feature_dims}  # AVDigitsNet's feature_dim
    if part == "ebr":
        return [ExplicitBasisReallocation(dims, **kwargs)]
    if part not in ("kd_crd", "kd_infonce"):
        return []
    ranked = list(weakest_first)
    extra: dict = {}
    if part == "kd_crd":
        n_train = len(data.datasets["train"])
        extra = {"num_samples": n_train, "nce_k": max(1, round(CRD_NEGATIVE_SHARE * n_train)),
                 "labels": data.splits["train"]["target"]}
    return [CrossModalDistillation(ranked[0], ranked[1:], dims, method="crd" if part == "kd_crd" else "infonce",
                                   epochs_per_teacher=KD_EPOCHS_PER_TEACHER if len(ranked) > 2 else None, **extra, **kwargs)]


def setup_for(method: str, input_dims: Optional[dict[str, int]] = None, **overrides) -> tuple[dict, dict]:
    """(model kwargs, datamodule kwargs) of a benchmark method on data with ``input_dims`` (AV-Digits by
    default). A stacked method ``"a+b"`` merges its parts: loss terms are concatenated, flags combined,
    data arguments merged. ``overrides`` replace model kwargs; callable values are factories, called last."""
    dims = dict(input_dims or AV_DIMS)
    model: dict = {}
    data: dict = {}
    for part in method.split("+"):
        if part not in SETUPS:
            continue
        part_model, part_data = SETUPS[part](dims)
        for key, value in part_model.items():
            if key == "loss_terms":
                model[key] = [*model.get(key, []), value]
            elif key in model and model[key] != value:
                raise ValueError(f"{method}: its parts set {key} to {model[key]!r} and {value!r}; they cannot stack.")
            else:
                model[key] = value
        data.update(part_data)
    model.update(overrides)
    if "loss_terms" in model and isinstance(model["loss_terms"], list):
        model["loss_terms"] = [term for factory in model["loss_terms"] for term in factory()]
    return {k: (v() if callable(v) else v) for k, v in model.items()}, data


class UnimodalNet(pl.LightningModule):
    """One modality alone: the same encoder and a linear head (the "modality alone" reference)."""

    def __init__(self, modality: str, input_dim: int, hidden: int = 256, feature_dim: int = 128,
                 num_classes: int = 10, lr: float = 0.02, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.modality = modality
        self.encoder = mlp(input_dim, hidden, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(batch[self.modality]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["target"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_acc", (self(batch).argmax(-1) == batch["target"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


_RUNS: Optional[RunProgress] = None  # the job's RunProgress while training_runs() is open: every fit() reports to it


@contextmanager
def training_runs(total: int, enabled: bool = True) -> Iterator[RunProgress]:
    """A script's training: Lightning's per-fit noise silenced (:func:`lightning_balance.progress.quiet`) and one
    :class:`~lightning_balance.progress.RunProgress` of ``total`` fits on stderr, to which every :func:`fit` inside
    reports (a line per finished fit: fits done of total, its best validation accuracy, elapsed, time left; a
    summary at the end). ``enabled=False`` (``--no-progress``): no such lines."""
    global _RUNS
    previous = _RUNS
    with quiet(), RunProgress(total, enabled=enabled) as runs:
        _RUNS = runs
        try:
            yield runs
        finally:
            _RUNS = previous


def fit(model: pl.LightningModule, data: pl.LightningDataModule, callbacks: Sequence[pl.Callback], epochs: int,
        root: str, progress: bool = False, label: Optional[str] = None) -> tuple[pl.LightningModule, float]:
    """Train, then restore the weights of the epoch with the best validation accuracy.

    Returns the model and its best validation accuracy (selection never looks at test data). ``progress``:
    Lightning's progress bar inside the fit. Inside :func:`training_runs` the fit is one run of the job's
    progress display, named ``label`` (default: the last part of ``root``).
    """
    runs = _RUNS
    if runs is not None:
        runs.start(label or os.path.basename(os.path.normpath(root)))
    checkpoint = ModelCheckpoint(dirpath=root, monitor="val_acc", mode="max", save_top_k=1, filename="best")
    # modality valuation grows the training set between epochs: its loader is rebuilt every epoch
    reload = 1 if any(isinstance(c, SampleValuation) for c in callbacks) else 0
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
        callbacks=[*callbacks, checkpoint], enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=True, reload_dataloaders_every_n_epochs=reload,
    )
    trainer.fit(model, datamodule=data)
    state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    best = float(checkpoint.best_model_score)
    if runs is not None:
        runs.done(result_text=f"best val acc {best:.3f}")
    return model.eval(), best


def _acc_f1(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[float, float]:
    return (float(multiclass_accuracy(logits, targets, num_classes, average="micro")),
            float(multiclass_f1_score(logits, targets, num_classes, average="macro")))


@torch.no_grad()
def evaluate_joint(model: AVDigitsNet, data: AVDigitsDataModule) -> dict[str, float]:
    """Fused, per-modality (split head), linear-probe and missing-modality test accuracy."""
    model.eval()
    test, train = data.splits["test"], data.splits["train"]
    c = model.hparams.num_classes
    encoded = model.features(test)  # the encoders' outputs: what the probes read
    feats, _ = model.fusion_inputs(encoded)  # what the fusion sees (EBR's decoded features)
    out: dict[str, float] = {}
    out["acc"], out["f1"] = _acc_f1(model.fuse_features(feats), test["target"], c)
    uni = model.compute_unimodal_logits(feats)
    train_feats = model.features(train)
    for m in model.modalities:
        out[f"acc_{m}"] = _acc_f1(uni[m], test["target"], c)[0]
        out[f"probe_{m}"] = linear_probe_accuracy(train_feats[m], train["target"], encoded[m], test["target"], c)
        if model.hparams.get("mmtm"):  # absent in the MMTMs too (its average squeeze), not only at the fusion
            n = test["target"].shape[0]
            lacking = {k: torch.full((n,), k != m, dtype=torch.bool) for k in model.modalities}
            without = model.features({**test, "present": lacking})
            out[f"acc_without_{m}"] = _acc_f1(model.fuse_without(without, m), test["target"], c)[0]
            continue
        out[f"acc_without_{m}"] = _acc_f1(model.fuse_without(feats, m), test["target"], c)[0]
    return out


@torch.no_grad()
def unimodal_logits(model: UnimodalNet, split: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(split)


@torch.no_grad()
def evaluate_unimodal(model: UnimodalNet, data: AVDigitsDataModule, split: str = "test") -> dict[str, float]:
    """Accuracy, F1 and the encoder's linear probe (fitted on train) on ``split``."""
    test, train = data.splits[split], data.splits["train"]
    c = model.hparams.num_classes
    acc, f1 = _acc_f1(unimodal_logits(model, test), test["target"], c)
    probe = linear_probe_accuracy(model.encoder(train[model.modality]), train["target"],
                                  model.encoder(test[model.modality]), test["target"], c)
    return {"acc": acc, "f1": f1, f"acc_{model.modality}": acc, f"probe_{model.modality}": probe}


def evaluate_ensemble(models: Sequence[UnimodalNet], data: AVDigitsDataModule) -> dict[str, float]:
    """Product of the separately trained unimodal models' probabilities (UME-style ensemble)."""
    test = data.splits["test"]
    log_p = sum(torch.log_softmax(unimodal_logits(m, test), -1) for m in models)
    acc, f1 = _acc_f1(log_p, test["target"], models[0].hparams.num_classes)
    return {"acc": acc, "f1": f1}


@torch.no_grad()
def evaluate_ume(ensemble: torch.nn.Module, data: AVDigitsDataModule) -> dict[str, float]:
    """UME on test, and on validation for the paper's choice rule (UME if its validation accuracy is at
    least the joint baseline's)."""
    out = {}
    for split, prefix in (("test", ""), ("val", "val_")):
        x = data.splits[split]
        log_p = ensemble.eval()({m: x[m] for m in ensemble.models})
        acc, f1 = _acc_f1(log_p, x["target"], log_p.shape[-1])
        out[f"{prefix}acc"] = acc
        if not prefix:
            out["f1"] = f1
    return out


def _summarise(values: Sequence[float], digits: int, spread) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return spread(values)


def mean_std(values: Sequence[float]) -> str:
    """Mean ± standard deviation over seeds."""
    return _summarise(values, 3, lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}")


def median_range(values: Sequence[float]) -> str:
    """Median (min–max) over seeds: cost ratios are timings on a shared machine, where one disturbed run
    should not move the summary."""
    return _summarise(values, 2, lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})")


def add_run_arguments(parser: argparse.ArgumentParser, selection_default: str = "none") -> None:
    """The arguments every study script takes: ``--seeds``, ``--epochs``, ``--out``, ``--progress`` /
    ``--no-progress`` (:func:`add_progress_arguments`) and ``--selection`` (a ``select_collapse_<dataset>.json`` file
    of ``collapse_study.py --stage select``, or the folder that holds them; ``selection_default`` says in the help
    what the script does without it)."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="results", help="folder for the JSON, markdown and PNG files")
    add_progress_arguments(parser)
    parser.add_argument("--selection", default=None,
                        help="the parameters chosen on validation: a select_collapse_<dataset>.json file of "
                             f"examples/collapse_study.py --stage select, or its folder (default: {selection_default})")


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """``--progress`` (Lightning's progress bar inside each fit; off by default) and ``--no-progress`` (no progress
    output at all: neither the bar nor the job's line per finished fit)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", action="store_true", help="show Lightning's progress bar inside each fit")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress output (neither the line per finished fit nor Lightning's bar)")


def chosen_parameters(selection: str, dataset: str) -> dict[str, float]:
    """The parameters chosen on validation for ``dataset`` (``selection``: a file or a folder, see
    :func:`add_run_arguments`). A clear error if that dataset was not selected."""
    path = os.path.join(selection, f"select_collapse_{dataset}.json") if os.path.isdir(selection) else selection
    with open(path) as f:
        saved = json.load(f)
    if dataset not in saved:
        raise SystemExit(f"{path} holds the selection for {sorted(k for k in saved if k in DATASET_NAMES)}, "
                         f"not {dataset!r}: run examples/collapse_study.py --stage select --datasets {dataset}.")
    return saved[dataset]["chosen"]
