"""Contrastive alignment and reconstruction loss terms: values by hand, temperature, DDP gathering
(negatives from every rank, same parameters as one process), gradients, bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import ContrastiveLoss, LossTerms, ModalityContractError, ReconstructionLoss
from lightning_balance.functional import symmetric_info_nce
from tests.helpers import SaveParams, TinyAV, flat_params, loader, trainer_kwargs


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = 2.0
    # normalised: a = e1, e2; b = e1, (1,1)/sqrt2 -> sim = [[1, r], [0, r]] with r = 1/sqrt2
    r = 1 / math.sqrt(2)
    sim = torch.tensor([[1.0, r], [0.0, r]])
    ce_ab = 0.5 * (-math.log(math.exp(s * 1) / (math.exp(s * 1) + math.exp(s * r)))
                   - math.log(math.exp(s * r) / (math.exp(0) + math.exp(s * r))))
    simT = sim.T  # b vs a
    ce_ba = 0.5 * (-math.log(math.exp(s * simT[0, 0]) / (math.exp(s * simT[0, 0]) + math.exp(s * simT[0, 1])))
                   - math.log(math.exp(s * simT[1, 1]) / (math.exp(s * simT[1, 0]) + math.exp(s * simT[1, 1]))))
    assert symmetric_info_nce(a, b, s).item() == pytest.approx(0.5 * (ce_ab + ce_ba), rel=1e-5)
    # gathered negatives: the local rows at an offset inside the global batch
    extra_a, extra_b = torch.randn(3, 2), torch.randn(3, 2)
    local = symmetric_info_nce(a, b, s, torch.cat([extra_a, a]), torch.cat([extra_b, b]), offset=3)
    full_a, full_b = torch.cat([extra_a, a]), torch.cat([extra_b, b])
    an, bn = F.normalize(full_a, dim=-1), F.normalize(full_b, dim=-1)
    logits = s * an @ bn.T
    want = 0.5 * (F.cross_entropy(logits[3:], torch.tensor([3, 4])) + F.cross_entropy(logits.T[3:], torch.tensor([3, 4])))
    assert local.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        symmetric_info_nce(torch.zeros(0, 2), torch.zeros(0, 2), 1.0)


def test_temperature_and_pairs():
    term = ContrastiveLoss()
    assert term.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        term.logit_scale.fill_(math.log(500.0))
    assert term.scale().item() == pytest.approx(100.0, rel=1e-5)  # clamped
    feats = {m: torch.randn(4, 3) for m in "abc"}
    want = torch.stack([symmetric_info_nce(feats[x], feats[y], term.scale()) for x, y in (("a", "b"), ("a", "c"), ("b", "c"))]).mean()
    torch.testing.assert_close(term(feats), want)
    with pytest.raises(ModalityContractError, match="equal feature widths"):
        term({"a": torch.randn(4, 3), "b": torch.randn(4, 5)})
    projected = ContrastiveLoss(feature_dims={"a": 3, "b": 5}, projection_dim=4)
    value = projected({"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 5)})
    value.backward()
    assert projected.logit_scale.grad is not None and projected.projections["a"].weight.grad is not None


class Terms(TinyAV):
    def training_step(self, batch, batch_idx):
        feats = self.forward_features(batch)
        logits = self.fuse(feats, batch["target"], inputs={"audio": batch["audio"], "visual": batch["visual"]})
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


class ContrastiveAV(Terms):
    """The loss term attached in __init__ (the form that works under DDP)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.configure_loss_terms([ContrastiveLoss(feature_dims={"audio": 8, "visual": 8}, projection_dim=4, weight=0.5)])


@pytest.mark.timeout(300)
def test_ddp_gathers_negatives_and_matches_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    trainer = pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParams(str(ddp_dir))],
                                          devices=2, strategy="ddp_spawn", use_distributed_sampler=False))
    trainer.fit(ContrastiveAV(), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = ContrastiveAV()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(single, loader(batch_size=16))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    # without gathering (each rank its own negatives) the result would differ: the term matters
    plain = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(plain, loader(batch_size=16))
    assert (flat_params(plain) - flat_params(single)[: flat_params(plain).numel()]).abs().max() > 1e-3


def test_reconstruction_by_hand_and_in_lightning(tmp_path):
    term = ReconstructionLoss({"audio": 2, "visual": 1}, {"audio": 3, "visual": 2}, hidden=0,
                              modality_weights={"audio": 2.0, "visual": 1.0})
    with torch.no_grad():
        term.decoders["audio"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        term.decoders["audio"].bias.zero_()
        term.decoders["visual"].weight.fill_(1.0)
        term.decoders["visual"].bias.zero_()
    feats = {"audio": torch.tensor([[1.0, 2.0]]), "visual": torch.tensor([[3.0]])}
    inputs = {"audio": torch.tensor([[1.0, 2.0, 0.0]]), "visual": torch.tensor([[3.0, 1.0]])}
    total, per = term(feats, inputs)
    assert per["audio"].item() == pytest.approx(9.0 / 3)  # only the third output is off, by 3
    assert per["visual"].item() == pytest.approx(4.0 / 2)
    assert total.item() == pytest.approx(2.0 * 3.0 + 2.0)

    cb = LossTerms([ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5}, hidden=16)])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, log_every_n_steps=1))
    trainer.fit(Terms(), loader())
    assert "balance/reconstruction/mse/audio" in trainer.callback_metrics


def test_reconstruction_needs_inputs(tmp_path):
    model = TinyAV()
    model.configure_loss_terms([ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5})])
    batch = {"audio": torch.randn(4, 6), "visual": torch.randn(4, 5), "target": torch.randint(0, 4, (4,))}
    logits = model.fuse(model.forward_features(batch), batch["target"])
    with pytest.raises(ModalityContractError, match="inputs="):
        model.add_loss_terms(F.cross_entropy(logits, batch["target"]))
    with pytest.raises(ValueError, match="same modalities"):
        ReconstructionLoss({"audio": 8}, {"visual": 5})


def test_loss_terms_callback_refuses_ddp(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[LossTerms([ContrastiveLoss()])], devices=2,
                                          strategy="ddp_spawn", use_distributed_sampler=False))
    with pytest.raises(Exception, match="configure_loss_terms"):
        trainer.fit(Terms(), loader(batch_size=8))
