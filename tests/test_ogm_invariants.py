"""OGM-GE under DDP, gradient accumulation, checkpoint resume, AMP and manual optimisation
(benchmark-protocol.md §5): every setting must give the single-process, full-batch result."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_balance import OGMGE, ModalityMonitor
from tests.helpers import SaveParams, TinyAV, flat_params, loader, trainer_kwargs


def run(tmp_path, callbacks, *, batch_size=16, model=None, val=False, **trainer_overrides):
    model = model or TinyAV()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **trainer_overrides))
    trainer.fit(model, loader(batch_size=batch_size), loader(n=32, batch_size=batch_size, seed=1) if val else None)
    return model, trainer


def ogm(**kw):
    kw.setdefault("alpha", 0.8)
    kw.setdefault("params", "weights")
    return OGMGE(**kw)


def test_ogm_ge_changes_training(tmp_path):
    base, _ = run(tmp_path, [])
    modulated, _ = run(tmp_path, [ogm(seed=0)])
    no_noise, _ = run(tmp_path, [ogm(noise=False)])
    assert not torch.allclose(flat_params(base), flat_params(modulated))
    assert not torch.allclose(flat_params(no_noise), flat_params(modulated))


@pytest.mark.timeout(300)
def test_ddp_parity_and_identical_ranks(tmp_path):
    """2 processes x batch 8 == 1 process x batch 16; both ranks hold the same parameters; the
    monitor's validation metrics (synchronised across ranks) equal the single-process ones.

    The DDP run draws its noise seed on rank 0 and broadcasts it (seed=None), so identical ranks also
    prove the seed broadcast; the single-process run then reuses that seed.
    """
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    torch.manual_seed(0)
    callbacks = [ogm(seed=None), ModalityMonitor(), SaveParams(str(ddp_dir))]
    run(ddp_dir, callbacks, batch_size=8, val=True, devices=2, strategy="ddp_spawn", max_epochs=2,
        use_distributed_sampler=False)
    rank0 = torch.load(ddp_dir / "rank0.pt")
    rank1 = torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]), "replicas diverged"
    assert rank0["states"] == rank1["states"]
    state = rank0["states"]["OGMGE"]
    assert state["num_edits"] == 8

    single_monitor = ModalityMonitor()
    single, _ = run(tmp_path, [ogm(seed=state["seed"]), single_monitor], batch_size=16, val=True, max_epochs=2)
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    ddp_history = rank0["states"]["ModalityMonitor"]["history"]
    assert len(ddp_history) == len(single_monitor.history) == 2
    for ddp_row, single_row in zip(ddp_history, single_monitor.history):
        assert ddp_row.keys() == single_row.keys()
        for key in ddp_row:
            assert ddp_row[key] == pytest.approx(single_row[key], rel=1e-5), key
    # and the edit mattered: without OGM-GE the parameters differ by far more than the tolerance
    plain, _ = run(tmp_path, [], batch_size=16, max_epochs=2)
    assert (flat_params(plain) - rank0["params"]).abs().max() > 1e-3


def test_accumulation_parity(tmp_path):
    full, _ = run(tmp_path, [ogm(seed=5)], batch_size=16)
    accumulated, _ = run(tmp_path, [ogm(seed=5)], batch_size=8, accumulate_grad_batches=2)
    torch.testing.assert_close(flat_params(accumulated), flat_params(full), rtol=1e-5, atol=1e-6)


def test_accumulation_applies_once_per_optimizer_step(tmp_path):
    cb = ogm(seed=5)
    run(tmp_path, [cb], batch_size=8, accumulate_grad_batches=2, max_epochs=1)
    assert cb.num_edits == 4  # 8 micro-batches, 4 optimizer steps


def test_resume_parity(tmp_path):
    straight_cb = ogm(seed=11)
    straight, _ = run(tmp_path / "a", [straight_cb], max_epochs=4)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    run(tmp_path / "b", [ogm(seed=11), ckpt], max_epochs=2, enable_checkpointing=True)
    resumed_cb = ogm(seed=None)  # a fresh instance: seed and step counter must come from the checkpoint
    resumed = TinyAV(seed=123)  # different init: everything must come from the checkpoint
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed_cb], max_epochs=4))
    trainer.fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert resumed_cb.state_dict() == straight_cb.state_dict()


def test_modulation_window(tmp_path):
    cb = ogm(seed=0, start_epoch=1, end_epoch=2)
    run(tmp_path, [cb], max_epochs=4)
    assert cb.num_edits == 8  # epochs 1 and 2 only, 4 steps each
    # outside the window the callback is inert: epoch 0 equals plain training
    plain, _ = run(tmp_path, [], max_epochs=1)
    late, _ = run(tmp_path, [ogm(seed=0, start_epoch=1)], max_epochs=1)
    assert torch.equal(flat_params(plain), flat_params(late))


def test_manual_optimization_matches_automatic(tmp_path):
    auto, _ = run(tmp_path, [ogm(seed=2)])
    manual, _ = run(tmp_path, [ogm(seed=2)], model=TinyAV(manual=True))
    torch.testing.assert_close(flat_params(manual), flat_params(auto), rtol=1e-6, atol=1e-7)


def test_fp16_amp_edits_unscaled_gradients(tmp_path):
    """With a GradScaler the callback runs after unscaling: fp16 training tracks fp32 training."""
    seen = []

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(pl_module.audio_encoder[0].weight.grad.norm().item())

    fp32, _ = run(tmp_path, [ogm(seed=4), Probe()], max_epochs=1)
    fp32_norms, seen[:] = list(seen), []
    amp = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    fp16, _ = run(tmp_path, [ogm(seed=4), Probe()], max_epochs=1, plugins=[amp])
    assert seen == pytest.approx(fp32_norms, rel=0.05)  # unscaled (a scaled grad would be ~4096x)
    torch.testing.assert_close(flat_params(fp16), flat_params(fp32), rtol=0.05, atol=5e-3)


class TwoOptimizers(TinyAV):
    """Manual optimisation with one optimizer per encoder (+ head on the first): each optimizer's step
    must edit only its own parameters, with the coefficients of the one global batch."""

    def __init__(self):
        super().__init__(manual=True)

    def configure_optimizers(self):
        first = [*self.audio_encoder.parameters(), *self.head.parameters()]
        return [torch.optim.SGD(first, lr=self.lr, momentum=self.momentum),
                torch.optim.SGD(self.visual_encoder.parameters(), lr=self.lr, momentum=self.momentum)]

    def training_step(self, batch, batch_idx):
        opt_a, opt_v = self.optimizers()
        logits = self.fuse(self.forward_features(batch), batch["target"])
        loss = torch.nn.functional.cross_entropy(logits, batch["target"])
        opt_a.zero_grad()
        opt_v.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_v.step()


def test_several_optimizers_edit_their_own_parameters(tmp_path):
    auto, _ = run(tmp_path, [ogm(noise=False)])
    cb = ogm(noise=False)
    two, _ = run(tmp_path, [cb], model=TwoOptimizers())
    torch.testing.assert_close(flat_params(two), flat_params(auto), rtol=1e-6, atol=1e-7)
    assert cb.num_edits == 16  # 8 batches x 2 optimizers


def test_three_modalities_on_the_synthetic_benchmark(tmp_path):
    from lightning_balance.data import SyntheticCollapseDataModule

    from tests.helpers import MultiMLP

    data = SyntheticCollapseDataModule(num_samples=512, num_modalities=3, snr=[4.0, 1.0, 0.5], batch_size=64)
    cb = ogm(seed=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, log_every_n_steps=1))
    trainer.fit(MultiMLP(data.feature_dims), datamodule=data)
    coeffs = {m: trainer.callback_metrics[f"balance/ogm/coeff/{m}"].item() for m in data.modalities}
    ratios = {m: trainer.callback_metrics[f"balance/ogm/ratio/{m}"].item() for m in data.modalities}
    assert cb.num_edits == trainer.global_step > 0
    # the strongest modality is slowed (k < 1), the weaker ones are not
    strongest = max(ratios, key=ratios.get)
    assert ratios[strongest] > 1 and coeffs[strongest] < 1
    assert all(coeffs[m] == 1.0 for m in data.modalities if ratios[m] <= 1)
