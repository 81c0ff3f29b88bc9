"""The invariants of the collapse paper's two terms (cross-modal distillation, EBR) that their own files do not
cover: gradient accumulation (against the recipe restated with per-micro-batch backward passes, or against the
full batch), fp16 with forced overflow steps, and stacking with each other and with callbacks in both list
orders."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import OGMGE, CrossModalDistillation, ExplicitBasisReallocation, ModalityDropout
from lightning_balance.functional import crd_memory_update
from tests.helpers import TinyAV, flat_params, fp16_plugin, loader, states_equal, trainer_kwargs
from tests.test_distill import FEAT, K, MOMENTUM, N, SEED, TEMP, WEIGHT, KDModel, crd_recipe, indexed_loader
from tests.test_ebr import EBRModel


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("method", ["crd", "infonce"])
def test_distillation_under_accumulation_follows_the_recipe_micro_batch_by_micro_batch(tmp_path, method):
    """2 × 8 accumulated: each micro-batch's loss / 2 backpropagated, the memories moved after each micro-batch (the
    official per-iteration update), one optimizer step per 2 (restated in ``crd_recipe``)."""
    reference = KDModel(method=method)
    mem_s, mem_t, _ = crd_recipe(reference, list(indexed_loader(batch_size=8)), epochs=2, method=method, accumulate=2)
    model = KDModel(method=method)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2)).fit(model, indexed_loader(8))
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    term = model.balance_losses["distill"]
    assert int(term.steps) == 16  # one per micro-batch
    if method == "crd":
        torch.testing.assert_close(term.memory_student, mem_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(term.memory_audio, mem_t, rtol=1e-5, atol=1e-6)


def test_ebr_accumulated_micro_batches_equal_the_full_batch(tmp_path):
    """L_md is a sum over the present pairs divided by the batch size and the task loss a per-sample mean: 2 × 8
    accumulated is one step of 16, with absent modalities, over an adversarial epoch (interleave_epochs=1)."""
    full, accumulated = EBRModel(), EBRModel()
    missing = (0.3, 0.3)  # the micro-batches hold different numbers of present (sample, modality) pairs
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(full, loader(batch_size=16, missing=missing))
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2)).fit(
        accumulated, loader(batch_size=8, missing=missing))
    torch.testing.assert_close(flat_params(accumulated), flat_params(full), rtol=1e-5, atol=1e-6)
    untrained = EBRModel()
    moved = (flat_params(full.balance_losses["ebr"].discriminator)
             - flat_params(untrained.balance_losses["ebr"].discriminator)).abs().max()
    assert moved > 1e-4  # the adversarial epoch trained the discriminator


# ---------------------------------------------------------------------------------------------- fp16 overflow
class KDSkip(KDModel):
    """The forced-overflow reference of distillation: in the first ``skip`` steps the forward runs (the memories
    move, the step counter advances, as in an overflowing fp16 step) but no gradient is taken."""

    def __init__(self, skip, **kw):
        super().__init__(**kw)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if self.trainer.global_step < self.skip else loss


class EBRSkip(EBRModel):
    def __init__(self, skip, **kw):
        super().__init__(**kw)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        return None if self.trainer.global_step < self.skip else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("kind", ["crd", "infonce", "ebr"])
def test_fp16_overflow_steps_are_skipped_and_the_rest_is_the_run_without_them(tmp_path, kind):
    """A GradScaler at 2^40 overflows the first three steps (2^40 → 2^32 → 2^24 → 2^16): the result is the run whose
    first three steps took no gradient, with the scaler starting at 2^16."""
    make = (lambda: EBRModel()) if kind == "ebr" else (lambda: KDModel(method=kind))
    data = (lambda: loader()) if kind == "ebr" else (lambda: indexed_loader())
    net = make()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, plugins=[fp16_plugin(2.0**40)])).fit(net, data())
    reference = EBRSkip(skip=3) if kind == "ebr" else KDSkip(skip=3, method=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, plugins=[fp16_plugin(2.0**16)])).fit(reference, data())
    torch.testing.assert_close(flat_params(net), flat_params(reference), rtol=0, atol=0)
    assert torch.isfinite(flat_params(net)).all()
    got, want = net.balance_losses.state_dict(), reference.balance_losses.state_dict()
    assert got.keys() == want.keys()
    for key in got:  # the memories, normalisers and step counter (distillation); EBR's unfitted order (NaN)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert (flat_params(net) - flat_params(make())).abs().max() > 1e-3  # the five finite steps trained


def test_a_non_finite_embedding_leaves_its_memory_row_alone():
    memory = F.normalize(torch.randn(6, 3), dim=1)
    before = memory.clone()
    emb = F.normalize(torch.randn(4, 3), dim=1)
    emb[1] = float("nan")
    emb[3, 0] = float("inf")
    index = torch.tensor([0, 2, 4, 0])  # index 0 twice: its last row is not finite, the first one is
    crd_memory_update(memory, index, emb, 0.5)
    assert torch.equal(memory[2], before[2]) and torch.equal(memory[[1, 3, 5]], before[[1, 3, 5]])
    torch.testing.assert_close(memory[0], F.normalize(before[0] * 0.5 + emb[0] * 0.5, dim=0))
    torch.testing.assert_close(memory[4], F.normalize(before[4] * 0.5 + emb[2] * 0.5, dim=0))


def test_crds_normaliser_is_set_from_the_finite_rows_of_the_first_batch():
    """The official CRD sets Z = mean(out) · n_data on its first batch. Every memory row is one vector v here, so
    each score of row b is exp(s_b · v / T), whatever negatives are drawn; a NaN row is left out of the mean, a
    batch with no finite row leaves Z unset, and a later batch does not move it."""
    n, temp = 20, 0.07
    term = CrossModalDistillation("audio", "visual", {"audio": 4, "visual": 4}, method="crd", num_samples=n,
                                  feat_dim=3, nce_k=5, nce_t=temp, nce_m=0.5, negatives="uniform")
    v = F.normalize(torch.tensor([1.0, 2.0, -1.0]), dim=0)
    term.memory_student.copy_(v.expand(n, 3))
    term.memory_visual.copy_(v.expand(n, 3))
    s = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    t = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    index, targets = torch.tensor([3, 7, 11, 15]), torch.zeros(4, dtype=torch.long)
    term._crd(torch.full_like(s, float("nan")), torch.full_like(t, float("nan")), "visual", index, targets, False)
    assert torch.equal(term.normalisers, torch.tensor([-1.0, -1.0]))  # no finite row: not set yet
    s_nan = s.clone()
    s_nan[1] = float("nan")
    term._crd(s_nan, t, "visual", index, targets, False)
    finite = torch.tensor([0, 2, 3])
    want_s = torch.exp(s[finite] @ v / temp).mean() * n
    want_t = torch.exp(t @ v / temp).mean() * n
    torch.testing.assert_close(term.normalisers, torch.stack([want_s, want_t]))
    term._crd(-s, -t, "visual", index, targets, False)  # other scores: Z stays the first batch's
    torch.testing.assert_close(term.normalisers, torch.stack([want_s, want_t]))


# ---------------------------------------------------------------------------------------------- stacking
class Both(TinyAV):
    """Distillation and EBR in one model, in a given list order, trained with the callbacks of the Trainer. The terms
    are built in one fixed order, so their initial weights do not depend on the list order."""

    def __init__(self, order):
        super().__init__()
        terms = {"distill": CrossModalDistillation(
            "visual", "audio", {"audio": 8, "visual": 8}, method="crd", num_samples=N, feat_dim=FEAT, nce_k=K,
            nce_t=TEMP, nce_m=MOMENTUM, seed=SEED, weight=WEIGHT),
            "ebr": ExplicitBasisReallocation({"audio": 8, "visual": 8}, basis_dim=4, hidden_dim=6,
                                             adversarial_weight=0.5, interleave_epochs=1)}
        self.configure_loss_terms([terms[name] for name in order])

    training_step = KDModel.training_step


def test_distillation_and_ebr_stack_with_callbacks_in_every_list_order(tmp_path):
    """The two terms in both orders, the two callbacks in both orders: four runs, one result (by name); both terms'
    own parameters moved (the student's embedding: CRD's gradient; the discriminator: L_md's), and the stack
    differs from distillation alone."""
    runs = []
    for callbacks_reversed in (False, True):
        for order in (("distill", "ebr"), ("ebr", "distill")):
            net = Both(order)
            start = {k: v.clone() for k, v in net.state_dict().items()}
            cbs = [OGMGE(alpha=0.5, seed=2), ModalityDropout(p=0.3, seed=1)]
            cbs = cbs[::-1] if callbacks_reversed else cbs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pl.Trainer(**trainer_kwargs(tmp_path, callbacks=cbs, max_epochs=2)).fit(net, indexed_loader())
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            for part in ("distill.embed_student", "ebr.discriminator", "ebr.decoders"):
                assert any(part in k and not torch.equal(v, start[k]) for k, v in state.items()), part
            assert next(cb for cb in cbs if isinstance(cb, OGMGE)).num_edits == 8
            assert next(cb for cb in cbs if isinstance(cb, ModalityDropout)).draws == 8
            runs.append((state, {type(cb).__name__: cb.state_dict() for cb in cbs}))
    first, first_cbs = runs[0]
    for state, cb_states in runs[1:]:
        assert state.keys() == first.keys()
        for key in first:
            torch.testing.assert_close(state[key], first[key], rtol=1e-6, atol=1e-7, equal_nan=True, msg=key)
        assert states_equal(cb_states, first_cbs)
    assert int(next(v for k, v in first.items() if k.endswith("distill.steps"))) == 8
    alone = KDModel(method="crd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(alpha=0.5, seed=2), ModalityDropout(p=0.3, seed=1)],
                                    max_epochs=2)).fit(alone, indexed_loader())
    assert (alone.state_dict()["head.weight"] - first["head.weight"]).abs().max() > 1e-4
