"""The invariants with a presence mask in the batch (benchmark-protocol.md §5.7): DDP on 2 processes equals one
process (also when one rank holds no sample of a modality in a step), accumulation equals the full batch,
resume from a checkpoint inside an epoch equals the uninterrupted run, and fp16 overflow steps are skipped
without touching state; and CML on absent modalities."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_balance import AGM, OGMGE, PMR, CMLLoss, InfoReg, MMPareto
from tests.helpers import (DictDataset, InterleavedSampler, SaveParams, SkipFirst, TinyAV, flat_params, fp16_plugin,
                           resumable_loader, resume_inside_an_epoch, states_equal, trainer_kwargs)

MISSING = (0.3, 0.25)
METHODS = {
    "ogm_ge": lambda: OGMGE(alpha=0.5, seed=3),
    "inforeg": lambda: InfoReg(),
    "agm": lambda: AGM(alpha=1.0),
    "pmr": lambda: PMR(alpha=1.0, fraction=0.25, momentum=0.5),
    "pmr_steps": lambda: PMR(prototypes="steps", rule="continuous", entropy_weight=0.5, entropy_epochs=1),
    "mmpareto": lambda: MMPareto(),
}
STEP_METHODS = ["ogm_ge", "inforeg", "mmpareto"]  # reduce once per optimizer step: exact under accumulation


class OneRankWithoutAudio(DictDataset):
    """Rank 0 of 2 (even positions, InterleavedSampler) has no audio sample in the first step of each epoch."""

    def __init__(self):
        super().__init__(n=64, missing=MISSING)
        self.present[0:16:2, 0] = False
        self.present[0:16:2, 1] = True


def masked_loader(batch_size=16, dataset=None):
    ds = dataset if dataset is not None else DictDataset(n=64, missing=MISSING)
    return DataLoader(ds, batch_size=batch_size, sampler=InterleavedSampler(len(ds)))


def model():
    return TinyAV(aux_losses=True)


def fit(tmp_path, callbacks, loader, **overrides):
    net = model()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2, **overrides)).fit(net, loader)
    return net


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_ddp_with_a_mask_equals_one_process_even_when_a_rank_lacks_a_modality(tmp_path, name):
    dataset = OneRankWithoutAudio()
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    fit(ddp_dir, [METHODS[name](), SaveParams(str(ddp_dir))], masked_loader(8, dataset), devices=2,
        strategy="ddp_spawn", use_distributed_sampler=False)
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]), "replicas diverged"
    single_cb = METHODS[name]()
    single = fit(tmp_path, [single_cb], masked_loader(16, dataset))
    # float rounding of the rank sums reaches ~2e-6 after 8 steps (MMPareto's min-norm weights, PMR's class
    # sums); a per-rank normalisation of a modality's losses would be off by a factor of 2 on these batches
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-4, atol=1e-5)
    assert states_equal(rank0["states"][type(single_cb).__name__], single_cb.state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", STEP_METHODS)
def test_accumulation_with_a_mask_equals_the_full_batch(tmp_path, name):
    full_cb, acc_cb = METHODS[name](), METHODS[name]()
    full = fit(tmp_path, [full_cb], masked_loader(16))
    accumulated = fit(tmp_path, [acc_cb], masked_loader(8), accumulate_grad_batches=2)
    torch.testing.assert_close(flat_params(accumulated), flat_params(full), rtol=1e-5, atol=1e-6)
    assert full_cb.num_edits == acc_cb.num_edits == 8


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_inside_an_epoch_with_a_mask(tmp_path, name):
    straight, (straight_cb,), resumed, (resumed_cb,) = resume_inside_an_epoch(
        tmp_path, lambda: [METHODS[name]()], lambda seed=0: TinyAV(aux_losses=True, seed=seed),
        lambda: resumable_loader(missing=MISSING), step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fp16_overflow_with_a_mask(tmp_path, name):
    cb = METHODS[name]()
    net = model()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=2, plugins=[fp16_plugin(2.0**40)])).fit(
        net, masked_loader())
    assert cb.num_skipped == 3
    reference_cb = METHODS[name]()
    reference = SkipFirst(skip=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[reference_cb], max_epochs=2,
                                    plugins=[fp16_plugin(2.0**16)])).fit(reference, masked_loader())
    torch.testing.assert_close(flat_params(net), flat_params(reference), rtol=0, atol=0)
    assert states_equal(cb.state_dict(), reference_cb.state_dict())


def test_a_step_where_no_sample_has_a_modality_gives_no_edit(tmp_path):
    class NoVisualFirst(DictDataset):
        def __init__(self):
            super().__init__(n=64, missing=MISSING)
            self.present[:16, 0] = True
            self.present[:16, 1] = False  # the first batch of each epoch has no visual sample

    cb = OGMGE(alpha=0.5, seed=3)
    fit(tmp_path, [cb], masked_loader(16, NoVisualFirst()))
    assert cb.num_edits == 6  # 8 steps, the 2 without a visual sample left alone (nothing to compare)


class CMLModel(TinyAV):
    def __init__(self):
        super().__init__()
        self.configure_loss_terms([CMLLoss(seed=1)])

    def training_step(self, batch, batch_idx):
        return self.add_loss_terms(super().training_step(batch, batch_idx))


def test_cml_trains_on_absent_modalities_and_resumes_inside_an_epoch(tmp_path):
    straight, _, resumed, _ = resume_inside_an_epoch(tmp_path, lambda: [], lambda seed=0: CMLModel(),
                                                     lambda: resumable_loader(missing=MISSING), step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert torch.isfinite(flat_params(straight)).all()


@pytest.mark.parametrize("names", [("ogm_ge", "mmpareto"), ("inforeg", "agm"), ("pmr", "ogm_ge")])
def test_stacked_methods_with_a_mask_give_the_same_result_in_both_list_orders(tmp_path, names):
    """Stacked with a mask in the batch and ModalityDropout removing more (its draws are rank-identical and
    independent of the list): the result does not depend on the list order, and every method acted."""
    from lightning_balance import ModalityDropout

    def stack(order):
        return [ModalityDropout(p=0.2, seed=1), *(METHODS[n]() for n in order)]

    runs = []
    for order in (names, names[::-1]):
        callbacks = stack(order)
        net = fit(tmp_path, callbacks, masked_loader())
        runs.append((flat_params(net), {type(cb).__name__: cb.state_dict() for cb in callbacks}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert states_equal(runs[0][1], runs[1][1])
    for alone in names:
        net = fit(tmp_path, [ModalityDropout(p=0.2, seed=1), METHODS[alone]()], masked_loader())
        assert (flat_params(net) - runs[0][0]).abs().max() > 1e-4, f"{alone} alone equals the stack"
