"""Tiny multimodal models and data shared by the tests (picklable for ddp_spawn)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_balance import MultimodalMixin
from lightning_balance.data import ResumableDataLoader


class DictDataset(Dataset):
    def __init__(self, n: int = 64, dims: tuple[int, int] = (6, 5), classes: int = 4, seed: int = 0,
                 missing: Optional[tuple[float, float]] = None) -> None:
        means = torch.Generator().manual_seed(1234)  # class means shared by every split
        means_a = torch.randn(classes, dims[0], generator=means) * 2.0
        means_v = torch.randn(classes, dims[1], generator=means) * 0.5
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.a = means_a[self.y] + torch.randn(n, dims[0], generator=g)
        self.v = means_v[self.y] + torch.randn(n, dims[1], generator=g)
        self.present = None
        if missing is not None:  # each modality absent at its rate, never both; absent inputs hold garbage
            drop = torch.rand(n, 2, generator=g) < torch.tensor(missing)
            both = drop.all(1)
            drop[both, torch.randint(0, 2, (n,), generator=g)[both]] = False
            self.present = ~drop
            self.a[drop[:, 0]] = 100.0 * torch.randn(int(drop[:, 0].sum()), dims[0], generator=g)
            self.v[drop[:, 1]] = 100.0 * torch.randn(int(drop[:, 1].sum()), dims[1], generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"audio": self.a[i], "visual": self.v[i], "target": self.y[i]}
        if self.present is not None:
            item["present"] = {"audio": self.present[i, 0], "visual": self.present[i, 1]}
        return item


class GatedFusion(nn.Module):
    """A non-concat fusion: sigmoid gate mixing the two (projected) features, then a classifier."""

    def __init__(self, d: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, za: torch.Tensor, zv: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([za, zv], dim=-1)))
        return self.out(g * za + (1 - g) * zv)


class TinyAV(MultimodalMixin, pl.LightningModule):
    """Two MLP encoders; concat + linear head (default) or a gated fusion."""

    def __init__(self, fusion: str = "concat", lr: float = 0.1, momentum: float = 0.9, classes: int = 4,
                 unimodal: str = "auto", manual: bool = False, dims: tuple[int, int] = (6, 5), seed: int = 0,
                 aux_losses: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio_encoder = nn.Sequential(nn.Linear(dims[0], 8), nn.Tanh(), nn.Linear(8, 8))
        self.visual_encoder = nn.Sequential(nn.Linear(dims[1], 8), nn.Tanh(), nn.Linear(8, 8))
        self.lr, self.momentum = lr, momentum
        self.aux_losses = aux_losses  # train with the unimodal auxiliary objectives (add_unimodal_losses)
        self.automatic_optimization = not manual
        if fusion == "concat":
            self.head = nn.Linear(16, classes)
            self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder},
                                      head=self.head, unimodal=unimodal)
        elif fusion == "gated":
            self.fusion = GatedFusion(8, classes)
            kwargs: dict[str, Any] = {}
            if unimodal == "heads":
                self.aux = nn.ModuleDict({"audio": nn.Linear(8, classes), "visual": nn.Linear(8, classes)})
                kwargs["unimodal_heads"] = {"audio": self.aux["audio"], "visual": self.aux["visual"]}
            self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder},
                                      fusion=self.fusion, unimodal=unimodal, **kwargs)
        else:
            raise ValueError(fusion)
        self.seen_batches = 0

    def forward_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"audio": self.audio_encoder(batch["audio"]), "visual": self.visual_encoder(batch["visual"])}

    def encode_batch(self, batch: dict[str, torch.Tensor]):
        return self.forward_features(batch), batch["target"], batch.get("present")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
        loss = F.cross_entropy(logits, batch["target"])
        if self.aux_losses:
            loss = self.add_unimodal_losses(loss)
        elif self.modality_spec.unimodal == "heads":
            loss = loss + self.unimodal_loss()
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
        self.log("val_loss", F.cross_entropy(logits, batch["target"]))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class InterleavedSampler(torch.utils.data.Sampler):
    """Rank r of W reads samples r, r+W, r+2W, ...: the union of the ranks' k-th batches of size B/W
    is exactly the k-th batch of size B of a single process reading in order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def loader(n: int = 64, batch_size: int = 16, seed: int = 0, missing: Optional[tuple[float, float]] = None) -> DataLoader:
    """In-order batches; under DDP (with ``use_distributed_sampler=False``) interleaved across ranks. With
    ``missing``: each modality absent at that rate (the batch's ``"present"``)."""
    return DataLoader(DictDataset(n=n, seed=seed, missing=missing), batch_size=batch_size, sampler=InterleavedSampler(n))


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        deterministic=True, num_sanity_val_steps=0,
    )
    kw.update(overrides)
    return kw


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class SaveParams(pl.Callback):
    """Writes each rank's final parameters and the state of the callbacks under test to ``dir``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if cb is not self}
        torch.save({"params": flat_params(pl_module), "states": states},
                   f"{self.directory}/rank{trainer.global_rank}.pt")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Shut the process group down on both ranks together: left to the exit handlers, gloo's threads
        # are sometimes destroyed while the peer is still connected ("terminate called without an active
        # exception", SIGABRT in the spawned worker).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class MultiMLP(MultimodalMixin, pl.LightningModule):
    """M modalities, one small MLP encoder each, concat head; batches are dicts with a "target" key."""

    def __init__(self, input_dims: dict[str, int], classes: int = 10, lr: float = 0.05, aux_losses: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, 16), nn.ReLU()) for m, d in input_dims.items()})
        self.head = nn.Linear(16 * len(input_dims), classes)
        self.lr = lr
        self.aux_losses = aux_losses
        self.configure_modalities({m: self.encoders[m] for m in input_dims}, head=self.head)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.fuse({m: self.encoders[m](batch[m]) for m in self.modalities}, batch["target"])
        loss = F.cross_entropy(logits, batch["target"])
        return self.add_unimodal_losses(loss) if self.aux_losses else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class FirstGradients(pl.Callback):
    """Keeps a copy of every parameter's gradient at the first optimizer step (after the callbacks
    listed before it have edited them)."""

    def __init__(self) -> None:
        self.grads: Optional[list[torch.Tensor]] = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.grads is None:
            self.grads = [p.grad.clone() for p in pl_module.parameters()]


# a DataLoader Lightning resumes inside an epoch (the library's; itself tested against the uninterrupted fit in
# tests/test_balanced_sampler.py)
ResumableLoader = ResumableDataLoader


def resumable_loader(n: int = 64, batch_size: int = 16, seed: int = 0,
                     missing: Optional[tuple[float, float]] = None) -> ResumableLoader:
    """:func:`loader`, resumable inside an epoch."""
    return ResumableLoader(DictDataset(n=n, seed=seed, missing=missing), batch_size=batch_size,
                           sampler=InterleavedSampler(n))


def states_equal(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Two callback states (nested dicts/lists of tensors, floats, ints) equal up to float tolerance."""
    import pytest

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=rtol, abs=max(atol, 1e-9))
    return a == b


def resume_inside_an_epoch(tmp_path: Any, make_callbacks: Any, make_model: Any, make_loader: Any, step: int,
                           epochs: int = 3) -> tuple[Any, list, Any, list]:
    """An uninterrupted fit, and a fit resumed from the checkpoint taken at optimizer step ``step`` (inside an
    epoch) into a model with other initial weights: ``(straight, its callbacks, resumed, its callbacks)``."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    straight, straight_cbs = make_model(), make_callbacks()
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=straight_cbs, max_epochs=epochs)).fit(straight, make_loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[*make_callbacks(), ckpt], max_epochs=epochs,
                                enable_checkpointing=True)).fit(make_model(), make_loader())
    resumed, resumed_cbs = make_model(seed=123), make_callbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path / "c", callbacks=resumed_cbs, max_epochs=epochs)).fit(
            resumed, make_loader(), ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
    return straight, straight_cbs, resumed, resumed_cbs


class SkipFirst(TinyAV):
    """TinyAV with the unimodal losses that returns None from its first ``skip`` training steps: Lightning then
    takes no backward and no optimizer step and the scaler does not update, which is the fp16 overflow run with
    those steps removed (the reference of the forced-overflow tests)."""

    def __init__(self, skip: int, **kw: Any) -> None:
        super().__init__(aux_losses=True, **kw)
        self.skip = skip

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        return None if self.trainer.global_step < self.skip else super().training_step(batch, batch_idx)


def fp16_plugin(init_scale: float) -> Any:
    """16-mixed precision on CPU with a GradScaler starting at ``init_scale`` and backing off by 2^-8 (2^40
    overflows the first three steps of TinyAV: 2^40 -> 2^32 -> 2^24 -> 2^16)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale,
                                                                          backoff_factor=2.0**-8))


class OverflowAt(pl.Callback):
    """Forces an fp16 overflow at ``(epoch, batch_idx)``: the GradScaler's scale jumps to 2^60 before that batch.
    ``snapshot(pl_module)`` is taken just before and just after it (``before``, ``after``), with the scale after."""

    def __init__(self, snapshot: Any, epoch: int = 1, batch_idx: int = 1) -> None:
        self.snapshot, self.epoch, self.batch_idx = snapshot, epoch, batch_idx
        self.before: Any = None
        self.after: Any = None
        self.scale_after: Optional[float] = None

    def _here(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return trainer.current_epoch == self.epoch and batch_idx == self.batch_idx

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._here(trainer, batch_idx):
            trainer.precision_plugin.scaler.update(new_scale=2.0 ** 60)
            self.before = self.snapshot(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._here(trainer, batch_idx):
            self.after = self.snapshot(pl_module)
            self.scale_after = trainer.precision_plugin.scaler.get_scale()
