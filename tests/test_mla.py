"""MLA: the functional core against the formulas written out, the alternating training step against the official
loop restated (main.py with the paper's projection), without projection (the released code), DDP, resume inside an
epoch, forced fp16 overflow, absence, M = 3 with token features and AdamW, bad input."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_balance import MLAFusion, MultimodalMixin
from lightning_balance._errors import ModalityContractError
from lightning_balance.functional.mla import (
    mla_alpha,
    mla_entropy_weights,
    mla_fuse_logits,
    mla_project_gradient,
    mla_update_projector,
)
from tests.helpers import (

    SaveParams,
    flat_params,
    fp16_plugin,
    loader,
    resumable_loader,
    trainer_kwargs,
)

# ---------------------------------------------------------------------------------------------- functional core


def test_alpha_and_projector_step_written_out():
    assert mla_alpha(0, 10) == pytest.approx(0.1)
    assert mla_alpha(5, 10) == pytest.approx(0.1 ** 1.5)
    g = torch.Generator().manual_seed(0)
    p = torch.eye(4, dtype=torch.float64)
    h = torch.randn(4, generator=g, dtype=torch.float64)
    new = mla_update_projector(p, h, 0.1)
    q = p @ h
    expected = p - torch.outer(q, q) / (0.1 + h @ q)  # OWM: a scalar denominator
    torch.testing.assert_close(new, expected / expected.norm())
    grad = torch.randn(3, 4, generator=g)
    torch.testing.assert_close(mla_project_gradient(grad, new), (grad.double() @ new.T).float())


def test_entropy_weights_are_the_papers_per_sample():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.1, 0.0, 0.0]],   # modality 0: confident, then unsure
                           [[0.0, 0.5, 0.0], [0.0, 3.0, 0.0]]])  # modality 1
    lam = mla_entropy_weights(logits)
    for n in range(2):
        e = [float(-(F.softmax(logits[m, n], -1) * F.log_softmax(logits[m, n], -1)).sum()) for m in range(2)]
        top = max(e)
        w = [math.exp(top - e[m]) for m in range(2)]
        assert lam[n].tolist() == pytest.approx([w[0] / sum(w), w[1] / sum(w)], rel=1e-5)
    assert lam[0, 0] > 0.5 > lam[1, 0]  # the confident modality leads, sample by sample
    lam = mla_entropy_weights(logits, present=torch.tensor([[True, False], [False, False]]))
    assert lam.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    torch.testing.assert_close(mla_fuse_logits(logits, lam)[0], logits[0, 0])


# ---------------------------------------------------------------------------------------------- the model


class MLANet(MultimodalMixin, pl.LightningModule):
    def __init__(self, seed: int = 0, projection: bool = True, lr: float = 0.1, weights="entropy") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.audio_encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.visual_encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.fusion = MLAFusion(nn.Linear(8, 4), projection=projection, weights=weights)
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)
        self.automatic_optimization = False
        self.lr = lr

    def features(self, batch):
        return {"audio": self.audio_encoder(batch["audio"]), "visual": self.visual_encoder(batch["visual"])}

    def training_step(self, batch, batch_idx):
        return self.fusion.training_step(self, self.features(batch), batch["target"], present=batch.get("present"))

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self.fuse(self.features(batch), batch["target"], present=batch.get("present"))
                             .argmax(-1) == batch["target"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def official_loop(model, epochs, projection=True, missing=None, batch_size=16):
    """main.py (gs_flag) restated: features of both modalities once per batch; for audio then visual: the shared
    head's cross-entropy, backward, the head weight's gradient projected (utils.py GSPlugin with the paper's OWM
    denominator; not for the very first update), step, zero grad."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=0.9, weight_decay=1e-4)
    head = model.fusion.head
    P = torch.eye(8, dtype=torch.float64)
    count = 0
    data = list(loader(64, batch_size, missing=missing))
    for _ in range(epochs):
        for step, batch in enumerate(data):
            a, v = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            for i, z in enumerate((a, v)):
                y = batch["target"]
                if missing is not None:
                    keep = batch["present"]["audio" if i == 0 else "visual"]
                    loss = F.cross_entropy(head(z)[keep], y[keep])
                    r = z[keep].mean(0, keepdim=True)
                else:
                    loss = F.cross_entropy(head(z), y)
                    r = z.mean(0, keepdim=True)
                loss.backward()
                if projection and count != 0:
                    alpha = 1.0 * 0.1 ** (step / len(data) + 1)
                    k = P @ r.double().T
                    P = P - (k @ k.T) / (alpha + r.double() @ k)
                    P = P / torch.norm(P, p="fro")
                    head.weight.grad = (head.weight.grad.double() @ P.T).float()
                opt.step()
                opt.zero_grad()
                count += 1
    return P, count


@pytest.mark.parametrize("projection", [True, False])
def test_matches_the_official_loop(tmp_path, projection):
    model = MLANet(projection=projection)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3)).fit(model, loader())
    reference = MLANet(projection=projection)
    P, count = official_loop(reference, epochs=3, projection=projection)
    assert model.fusion.updates == count == 3 * 4 * 2
    if projection:
        torch.testing.assert_close(model.fusion.projector, P, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(P, torch.eye(8, dtype=torch.float64) / math.sqrt(8))
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_absent_samples_leave_their_modalitys_step(tmp_path):
    model = MLANet()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader(missing=(0.3, 0.2)))
    reference = MLANet()
    official_loop(reference, epochs=2, missing=(0.3, 0.2))
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_ddp_equals_one_process_and_ranks_agree(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParams(str(ddp_dir))], max_epochs=2, devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False)).fit(MLANet(), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = MLANet()
    pl.Trainer(**trainer_kwargs(tmp_path / "one", max_epochs=2)).fit(single, loader())
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
def test_resume_inside_an_epoch(tmp_path):
    """Two optimizer steps per batch (global_step counts both): step 10 is batch 5, inside epoch 1."""
    straight = MLANet()
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=3)).fit(straight, resumable_loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[ckpt], max_epochs=3, enable_checkpointing=True)).fit(
        MLANet(), resumable_loader())
    resumed = MLANet(seed=123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=3)).fit(
            resumed, resumable_loader(), ckpt_path=str(tmp_path / "ckpt" / "step=10.ckpt"))
    assert resumed.fusion.updates == straight.fusion.updates == 24
    torch.testing.assert_close(resumed.fusion.projector, straight.fusion.projector)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)


def test_forced_fp16_overflow_skips_steps_and_their_projector_updates(tmp_path):
    """A GradScaler starting at 2^40 overflows the first steps: they change neither the parameters nor P nor the
    update count; the run equals the official loop without those steps."""
    scales = []

    class Scales(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scales.append(trainer.precision_plugin.scaler.get_scale())

    model = MLANet()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, plugins=[fp16_plugin(2.0 ** 40)], callbacks=[Scales()])).fit(
        model, loader())
    assert scales[0] < 2.0 ** 40, "nothing overflowed"
    skipped = round(math.log2(2.0 ** 40 / scales[-1]) / 8)  # each overflow backs the scale off by 2^8 (no growth)
    assert skipped >= 1 and model.fusion.updates == 2 * 4 * 2 - skipped
    assert torch.isfinite(flat_params(model)).all()
    assert model.fusion.projector.norm().item() == pytest.approx(1.0)


class Tokens3(MultimodalMixin, pl.LightningModule):
    """Three modalities, one a Conv1d over a sequence giving (N, T, D) tokens; AdamW; fixed fusion weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.v = nn.Linear(6, 8), nn.Linear(5, 8)
        self.t = nn.Conv1d(2, 8, kernel_size=3, padding=1)
        self.fusion = MLAFusion(nn.Linear(8, 4), weights=(0.35, 0.25, 0.40))
        self.configure_modalities({"a": self.a, "v": self.v, "t": self.t}, fusion=self.fusion)
        self.automatic_optimization = False

    def features(self, batch):
        seq = torch.stack([batch["audio"][:, :5], batch["visual"]], 1)
        return {"a": torch.tanh(self.a(batch["audio"])), "v": torch.tanh(self.v(batch["visual"])),
                "t": torch.tanh(self.t(seq)).transpose(1, 2)}

    def training_step(self, batch, batch_idx):
        return self.fusion.training_step(self, self.features(batch), batch["target"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_three_modalities_tokens_adamw_and_fixed_weights(tmp_path):
    model = Tokens3()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, loader())
    assert model.fusion.updates == 4 * 3
    batch = next(iter(loader()))
    feats = model.features(batch)
    fused = model.fuse_subset(feats, ["a", "v", "t"])
    logits = model.fusion.unimodal_logits(feats["a"], feats["v"], feats["t"])
    torch.testing.assert_close(fused, 0.35 * logits[0] + 0.25 * logits[1] + 0.40 * logits[2])
    only_a = model.fuse_subset(feats, ["a"])  # removing modalities renormalises the fixed weights
    torch.testing.assert_close(only_a, logits[0])


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="nn.Linear"):
        MLAFusion(nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="weights"):
        MLAFusion(nn.Linear(8, 4), weights="uniform")

    class Automatic(MLANet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = True

    with pytest.raises(ModalityContractError, match="automatic_optimization = False"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(Automatic(), loader())

    class Wide(MLANet):
        def __init__(self):
            super().__init__()
            self.visual_encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
            self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)

    with pytest.raises(ModalityContractError, match="width 7"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(Wide(), loader())
    with pytest.raises(Exception, match="accumulat"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, accumulate_grad_batches=2)).fit(MLANet(), loader())



class MidRunOverflow(pl.Callback):
    """At batch 2 of epoch 0, raises the scaler's scale to 2^60: the next steps overflow while updates > 0. Records
    the projector, the update count and the parameters around that batch."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 2:
            trainer.precision_plugin.scaler.update(new_scale=2.0 ** 60)
            self.seen["before"] = (pl_module.fusion.projector.clone(), pl_module.fusion.updates,
                                   flat_params(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 2:
            self.seen["after"] = (pl_module.fusion.projector.clone(), pl_module.fusion.updates,
                                  flat_params(pl_module), trainer.precision_plugin.scaler.get_scale())


def test_fp16_overflow_mid_run_leaves_the_projector_alone(tmp_path):
    cb = MidRunOverflow()
    model = MLANet()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, plugins=[fp16_plugin(2.0 ** 8)], callbacks=[cb])).fit(
        model, loader())
    p0, u0, w0 = cb.seen["before"]
    p1, u1, w1, scale = cb.seen["after"]
    assert u0 == 4 and scale == 2.0 ** 44  # both modality steps of the batch overflowed (2^60 → 2^52 → 2^44)
    assert u1 == u0 and torch.equal(p1, p0) and torch.equal(w1, w0)
    assert model.fusion.updates == u0 and torch.isfinite(flat_params(model)).all()  # batch 3 overflows too (2^44)


class BNNet(MLANet):
    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)
        self.audio_encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.fusion)


class SaveBuffers(SaveParams):
    def on_train_end(self, trainer, pl_module):
        torch.save(torch.cat([b.float().reshape(-1) for b in pl_module.buffers()]),
                   f"{self.directory}/buffers{trainer.global_rank}.pt")


def test_ddp_keeps_batchnorm_buffers_identical(tmp_path):
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[SaveBuffers(str(tmp_path))], max_epochs=1, devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False)).fit(BNNet(), loader(batch_size=8))
    assert torch.equal(torch.load(tmp_path / "buffers0.pt"), torch.load(tmp_path / "buffers1.pt"))


def test_garbage_in_absent_rows_reaches_nothing(tmp_path):
    class NaNAbsent(MLANet):
        def features(self, batch):
            feats = super().features(batch)
            if "present" in batch:
                feats = {m: torch.where(batch["present"][m][:, None], z, torch.full_like(z, float("nan")))
                         for m, z in feats.items()}
            return feats

    model = NaNAbsent()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, loader(missing=(0.3, 0.2)))
    assert torch.isfinite(flat_params(model)).all() and torch.isfinite(model.fusion.projector).all()
    batch = next(iter(loader(missing=(0.3, 0.2))))
    assert torch.isfinite(model.fuse(model.features(batch), present=batch["present"])).all()


def test_a_head_without_bias_the_scheduler_warning_and_shared_layers(tmp_path):
    no_bias = MLAFusion(nn.Linear(8, 4, bias=False))
    out = no_bias(torch.randn(3, 8), torch.randn(3, 8), present=torch.tensor([[True, True], [False, False],
                                                                                [True, False]]))
    assert torch.equal(out[1], torch.zeros(4))

    class Scheduled(MLANet):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    with pytest.warns(UserWarning, match="does not step learning-rate schedulers"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(Scheduled(), loader())

    class Shared(MLANet):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)

        def features(self, batch):
            feats = super().features(batch)
            return {m: self.stem(z) for m, z in feats.items()}

    with pytest.raises(ModalityContractError, match="its own layers"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(Shared(), loader())
