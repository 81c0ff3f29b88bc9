"""CML loss term: the ranking penalty by hand, nested subsets by feature masking (= split-head
subtraction on a concat head), the loss-term mixin in Lightning (logging, YAML), bad input."""

import math
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import CMLLoss, LossTerm, LossTerms, ModalityContractError
from lightning_balance.functional import cml_ranking_penalty, removal_chains
from tests.helpers import TinyAV, loader, trainer_kwargs


def test_ranking_penalty_by_hand():
    # sample 0: full conf = softmax(2,0)[0] = e^2/(e^2+1), subset conf = softmax(0,3)[1] = e^3/(e^3+1) > full -> violation
    # sample 1: full conf = softmax(0,1)[1], subset conf = softmax(0,0) = 0.5 < full -> no violation
    chain = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 0.0]]])
    y = torch.tensor([0, 1])
    conf_full0 = math.exp(2) / (math.exp(2) + 1)
    conf_sub0 = math.exp(3) / (math.exp(3) + 1)
    penalty = cml_ranking_penalty(chain, y, gate="all")
    assert penalty.tolist() == pytest.approx([conf_sub0 - conf_full0, 0.0], rel=1e-5, abs=1e-7)
    # margin
    assert cml_ranking_penalty(chain, y, margin=0.05, gate="all")[0].item() == pytest.approx(conf_sub0 - conf_full0 - 0.05, rel=1e-5)
    # gate: sample 0's full prediction is correct (class 0) -> kept; make it wrong -> gated out
    assert cml_ranking_penalty(chain, y)[0].item() == pytest.approx(conf_sub0 - conf_full0, rel=1e-5)
    assert cml_ranking_penalty(chain, torch.tensor([1, 1]))[0].item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        cml_ranking_penalty(chain[:1], y)


def test_removal_chains_are_permutations():
    order = removal_chains(3, 50, generator=torch.Generator().manual_seed(0))
    assert order.shape == (50, 3)
    assert torch.equal(order.sort(dim=1).values, torch.arange(3).expand(50, 3))


def test_chain_logits_equal_split_head_subtraction():
    torch.manual_seed(0)
    model = TinyAV()
    batch = {"audio": torch.randn(6, 6), "visual": torch.randn(6, 5), "target": torch.randint(0, 4, (6,))}
    feats = model.forward_features(batch)
    model.fuse(feats, batch["target"])
    term = CMLLoss()
    torch.manual_seed(3)
    chains = term.chain_logits(model, model.balance_record)
    torch.manual_seed(3)
    order = removal_chains(2, 6)
    assert chains.shape == (2, 6, 4)
    torch.testing.assert_close(chains[0], model.balance_record.logits)
    w = model.head.weight
    split = {"audio": feats["audio"] @ w[:, :8].T, "visual": feats["visual"] @ w[:, 8:].T}
    full = model.balance_record.logits
    for i in range(6):
        removed = ["audio", "visual"][order[i, 0]]
        torch.testing.assert_close(chains[1, i], full[i] - split[removed][i])  # BalanceBenchmark's subtraction


def test_value_and_standalone_use():
    term = CMLLoss(rank_weight=0.5, subset_weight=2.0, gate="all")
    chain = torch.randn(3, 5, 4)
    y = torch.randint(0, 4, (5,))
    want = 0.5 * cml_ranking_penalty(chain, y, gate="all").mean() + 2.0 * torch.stack(
        [F.cross_entropy(chain[1], y), F.cross_entropy(chain[2], y)]).mean()
    torch.testing.assert_close(term(chain, y), want)


class WithTerms(TinyAV):
    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"])
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


def test_in_lightning_with_the_callback(tmp_path):
    torch.manual_seed(0)
    model = WithTerms()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[LossTerms([CMLLoss(rank_weight=1.0)])],
                                          max_epochs=1, log_every_n_steps=1))
    trainer.fit(model, loader())
    for key in ("balance/cml/loss", "balance/cml/penalty", "balance/cml/violations"):
        assert key in trainer.callback_metrics
    assert isinstance(model.balance_losses["cml"], CMLLoss)


def test_the_term_changes_the_gradient():
    torch.manual_seed(0)
    model = WithTerms()
    model.configure_loss_terms([CMLLoss(rank_weight=0.0, subset_weight=1.0)])
    batch = {"audio": torch.randn(8, 6), "visual": torch.randn(8, 5), "target": torch.randint(0, 4, (8,))}
    logits = model.fuse(model.forward_features(batch), batch["target"])
    plain = F.cross_entropy(logits, batch["target"])
    total = model.add_loss_terms(plain)
    assert total.item() > plain.item()
    total.backward()
    assert all(p.grad is not None for p in model.audio_encoder.parameters())


def test_bad_input():
    model = WithTerms()
    batch = {"audio": torch.randn(4, 6), "visual": torch.randn(4, 5)}
    logits = model.fuse(model.forward_features(batch))
    with pytest.raises(ModalityContractError, match="configure_loss_terms"):
        model.add_loss_terms(logits.sum())
    model.configure_loss_terms([CMLLoss()])
    with pytest.raises(ModalityContractError, match="targets"):
        model.add_loss_terms(logits.sum())
    empty = {"audio": torch.randn(0, 6), "visual": torch.randn(0, 5)}
    model.fuse(model.forward_features(empty), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ModalityContractError, match="empty batch"):
        model.add_loss_terms(torch.zeros(()))
    with pytest.raises(ModalityContractError, match="named 'cml'"):
        model.configure_loss_terms([CMLLoss(), CMLLoss()])
    for kwargs, match in (({"rank_weight": -1}, "rank_weight"), ({"gate": "x"}, "gate"), ({"weight": -1}, "weight")):
        with pytest.raises(ValueError, match=match):
            CMLLoss(**kwargs)
    with pytest.raises(ValueError, match="at least one"):
        LossTerms([])


def test_yaml(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse", reason="jsonargparse (the `cli` extra) is not installed")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text("""
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  callbacks:
    - class_path: lightning_balance.LossTerms
      init_args:
        terms:
          - class_path: lightning_balance.CMLLoss
            init_args: {rank_weight: 0.3, gate: all, weight: 2.0}
""")
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(WithTerms, args=["--config", str(config)], run=False, save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, LossTerms))
    term = cb.terms[0]
    assert (term.rank_weight, term.gate, term.weight) == (0.3, "all", 2.0)


class TermsFromInit(WithTerms):
    """Loss terms as a model init argument (the form that also works under DDP), set from YAML."""

    def __init__(self, loss_terms: Optional[list[LossTerm]] = None, lr: float = 0.1):
        super().__init__(lr=lr)
        if loss_terms:
            self.configure_loss_terms(loss_terms)


def test_yaml_model_init_argument(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse", reason="jsonargparse (the `cli` extra) is not installed")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text("""
trainer: {accelerator: cpu, max_epochs: 1, logger: false, enable_checkpointing: false}
model:
  loss_terms:
    - class_path: lightning_balance.CMLLoss
      init_args: {rank_weight: 0.5}
    - class_path: lightning_balance.ContrastiveLoss
      init_args: {weight: 0.2}
""")
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TermsFromInit, args=["--config", str(config)], run=False, save_config_callback=None)
    terms = cli.model.balance_losses
    assert set(terms) == {"cml", "contrastive"}
    assert terms["cml"].rank_weight == 0.5 and terms["contrastive"].weight == 0.2
