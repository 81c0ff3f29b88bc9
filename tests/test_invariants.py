"""The four invariants of benchmark-protocol.md §5 for every gradient-touching callback after OGM-GE
(which has its own, more detailed file): DDP parity with identical ranks, accumulation parity, resume
parity (parameters and callback state), and inertness outside the active epochs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_balance import AGM, PMR, InfoReg, MMPareto
from tests.helpers import SaveParams, TinyAV, flat_params, loader, states_equal, trainer_kwargs

# name -> factory of a fresh callback, configured so that it edits the gradients of TinyAV's first epochs
METHODS = {
    "inforeg": lambda **kw: InfoReg(strength=kw.pop("strength", 0.5), **kw),
    "agm": lambda **kw: AGM(alpha=kw.pop("alpha", 2.0), **kw),
    # one random order per step: the draws must be the same on both ranks and after a resume
    "agm_sampled": lambda **kw: AGM(alpha=kw.pop("alpha", 2.0), shapley="sampled", permutations=1, **kw),
    "pmr": lambda **kw: PMR(alpha=kw.pop("alpha", 1.0), fraction=kw.pop("fraction", 0.25), **kw),
    "pmr_steps": lambda **kw: PMR(prototypes="steps", rule="continuous", entropy_weight=0.5, entropy_epochs=1, **kw),
    "mmpareto": lambda **kw: MMPareto(**kw),
    "mmpareto_heads": lambda **kw: MMPareto(gamma=1.0, **kw),
}
# the model each method is tested on (TinyAV keyword arguments)
MODELS = {
    "inforeg": {"aux_losses": True},  # the published recipe trains with the unimodal losses
    "mmpareto": {"aux_losses": True},
    "mmpareto_heads": {"aux_losses": True, "fusion": "gated", "unimodal": "heads"},
}


def model_for(name, **kw):
    return TinyAV(**{**MODELS.get(name, {}), **kw})
# methods whose coefficients act inside each backward pass (reduce_at="micro_batch")
IN_BACKWARD = {"agm", "agm_sampled", "pmr", "pmr_steps"}


def run(tmp_path, callbacks, *, batch_size=16, model=None, **trainer_overrides):
    model = model or TinyAV()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **trainer_overrides))
    trainer.fit(model, loader(batch_size=batch_size))
    return model, trainer


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_changes_training(tmp_path, name):
    plain, _ = run(tmp_path, [], model=model_for(name))
    edited, _ = run(tmp_path, [METHODS[name]()], model=model_for(name))
    assert (flat_params(plain) - flat_params(edited)).abs().max() > 1e-3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_ddp_parity_and_identical_ranks(tmp_path, name):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    run(ddp_dir, [METHODS[name](), SaveParams(str(ddp_dir))], batch_size=8, devices=2, strategy="ddp_spawn",
        use_distributed_sampler=False, model=model_for(name))
    rank0 = torch.load(ddp_dir / "rank0.pt")
    rank1 = torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]), "replicas diverged"
    key = type(METHODS[name]()).__name__
    assert states_equal(rank0["states"][key], rank1["states"][key])
    single_cb = METHODS[name]()
    single, _ = run(tmp_path, [single_cb], batch_size=16, model=model_for(name))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    assert states_equal(rank0["states"][key], single_cb.state_dict())


@pytest.mark.parametrize("name", sorted(set(METHODS) - IN_BACKWARD))
def test_accumulation_parity(tmp_path, name):
    full_cb, acc_cb = METHODS[name](), METHODS[name]()
    full, _ = run(tmp_path, [full_cb], batch_size=16, model=model_for(name))
    accumulated, _ = run(tmp_path, [acc_cb], batch_size=8, accumulate_grad_batches=2, model=model_for(name))
    torch.testing.assert_close(flat_params(accumulated), flat_params(full), rtol=1e-5, atol=1e-6)
    assert full_cb.num_edits == acc_cb.num_edits == 8  # once per optimizer step


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_parity(tmp_path, name):
    straight_cb = METHODS[name]()
    straight, _ = run(tmp_path / "a", [straight_cb], max_epochs=4, model=model_for(name))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    run(tmp_path / "b", [METHODS[name](), ckpt], max_epochs=2, enable_checkpointing=True, model=model_for(name))
    resumed_cb = METHODS[name]()
    resumed = model_for(name, seed=123)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[resumed_cb], max_epochs=4))
    trainer.fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inert_before_start_epoch(tmp_path, name):
    plain, _ = run(tmp_path, [], max_epochs=1, model=model_for(name))
    late_cb = METHODS[name](start_epoch=1)
    late, _ = run(tmp_path, [late_cb], max_epochs=1, model=model_for(name))
    assert torch.equal(flat_params(plain), flat_params(late))
    assert late_cb.num_edits == 0


@pytest.mark.parametrize("name", sorted(IN_BACKWARD))
def test_in_backward_methods_refuse_accumulation_unless_asked(tmp_path, name):
    with pytest.raises(ValueError, match="accumulation='per_micro_batch'"):
        run(tmp_path, [METHODS[name]()], batch_size=8, accumulate_grad_batches=2)
    cb = METHODS[name](accumulation="per_micro_batch")
    accumulated, _ = run(tmp_path, [cb], batch_size=8, accumulate_grad_batches=2)
    full, _ = run(tmp_path, [METHODS[name]()], batch_size=16)
    assert cb.num_edits > 0
    # per-micro-batch coefficients: close to, but not exactly, the full-batch run
    assert (flat_params(accumulated) - flat_params(full)).abs().max() < 0.5


@pytest.mark.parametrize("name", ["inforeg", "agm", "pmr_steps"])
def test_three_modalities_on_the_synthetic_benchmark(tmp_path, name):
    from lightning_balance.data import SyntheticCollapseDataModule

    from tests.helpers import MultiMLP

    data = SyntheticCollapseDataModule(num_samples=512, num_modalities=3, snr=[4.0, 1.0, 0.5], batch_size=64)
    cb = METHODS[name]()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2, log_every_n_steps=1))
    trainer.fit(MultiMLP(data.feature_dims, aux_losses=name == "inforeg"), datamodule=data)
    assert cb.num_edits > 0
    logged = {k.rsplit("/", 1)[-1] for k in trainer.callback_metrics if k.startswith(f"balance/{cb.method}/")}
    assert set(data.modalities) <= logged
