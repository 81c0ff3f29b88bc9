"""Gradient-Blending in whole runs: DDP equals one process (every rank trains the branches), gradient
accumulation, mid-epoch resume with a resumable loader, the random streams of the training run, and
samples without a label (ignore_index)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_balance import GradientBlending
from tests.helpers import DictDataset, SaveParams, TinyAV, flat_params, trainer_kwargs
from tests.test_gblend_recipe import Configured, Data


def _same_history(got, want, rel=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g == pytest.approx(w, rel=rel, abs=1e-7)


# ---------------------------------------------------------------------------- DDP
@pytest.mark.timeout(300)
def test_ddp_equals_one_process_and_ranks_agree(tmp_path):
    """2 ranks × batch 8 (interleaved, so the union of the ranks' k-th batches is the single process's
    k-th batch of 16): the same estimates (every rank trains the branch copies on its shard, gradients
    added across ranks) and the same parameters, identical on both ranks."""
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    cb = GradientBlending(every_n_epochs=2, estimate_epochs=2)
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[cb, SaveParams(str(ddp_dir))], max_epochs=3, devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False)).fit(Configured("sgd"),
                                                                                         datamodule=Data(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]), "replicas diverged"
    assert rank0["states"]["GradientBlending"] == rank1["states"]["GradientBlending"]

    single_cb = GradientBlending(every_n_epochs=2, estimate_epochs=2)
    single = Configured("sgd")
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[single_cb], max_epochs=3)).fit(single, datamodule=Data(batch_size=16))
    assert [h["epoch"] for h in single_cb.history] == [0, 2]
    _same_history(rank0["states"]["GradientBlending"]["history"], single_cb.history, rel=1e-4)
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_accumulation_equals_the_full_batch(tmp_path):
    """Branch steps follow the Trainer's accumulate_grad_batches: 2 × 8 accumulated is one step of 16."""
    runs = []
    for batch_size, accumulate in ((16, 1), (8, 2)):
        cb = GradientBlending(every_n_epochs=2, estimate_epochs=2)
        model = Configured("sgd")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3, accumulate_grad_batches=accumulate)).fit(
            model, datamodule=Data(batch_size=batch_size))
        runs.append((cb.history, flat_params(model)))
    _same_history(runs[1][0], runs[0][0], rel=1e-4)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- mid-epoch resume
class ResumableSampler(Sampler):
    """In order; ``taken`` samples of the current pass (0 once a pass is complete); a pass after
    ``skip = taken`` starts where the saved one stood."""

    def __init__(self, n: int) -> None:
        self.n, self.taken, self.skip = n, 0, 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i in range(skip, self.n):
            self.taken = (i + 1) % self.n
            yield i

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """Lightning saves the state of a loader that has state_dict/load_state_dict in the checkpoint."""

    def state_dict(self):
        return {"taken": self.sampler.taken}

    def load_state_dict(self, state):
        self.sampler.skip = state["taken"]


class RestartingLoader(ResumableLoader):
    """Restarts the epoch from its first batch on resume, like a plain DataLoader."""

    def load_state_dict(self, state):
        pass


class ResumeData(pl.LightningDataModule):
    def __init__(self, resumable: bool = True) -> None:
        super().__init__()
        self.resumable = resumable

    def train_dataloader(self):
        cls = ResumableLoader if self.resumable else RestartingLoader
        return cls(DictDataset(n=64, seed=0), batch_size=16, sampler=ResumableSampler(64))

    def holdout_dataloader(self):
        return DataLoader(DictDataset(n=64, seed=1), batch_size=32)


@pytest.mark.parametrize("step", [10, 8], ids=["inside_an_estimate_epoch", "last_batch_of_an_epoch"])
def test_mid_epoch_resume(tmp_path, step):
    """4 batches an epoch, estimates at epochs 0, 2, 4. A checkpoint at step 10 is inside epoch 2, after its
    estimate (Lightning skips on_train_epoch_start when it resumes there); at step 8 it is the last batch
    of epoch 1, and epoch 2's estimate must still run. A fresh callback resumed from it ends with the
    parameters and the state of the uninterrupted run; a loader that restarts the epoch does not."""
    def callback():
        return GradientBlending(every_n_epochs=2, estimate_epochs=1)

    straight_cb = callback()
    straight = Configured("sgd")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[straight_cb, ckpt], max_epochs=5,
                                enable_checkpointing=True)).fit(straight, datamodule=ResumeData())
    assert [h["epoch"] for h in straight_cb.history] == [0, 2, 4]
    path = next((tmp_path / "ckpt").glob(f"*step={step}.ckpt"))

    finals = {}
    for resumable in (True, False):
        resumed_cb = callback()
        resumed = Configured("sgd", seed=123)
        pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed_cb], max_epochs=5)).fit(
            resumed, datamodule=ResumeData(resumable), ckpt_path=str(path))
        finals[resumable] = flat_params(resumed)
        if resumable:
            assert [h["epoch"] for h in resumed_cb.history] == [0, 2, 4]
            _same_history(resumed_cb.history, straight_cb.history, rel=1e-6)
            assert resumed_cb.weights == pytest.approx(straight_cb.weights, rel=1e-6)
            assert resumed.loss_weights == pytest.approx(straight.loss_weights, rel=1e-6)
    torch.testing.assert_close(finals[True], flat_params(straight), rtol=1e-6, atol=1e-7)
    if step == 10:  # the comparison is real: restarting epoch 2 from its first batch ends elsewhere
        assert (finals[False] - flat_params(straight)).abs().max() > 1e-4


# ---------------------------------------------------------------------------- random streams
class Recorded(Dataset):
    """DictDataset that records the order in which its samples are read."""

    def __init__(self, n: int, seed: int) -> None:
        self.data = DictDataset(n=n, seed=seed)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.data[i]


class ShuffledData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train = Recorded(32, 0)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16, shuffle=True)

    def holdout_dataloader(self):
        return DataLoader(DictDataset(n=64, seed=1), batch_size=32)


class WithDropout(TinyAV):
    """Dropout in both encoders: branch training draws masks from the random stream."""

    def __init__(self) -> None:
        super().__init__(aux_losses=True)
        self.audio_encoder.insert(1, nn.Dropout(0.3))
        self.visual_encoder.insert(1, nn.Dropout(0.3))


class Marks(pl.Callback):
    """Where in the dataset's read log each on_train_epoch_start ran, and torch's CPU stream at the end."""

    def __init__(self, data: ShuffledData) -> None:
        self.data, self.marks, self.rng = data, [], None

    def on_train_epoch_start(self, trainer, pl_module):
        self.marks.append(len(self.data.train.reads))

    def on_train_end(self, trainer, pl_module):
        self.rng = torch.get_rng_state()


def test_the_estimate_leaves_the_random_streams_alone(tmp_path):
    """With dropout in the branches and a shuffling loader: the training run reads the same sample order
    and ends with the same CPU stream as a run without the estimate; inside the estimate, successive branch
    epochs draw fresh shuffles. (Only the CPU stream can be checked here; the CUDA stream of the training
    device is forked the same way, see the next test.)"""
    logs = {}
    for estimate in (False, True):
        torch.manual_seed(7)
        data = ShuffledData()
        before, after = Marks(data), Marks(data)
        cb = GradientBlending(every_n_epochs=1, estimate_epochs=2)
        callbacks = [before, cb, after] if estimate else [before, after]
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(WithDropout(), datamodule=data)
        reads = data.train.reads
        segments = list(zip(before.marks, after.marks))  # what the estimates read
        training = [i for k, i in enumerate(reads) if not any(a <= k < b for a, b in segments)]
        logs[estimate] = (training, after.rng, [reads[a:b] for a, b in segments])
        if estimate:
            assert [h["epoch"] for h in cb.history] == [0, 1]
    assert logs[True][0] == logs[False][0]  # the training run's shuffles
    assert torch.equal(logs[True][1], logs[False][1])  # and its CPU stream (dropout masks)
    # epoch 0's estimate: per head, L^T, two training epochs, L^T: 4 passes of 32 samples
    passes = [logs[True][2][0][32 * k:32 * (k + 1)] for k in range(12)]
    assert all(sorted(p) == list(range(32)) for p in passes)
    assert passes[1] != passes[2] and passes[5] != passes[6]  # fresh shuffles, epoch after epoch


def test_the_cuda_stream_of_the_training_device_is_forked(monkeypatch):
    """No GPU here: check the fork is asked for the training device's CUDA stream (and only the CPU one
    on CPU)."""
    calls = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kw: calls.append(kw))
    from lightning_balance.callbacks.base import forked_rng

    forked_rng(torch.device("cuda", 1))
    forked_rng(torch.device("cpu"))
    assert calls == [{"devices": [1], "device_type": "cuda"}, {"devices": []}]


# ---------------------------------------------------------------------------- ignore_index
class Unlabelled(TinyAV):
    """Declares ignore_index=-1 (not torch's default) and leaves those samples out of its own loss."""

    def __init__(self) -> None:
        super().__init__(aux_losses=True)
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, head=self.head,
                                  ignore_index=-1)

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"])
        return self.add_unimodal_losses(F.cross_entropy(logits, batch["target"], ignore_index=-1))


class Padded(Dataset):
    """Every block of ``block`` labelled samples followed by ``pad`` unlabelled ones (target -1, noise
    inputs): read in order with batch ``block + pad``, batch k has exactly the labelled samples of batch k
    of the plain data with batch ``block``."""

    def __init__(self, data: DictDataset, block: int, pad: int) -> None:
        self.data, self.block, self.pad = data, block, pad
        g = torch.Generator().manual_seed(5)
        n = len(data) // block * pad
        self.noise = {"audio": torch.randn(n, 6, generator=g) * 5, "visual": torch.randn(n, 5, generator=g) * 5}

    def __len__(self) -> int:
        return len(self.data) // self.block * (self.block + self.pad)

    def __getitem__(self, i):
        k, r = divmod(i, self.block + self.pad)
        if r < self.block:
            return self.data[k * self.block + r]
        j = k * self.pad + r - self.block
        return {"audio": self.noise["audio"][j], "visual": self.noise["visual"][j], "target": torch.tensor(-1)}


class PaddedData(pl.LightningDataModule):
    def __init__(self, pad: bool) -> None:
        super().__init__()
        self.pad = pad

    def train_dataloader(self):
        data = DictDataset(n=32, seed=0)
        return DataLoader(Padded(data, 16, 8), batch_size=24) if self.pad else DataLoader(data, batch_size=16)

    def holdout_dataloader(self):
        data = DictDataset(n=64, seed=1)
        return DataLoader(Padded(data, 32, 16), batch_size=48) if self.pad else DataLoader(data, batch_size=32)


def test_unlabelled_samples_are_left_out(tmp_path):
    """Samples whose target is the module's ignore_index change nothing: the estimate (branch training,
    L^T, L^V) and the run equal those on the data without them."""
    runs = []
    for pad in (False, True):
        cb = GradientBlending(every_n_epochs=2, estimate_epochs=2)
        model = Unlabelled()
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(model, datamodule=PaddedData(pad))
        runs.append((cb.history, flat_params(model)))
    assert len(runs[0][0]) == 2
    _same_history(runs[1][0], runs[0][0], rel=1e-4)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
