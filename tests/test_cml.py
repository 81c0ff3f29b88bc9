"""CML loss term: the official objective on hand-worked batches (2 and 3 modalities) and against an
independent restatement of the official code, parameters after several steps against that restatement,
the gates, nested subsets by feature masking (= split-head subtraction on a concat head), labels left out
by ignore_index, removal orders that resume mid-epoch, the loss-term mixin in Lightning (logging, YAML),
bad input."""

import copy
import math
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_balance.losses.cml as cml_module
from lightning_balance import CMLLoss, LossTerm, LossTerms, ModalityContractError, MultimodalMixin
from lightning_balance.functional import cml_ranking_penalty, removal_chains
from tests.helpers import TinyAV, flat_params, loader, trainer_kwargs

L3, L4, L9, L15 = math.log(3), math.log(4), math.log(9), math.log(1.5)


def official_objective(logits_list, target, beta=10, epsilon=0.0):
    """The official MIWAE objective (QingyangZhang/CML, miwae/train.py l. 280-304) restated with explicit
    loops: task loss averaged over the M subsets, both ranking terms summed over the batch, times beta/100."""
    m = len(logits_list)
    cls_loss = 0.0
    confidence, predict = [], []
    for logits in logits_list:
        cls_loss = cls_loss + F.cross_entropy(logits, target)
        probability = F.softmax(logits, dim=1)
        conf, pred = torch.max(probability, dim=1)
        confidence.append(conf)
        predict.append(pred)
    cls_loss = cls_loss / m
    rank_loss = 0.0
    for j in range(m - 1):
        sign = (predict[j] == target).float()  # trick 1: the larger subset is right
        rank_loss = rank_loss + F.relu((confidence[j + 1] - confidence[j]) * sign - epsilon).sum()
        sign1 = ((predict[j + 1] != target) & (predict[j] != target)).float()  # trick 2: both wrong
        rank_loss = rank_loss + F.relu((confidence[j + 1] - confidence[j].detach()) * sign1 - epsilon).sum()
    return cls_loss + rank_loss * beta / 100


# Two modalities, 3 samples, 2 classes. softmax(ln3, 0) = (.75, .25), softmax(ln4, 0) = (.8, .2).
#   sample 0 (y=0): all .75 right, subset .8 right -> larger right: [.8 - .75]+ = .05
#   sample 1 (y=0): all .75 wrong (class 1), subset .8 wrong -> both wrong: [.8 - sg(.75)]+ = .05
#   sample 2 (y=1): all .8 right, subset .5 -> [.5 - .8]+ = 0
CHAIN_2 = torch.tensor([[[L3, 0.0], [0.0, L3], [0.0, L4]],
                        [[L4, 0.0], [0.0, L4], [0.0, 0.0]]])
Y_2 = torch.tensor([0, 0, 1])
CE_2 = [(-math.log(.75) - math.log(.25) - math.log(.8)) / 3, (-math.log(.8) - math.log(.2) - math.log(.5)) / 3]
R_2 = 0.05 + 0.05
# Three modalities, 2 samples. softmax(ln9, 0) = (.9, .1), softmax(0, ln1.5) = (.4, .6).
#   sample 0 (y=0): S0 .75 right, S1 .8 right, S2 .6 wrong -> j=0: .05 ; j=1: [.6 - .8]+ = 0
#   sample 1 (y=1): S0 .75 wrong, S1 .8 right, S2 .9 wrong -> j=0: larger wrong, smaller right: 0 ; j=1: .9 - .8 = .1
CHAIN_3 = torch.tensor([[[L3, 0.0], [L3, 0.0]],
                        [[L4, 0.0], [0.0, L4]],
                        [[0.0, L15], [L9, 0.0]]])
Y_3 = torch.tensor([0, 1])
CE_3 = [(-math.log(.75) - math.log(.25)) / 2, -math.log(.8), (-math.log(.4) - math.log(.1)) / 2]
R_3 = 0.05 + 0.1


def test_official_objective_on_hand_worked_batches():
    for chain, y, ce, r in ((CHAIN_2, Y_2, CE_2, R_2), (CHAIN_3, Y_3, CE_3, R_3)):
        m = chain.shape[0]
        by_hand = sum(ce) / m + 0.1 * r  # the official objective, worked on paper
        assert by_hand == pytest.approx(0.74714 if m == 2 else 0.90486, abs=1e-5)
        restated = official_objective(list(chain), y)
        assert restated.item() == pytest.approx(by_hand, rel=1e-6)
        # your cross-entropy on all modalities + the term = M x the official objective
        total = F.cross_entropy(chain[0], y) + CMLLoss()(chain, y)
        assert (total / m).item() == pytest.approx(by_hand, rel=1e-6)
        # per-sample penalties by hand
        expected = [0.05, 0.05, 0.0] if m == 2 else [0.05, 0.1]
        assert cml_ranking_penalty(chain, y).tolist() == pytest.approx(expected, abs=1e-6)
    # the mean variant (the one this library shipped first, for two modalities: 0.1 x the batch mean of
    # the first term, plus the subset's cross-entropy)
    first = CMLLoss(reduction="mean", both_wrong=False, rank_weight=0.05)(CHAIN_2, Y_2)
    assert first.item() == pytest.approx(CE_2[1] + 0.1 * 0.05 / 3, rel=1e-6)


def test_second_term_pushes_only_the_smaller_subset():
    chain = CHAIN_2.clone().requires_grad_(True)
    CMLLoss(subset_weight=0.0)(chain, Y_2).backward()
    grad = chain.grad
    assert grad[0, 0].abs().sum() > 0 and grad[1, 0].abs().sum() > 0  # trick 1: both confidences
    assert grad[0, 1].abs().sum() == 0 and grad[1, 1].abs().sum() > 0  # trick 2: stop-gradient on the larger
    assert grad[:, 2].abs().sum() == 0  # satisfied hinge


def test_gates_by_hand():
    # sample 0 of the 2-modality batch: larger right; sample 1: both wrong; sample 2: satisfied
    assert cml_ranking_penalty(CHAIN_2, Y_2, both_wrong=False).tolist() == pytest.approx([0.05, 0, 0], abs=1e-6)
    assert cml_ranking_penalty(CHAIN_2, Y_2, gate="cpm", both_wrong=False).tolist() == pytest.approx([0.05, 0.05, 0], abs=1e-6)
    # cpm gates out exactly "larger wrong, smaller right": sample 1, j = 0 of the 3-modality batch
    assert cml_ranking_penalty(CHAIN_3, Y_3, gate="cpm", both_wrong=False).tolist() == pytest.approx([0.05, 0.1], abs=1e-6)
    assert cml_ranking_penalty(CHAIN_3, Y_3, gate="all", both_wrong=False).tolist() == pytest.approx([0.05, 0.05 + 0.1], abs=1e-6)
    assert cml_ranking_penalty(CHAIN_2, Y_2, margin=0.01).tolist() == pytest.approx([0.04, 0.04, 0], abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        cml_ranking_penalty(CHAIN_2[:1], Y_2)


def test_ignored_samples_are_left_out():
    # a fourth sample with the ignore label: every statistic is that of the three labelled samples
    chain = torch.cat([CHAIN_2, torch.tensor([[[0.0, 5.0]], [[9.0, 0.0]]])], dim=1)
    y = torch.tensor([0, 0, 1, -100])
    valid = y != -100
    value = CMLLoss()(chain, y, valid)
    assert value.item() == pytest.approx(CE_2[1] + 2 * 0.1 * R_2, rel=1e-6)
    mean = CMLLoss(reduction="mean")(chain, y, valid)
    assert mean.item() == pytest.approx(CE_2[1] + 2 * 0.1 * R_2 / 3, rel=1e-6)


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
    chains = CMLLoss().chain_logits(model, model.balance_record, generator=torch.Generator().manual_seed(3))
    order = removal_chains(2, 6, generator=torch.Generator().manual_seed(3))
    assert chains.shape == (2, 6, 4)
    torch.testing.assert_close(chains[0], model.balance_record.logits)
    w = model.head.weight
    split = {"audio": feats["audio"] @ w[:, :8].T, "visual": feats["visual"] @ w[:, 8:].T}
    full = model.balance_record.logits
    for i in range(6):
        removed = ["audio", "visual"][order[i, 0]]
        torch.testing.assert_close(chains[1, i], full[i] - split[removed][i])  # BalanceBenchmark's subtraction


# ---------------------------------------------------------------- training against the restated objective
class MDataset(Dataset):
    """M random modalities, 3 classes; every fifth sample unlabelled (ignore_index -100)."""

    def __init__(self, dims, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = {f"m{k}": torch.randn(n, d, generator=g) + self.y[:, None] * (k + 1) * 0.3 for k, d in enumerate(dims)}
        self.y[::5] = -100

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {**{m: x[i] for m, x in self.x.items()}, "target": self.y[i]}


class ResumableLoader(DataLoader):
    """In-order batches that resume mid-epoch: its state is how many batches of the epoch it has yielded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.yielded, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self.yielded += 1
                yield batch

    def state_dict(self):
        return {"yielded": self.yielded}

    def load_state_dict(self, state):
        self._skip = state["yielded"]


class TinyM(MultimodalMixin, pl.LightningModule):
    def __init__(self, dims=(3, 2), seed=0, term: Optional[LossTerm] = None):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleDict({f"m{k}": nn.Sequential(nn.Linear(d, 4), nn.Tanh()) for k, d in enumerate(dims)})
        self.head = nn.Linear(4 * len(dims), 3)
        self.configure_modalities(dict(self.encoders.items()), head=self.head)
        self.configure_loss_terms([term if term is not None else CMLLoss()])
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["target"].tolist())
        logits = self.fuse({m: self.encoders[m](batch[m]) for m in self.modalities}, batch["target"])
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


@pytest.mark.parametrize("dims", [(3, 2), (3, 2, 4)])
def test_parameters_match_the_restated_official_objective(tmp_path, monkeypatch, dims):
    orders = []

    def recording(*args, **kwargs):
        order = removal_chains(*args, **kwargs)
        orders.append(order.clone())
        return order

    monkeypatch.setattr(cml_module, "removal_chains", recording)
    model = TinyM(dims)
    reference = copy.deepcopy(model)
    data = MDataset(dims)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, DataLoader(data, batch_size=8))
    assert len(orders) == 8

    # the same model trained by hand on M x the official objective (your CE on all modalities has weight 1
    # instead of 1/M), removed modalities' features set to zero, unlabelled samples dropped
    names = list(reference.encoders)
    m = len(names)
    opt = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9)
    batches = [b for _ in range(2) for b in DataLoader(data, batch_size=8)]
    for batch, order in zip(batches, orders):
        z = {k: reference.encoders[k](batch[k]) for k in names}
        logits_list = []
        for j in range(m):  # subset S_j: each sample without the first j modalities of its order
            rows = []
            for i in range(len(batch["target"])):
                removed = {names[int(o)] for o in order[i, :j]}
                rows.append(reference.head(torch.cat([z[k][i] * (k not in removed) for k in names])))
            logits_list.append(torch.stack(rows))
        keep = batch["target"] != -100
        loss = m * official_objective([lg[keep] for lg in logits_list], batch["target"][keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_resume_mid_epoch_draws_the_same_removal_orders(tmp_path):
    data = MDataset((3, 2), n=48)

    def make_loader():
        return ResumableLoader(data, batch_size=8)  # 6 batches per epoch

    straight = TinyM()
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=2)).fit(straight, make_loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    interrupted = TinyM()
    pl.Trainer(**trainer_kwargs(tmp_path / "b", max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)).fit(
        interrupted, make_loader())
    resumed = TinyM(seed=7)  # other initial weights and another removal seed: both come from the checkpoint
    pl.Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=2)).fit(
        resumed, make_loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert resumed.seen == straight.seen[3:]  # the resumed run sees the uninterrupted run's remaining batches
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=0, atol=1e-7)
    assert torch.equal(resumed.balance_losses["cml"].rng_state, straight.balance_losses["cml"].rng_state)
    assert int(straight.balance_losses["cml"].rng_state[1]) == 12  # one draw per training step


# ---------------------------------------------------------------- the mixin, logging, YAML, bad input
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
    for kwargs, match in (({"rank_weight": -1}, "rank_weight"), ({"gate": "x"}, "gate"), ({"weight": -1}, "weight"),
                          ({"reduction": "max"}, "reduction"), ({"seed": -1}, "seed"), ({"both_wrong": 1}, "both_wrong")):
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
            init_args: {rank_weight: 0.3, gate: cpm, both_wrong: false, reduction: mean, seed: 4, weight: 2.0}
""")
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(WithTerms, args=["--config", str(config)], run=False, save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, LossTerms))
    term = cb.terms[0]
    assert (term.rank_weight, term.gate, term.both_wrong, term.reduction, term.weight) == (0.3, "cpm", False, "mean", 2.0)
    assert term.rng_state.tolist() == [4, 0]


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
    - class_path: lightning_balance.ReconstructionLoss
      init_args: {feature_dims: {audio: 8, visual: 8}, input_dims: {audio: 6}, form: mfm}
""")
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TermsFromInit, args=["--config", str(config)], run=False, save_config_callback=None)
    terms = cli.model.balance_losses
    assert set(terms) == {"cml", "contrastive", "reconstruction"}
    assert terms["cml"].rank_weight == 0.5 and terms["contrastive"].weight == 0.2
    assert terms["reconstruction"].form == "mfm"


def test_samples_that_lack_a_modality_have_the_chain_of_the_modalities_they_have():
    """Two modalities: a complete sample has the chain {a, v} -> its one kept modality; a sample that lacks one
    has the chain of its single modality, which adds nothing. Restated by hand from the documented stream."""
    from lightning_balance import MultimodalMixin  # noqa: F401  (the model is TinyAV)

    torch.manual_seed(0)
    model = TinyAV()
    term = CMLLoss(seed=13)
    model.configure_loss_terms([term])
    n = 8
    batch = {"audio": torch.randn(n, 6), "visual": torch.randn(n, 5), "target": torch.randint(0, 4, (n,))}
    present = {"audio": torch.tensor([True] * 6 + [False, True]), "visual": torch.tensor([True] * 6 + [True, False])}
    feats = model.forward_features(batch)
    model.fuse(feats, batch["target"], present=present)
    value, _ = term.from_record(model, model.balance_record)
    # the stream of CMLLoss(seed=13) at step 0: splitmix of (13, 0), keys U(0, 1) of shape (N, M)
    x = (13 * 0x9E3779B97F4A7C15 + 0 * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    keys = torch.rand(n, 2, generator=torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF))
    w, b = model.head.weight, model.head.bias
    za, zv = feats["audio"], feats["visual"]
    y = batch["target"]
    ce, ranked = 0.0, 0.0
    for i in range(6):  # complete samples: remove the modality with the smaller key first
        full = torch.cat([za[i], zv[i]]) @ w.T + b
        kept = torch.cat([za[i], torch.zeros(8)]) if keys[i, 0] > keys[i, 1] else torch.cat([torch.zeros(8), zv[i]])
        sub = kept @ w.T + b
        ce += float(F.cross_entropy(sub[None], y[i:i + 1]))
        c0, c1 = float(F.softmax(full, -1).max()), float(F.softmax(sub, -1).max())
        right0, right1 = int(full.argmax()) == int(y[i]), int(sub.argmax()) == int(y[i])
        ranked += max(c1 - c0, 0.0) * right0 + max(c1 - c0, 0.0) * (not right0 and not right1)
    expected = ce / n + 2 * 0.1 * ranked  # samples 6 and 7: a chain of one modality, nothing added
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [1, 3])
def test_three_modalities_with_absent_ones_restated_by_hand(seed):
    """M = 3: a sample's absent modalities are removed first (no-op steps), its present ones in the order of its
    keys (the documented stream); only the real removals add a cross-entropy and a ranking term."""
    from tests.helpers import MultiMLP

    torch.manual_seed(0)
    dims = {"a": 3, "b": 4, "c": 5}
    model = MultiMLP(dims, classes=4)
    term = CMLLoss(seed=seed)
    model.configure_loss_terms([term])
    n = 10
    batch = {m: torch.randn(n, d) for m, d in dims.items()}
    y = torch.randint(0, 4, (n,))
    have = torch.ones(n, 3, dtype=torch.bool)
    have[0, 0] = have[1, 1] = have[2, 2] = False
    have[3, :2] = False
    have[4, 1:] = False
    feats = {m: model.encoders[m](batch[m]) for m in dims}
    model.train()
    model.fuse(feats, y, present={m: have[:, i] for i, m in enumerate(dims)})
    value, _ = term.from_record(model, model.balance_record)
    x = (seed * 0x9E3779B97F4A7C15 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    keys = torch.rand(n, 3, generator=torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF))
    w, b = model.head.weight, model.head.bias

    def logits(i, keep):  # the concat head, absent and removed features zero
        return torch.cat([feats[m][i] * float(keep[k]) for k, m in enumerate(dims)]) @ w.T + b

    ce = ranked = 0.0
    for i in range(n):
        order = sorted([k for k in range(3) if have[i, k]], key=lambda k: float(keys[i, k]))
        keep = [bool(have[i, k]) for k in range(3)]
        prev = logits(i, keep)
        for k in order[:-1]:  # each real removal
            keep[k] = False
            cur = logits(i, keep)
            ce += float(F.cross_entropy(cur[None], y[i:i + 1]))
            c0, c1 = float(F.softmax(prev, -1).max()), float(F.softmax(cur, -1).max())
            right0, right1 = int(prev.argmax()) == int(y[i]), int(cur.argmax()) == int(y[i])
            ranked += max(c1 - c0, 0.0) * right0 + max(c1 - c0, 0.0) * (not right0 and not right1)
            prev = cur
    assert value.item() == pytest.approx(ce / n + 3 * 0.1 * ranked, rel=1e-5)
    # the stream is the same with or without a mask: complete samples keep their order
    plain = removal_chains(3, n, generator=torch.Generator().manual_seed(1))
    masked = removal_chains(3, n, generator=torch.Generator().manual_seed(1), present=have)
    assert torch.equal(plain[5:], masked[5:])
