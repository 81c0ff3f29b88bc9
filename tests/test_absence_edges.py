"""Edges of absence found by review: a step where no sample has some modality (every method neutral), a
fusion that takes the mask reached by PMR and Gradient-Blending outside fuse, NaN in left-out rows, the
unimodal teachers and ensemble, MMPareto's conflict count, contrastive projections with no pair."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import AGM, PMR, ContrastiveLoss, InfoReg, MMPareto, UnimodalEnsemble
from lightning_balance.functional import agm_scores, class_feature_sums, modality_scores
from tests.helpers import DictDataset, InterleavedSampler, TinyAV, trainer_kwargs
from tests.test_presence import AttentionModel


class NoVisualFirst(DictDataset):
    """The first batch (16 samples) of each epoch has no visual sample."""

    def __init__(self):
        super().__init__(n=64, missing=(0.3, 0.25))
        self.present[:16, 0] = True
        self.present[:16, 1] = False


def loader():
    ds = NoVisualFirst()
    return DataLoader(ds, batch_size=16, sampler=InterleavedSampler(len(ds)))


class Results(pl.Callback):
    """The result each method computed, per step (read after the optimizer step)."""

    def __init__(self, method):
        self.method, self.rows = method, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        result = self.method._result
        self.rows.append(None if result is None else {k: v.detach().clone() for k, v in result.items()})


@pytest.mark.parametrize("name", ["inforeg", "agm", "pmr"])
def test_a_step_without_any_sample_of_a_modality_is_neutral(tmp_path, name):
    method = {"inforeg": lambda: InfoReg(), "agm": lambda: AGM(alpha=1.0),
              "pmr": lambda: PMR(alpha=1.0, fraction=0.25, entropy_weight=0.5, entropy_epochs=5)}[name]()
    results = Results(method)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[method, results], max_epochs=2)).fit(TinyAV(aux_losses=True), loader())
    first = [results.rows[0], results.rows[4]]  # the visual-free first step of each epoch
    others = results.rows[1:4] + results.rows[5:]
    if name == "inforeg":
        assert all(float(r["beta"].abs().sum()) == 0.0 for r in first)
        assert any(float(r["beta"].abs().sum()) > 0 for r in others)
    elif name == "agm":
        assert all(r["kappa"].tolist() == [1.0, 1.0] for r in first)
        assert method.iterations == 6  # the running means skip the two steps
    else:
        assert all(r is None or "pce_weight" not in r for r in first)  # no prototype term, no entropy term
        assert method.num_edits == 6


def test_pmr_and_gblend_reach_a_mask_taking_fusion_through_the_contract(tmp_path):
    from lightning_balance.callbacks.gblend import _head_loss

    model = AttentionModel()
    ds = DictDataset(n=8)
    batch = {"audio": ds.a, "visual": ds.v, "target": ds.y}

    def encode_batch(b):
        return {"audio": model.audio_encoder(b["audio"]), "visual": model.visual_encoder(b["visual"])}, b["target"]

    model.encode_batch = encode_batch
    loss, count = _head_loss(model, batch, "fused", -100)  # complete batch: the fusion gets an all-True mask
    assert math.isfinite(loss.item()) and count.item() == 8 and bool(model.fusion.seen[-1].all())
    assert PMR()._num_classes(model, encode_batch(batch)[0]) == 4


def test_left_out_rows_may_hold_nan():
    feats = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]])
    sums, counts = class_feature_sums(feats, torch.tensor([0, 0, 1]), 2, torch.tensor([True, False, True]))
    assert torch.isfinite(sums).all() and sums.tolist() == [[1.0, 2.0], [3.0, 4.0]] and counts.tolist() == [1, 1]
    logits = torch.tensor([[[0.0, 1.0], [float("inf"), 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (M=2, N=2, C=2)
    valid = torch.tensor([[True, False], [True, True]])
    scores = modality_scores(logits, torch.tensor([1, 0]), valid)
    assert torch.isfinite(scores).all()
    assert scores[0].item() == pytest.approx(math.exp(1) / (1 + math.exp(1)))
    assert torch.isfinite(agm_scores(logits, torch.tensor([1, 0]), valid=valid)).all()


def test_the_unimodal_ensemble_combines_the_present_modalities():
    torch.manual_seed(0)
    models = {"audio": nn.Linear(3, 4), "visual": nn.Linear(2, 4)}
    ume = UnimodalEnsemble(models)
    x = {"audio": torch.randn(3, 3), "visual": torch.randn(3, 2)}
    present = {"audio": torch.tensor([True, False, True]), "visual": torch.tensor([True, True, False])}
    out = ume(x, present)
    pa, pv = F.softmax(models["audio"](x["audio"]), -1), F.softmax(models["visual"](x["visual"]), -1)
    torch.testing.assert_close(out[0].exp(), ((pa[0] + pv[0]) / 2).detach())
    torch.testing.assert_close(out[1].exp(), pv[1].detach())  # audio absent: visual alone
    torch.testing.assert_close(out[2].exp(), pa[2].detach())


def test_unimodal_teachers_learn_from_the_samples_that_have_their_modality():
    from lightning_balance.losses.umt import _UnimodalModel

    torch.manual_seed(0)
    model = _UnimodalModel(nn.Linear(3, 5), 5, 4, "visual", lr=0.1, momentum=0.0, index=1)
    batch = {"visual": torch.randn(4, 3), "target": torch.tensor([0, 1, 2, 3]),
             "present": torch.tensor([[True, True], [True, False], [False, True], [True, False]])}
    loss = model.training_step(batch, 0)
    keep = batch["present"][:, 1]
    assert loss.item() == pytest.approx(F.cross_entropy(model(batch["visual"][keep]), batch["target"][keep]).item())


def test_mmpareto_counts_no_conflict_when_no_sample_has_the_modality(tmp_path):
    class NoVisual(DictDataset):
        def __init__(self):
            super().__init__(n=64, missing=(0.0, 0.0))
            self.present[:, 1] = False

    cb = MMPareto()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(
        TinyAV(fusion="gated", unimodal="heads", aux_losses=True, seed=6),
        DataLoader(NoVisual(), batch_size=16, sampler=InterleavedSampler(64)))
    # the visual encoder's two gradients are both zero on every step: nothing to merge, not a conflict
    assert float(cb.conflicts[1]) == 0.0 and float(cb.stationary[1]) == 0.0
    assert float(cb.merged[1]) == 4


def test_a_projection_without_any_pair_gets_a_zero_gradient_not_none():
    term = ContrastiveLoss(feature_dims={"a": 3, "b": 3, "c": 3}, projection_dim=4)
    vectors = {m: torch.randn(4, 3) for m in "abc"}
    present = {"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool),
               "c": torch.tensor([True, False, False, False])}  # c shares one sample: a single-row pair
    present["c"][:] = False
    present["c"][0] = True
    term(vectors, {**present, "a": torch.tensor([False, True, True, True])}).backward()
    assert term.projections["c"].weight.grad is not None
    assert float(term.projections["c"].weight.grad.abs().sum()) == 0.0  # no pair with c: zero, like under DDP


def test_a_method_that_cannot_handle_absence_refuses_a_mask_with_its_reason(tmp_path):
    """The refusal path (no shipped method needs it): a callback and a loss term with ``supports_absence =
    False`` stop at the first record with a mask, naming themselves and their reason; without a mask they run."""
    from lightning_balance import ModalityContractError
    from lightning_balance.callbacks.base import GradientBalancingCallback
    from lightning_balance.losses.base import LossTerm
    from tests.helpers import TinyAV, loader, trainer_kwargs

    class CompleteOnly(GradientBalancingCallback):
        method = "complete_only"
        supports_absence = False
        absence_refusal = "its scores assume every sample has every modality."

        def collect(self, pl_module, record):
            return {"n": torch.tensor([float(record.batch_size)])}

        def compute(self, stats):
            return {"n": stats["n"]}

        def edit(self, groups, result, device):
            self.edited = True

    class CompleteTerm(LossTerm):
        name = "complete_term"
        supports_absence = False
        absence_refusal = "it pairs every sample with all its modalities."

        def from_record(self, module, record):
            return record.logits.sum() * 0.0, {}

    class WithTerm(TinyAV):
        def __init__(self):
            super().__init__()
            self.configure_loss_terms([CompleteTerm()])

        def training_step(self, batch, batch_idx):
            logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
            return self.add_loss_terms(torch.nn.functional.cross_entropy(logits, batch["target"]))

    with pytest.raises(ModalityContractError, match="CompleteOnly does not handle absent modalities: its scores assume"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[CompleteOnly()], max_steps=1)).fit(
            TinyAV(), loader(missing=(0.3, 0.3)))
    with pytest.raises(ModalityContractError, match="CompleteTerm does not handle absent modalities: it pairs"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1)).fit(WithTerm(), loader(missing=(0.3, 0.3)))
    cb = CompleteOnly()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_steps=1)).fit(TinyAV(), loader())
    assert cb.edited
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1)).fit(WithTerm(), loader())
