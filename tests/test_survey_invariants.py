"""Invariants of the issue-14 loss terms the per-method files leave out: forced fp16 overflow (MBSD, LFM's fitted
schedule) equals the run without the overflowed steps, and the terms stack with a gradient method (OGM-GE) and
with each other in either list order."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import OGMGE, LFMLoss, MBSDLoss
from tests.helpers import TinyAV, flat_params, fp16_plugin, loader, states_equal, trainer_kwargs


class Terms(TinyAV):
    def __init__(self, terms, skip: int = 0, seed: int = 0):
        super().__init__(seed=seed)
        self.skip = skip
        self.configure_loss_terms(terms())

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step < self.skip:
            return None  # no backward, no step, no scaler update: the overflowed steps removed
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


TERMS = {"mbsd": lambda: [MBSDLoss()], "lfm": lambda: [LFMLoss(horizon=4)]}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_fp16_overflow_steps_are_the_run_without_them(tmp_path, name):
    """A GradScaler at 2^40 overflows the first three steps (2^40 → 2^32 → 2^24 → 2^16)."""
    net = Terms(TERMS[name])
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, plugins=[fp16_plugin(2.0**40)])).fit(net, loader())
    reference = Terms(TERMS[name], skip=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, plugins=[fp16_plugin(2.0**16)])).fit(reference, loader())
    torch.testing.assert_close(flat_params(net), flat_params(reference), rtol=0, atol=0)
    assert (flat_params(net) - flat_params(Terms(TERMS[name]))).abs().max() > 1e-3  # the finite steps trained


def test_the_terms_stack_with_each_other_and_ogm_ge_in_either_order(tmp_path):
    """MBSD and LFM in one model, in both orders of configure_loss_terms, with OGM-GE editing the gradients: the
    same parameters, and different from either term alone."""
    results = []
    for order in ((MBSDLoss, LFMLoss), (LFMLoss, MBSDLoss)):
        model = Terms(lambda order=order: [cls() if cls is MBSDLoss else cls(horizon=4) for cls in order])
        ogm = OGMGE(alpha=0.3, seed=1)
        pl.Trainer(**trainer_kwargs(tmp_path / order[0].__name__, callbacks=[ogm], max_epochs=2)).fit(model, loader())
        assert ogm.num_edits > 0
        results.append(flat_params(model))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    alone = Terms(TERMS["mbsd"])
    pl.Trainer(**trainer_kwargs(tmp_path / "alone", callbacks=[OGMGE(alpha=0.3, seed=1)], max_epochs=2)).fit(
        alone, loader())
    assert (flat_params(alone) - results[0]).abs().max() > 1e-5  # LFM acted on top of MBSD


class ForwardOnly(TinyAV):
    """TinyAV with the unimodal losses whose first ``skip`` steps run the forward (the forward methods' draws and
    statistics happen there) and then return None: no backward, no step, no scaler update. An fp16 step that
    overflows is exactly that: its forward ran, its step was skipped."""

    def __init__(self, skip: int = 0, **kw):
        super().__init__(aux_losses=True, **kw)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if self.trainer.global_step < self.skip else loss


@pytest.mark.parametrize("method", ["opm", "amco"])
def test_forward_methods_under_fp16_overflow(tmp_path, method):
    from lightning_balance import OPM, AMCo

    def make():
        return [OPM(seed=4, start_epoch=0, p_exe=1.0)] if method == "opm" else [AMCo(seed=4)]

    net, cbs = ForwardOnly(), make()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=cbs, max_epochs=2, plugins=[fp16_plugin(2.0**40)])).fit(
        net, loader())
    reference, ref_cbs = ForwardOnly(skip=3), make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=ref_cbs, max_epochs=2,
                                    plugins=[fp16_plugin(2.0**16)])).fit(reference, loader())
    torch.testing.assert_close(flat_params(net), flat_params(reference), rtol=0, atol=0)
    assert states_equal(cbs[0].state_dict(), ref_cbs[0].state_dict(), rtol=0, atol=0)  # draws, flags, counters
    assert (flat_params(net) - flat_params(ForwardOnly())).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["relearning", "valuation"])
def test_epoch_level_methods_stack_with_ogm_ge_in_either_order(tmp_path, method):
    """Re-learning's re-initialisation and valuation's re-sampling run between epochs, OGM-GE edits every step:
    the two list orders give the same training, and both methods act (OGM-GE edits, the epoch method re-inits or
    adds copies)."""
    from lightning_balance import Relearning, SampleValuation
    from tests import test_relearning, test_valuation

    def run(first_epoch_method: bool, directory):
        epoch_cb = (Relearning(every_n_epochs=1, max_reinits=2) if method == "relearning"
                    else SampleValuation(start_epoch=1))
        cbs = [epoch_cb, OGMGE(alpha=0.5, seed=0)]
        data = test_relearning.Data() if method == "relearning" else test_valuation.Data()
        model = TinyAV(lr=0.2)
        pl.Trainer(**trainer_kwargs(directory, max_epochs=3, reload_dataloaders_every_n_epochs=1,
                                    callbacks=cbs if first_epoch_method else cbs[::-1])).fit(model, datamodule=data)
        return model, cbs

    model, cbs = run(True, tmp_path / "a")
    other, other_cbs = run(False, tmp_path / "b")
    torch.testing.assert_close(flat_params(model), flat_params(other), rtol=0, atol=0)
    assert cbs[1].num_edits > 0 and len(cbs[0].history) >= 1
    assert cbs[0].history == other_cbs[0].history
