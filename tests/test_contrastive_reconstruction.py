"""Contrastive alignment and reconstruction loss terms: values by hand, parameters after several steps
against the recipes restated in plain torch (CLIP's symmetric InfoNCE; reconstruction as a per-modality
autoencoder and as MultiBench's MFM), temperature and weight decay, token features, DDP (negatives from
every rank with unequal per-rank batches, the logged value, inactive terms under the default DDP), bad input."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_balance import ContrastiveLoss, CosineHead, LossTerms, ModalityContractError, MultimodalMixin, ReconstructionLoss
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
    with pytest.raises(ModalityContractError, match=r"one \(N, D\) vector"):
        term({"a": torch.randn(4, 2, 3), "b": torch.randn(4, 2, 3)})
    projected = ContrastiveLoss(feature_dims={"a": 3, "b": 5}, projection_dim=4)
    with pytest.raises(ModalityContractError, match="feature_dims gives the"):
        projected({"a": torch.randn(4, 6), "b": torch.randn(4, 5)})
    value = projected({"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 5)})
    value.backward()
    assert projected.logit_scale.grad is not None and projected.projections["a"].weight.grad is not None


class Terms(TinyAV):
    def training_step(self, batch, batch_idx):
        feats = self.forward_features(batch)
        logits = self.fuse(feats, batch["target"], inputs={"audio": batch["audio"], "visual": batch["visual"]})
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


def test_the_temperature_is_left_out_of_weight_decay():
    model = Terms()
    model.configure_loss_terms([ContrastiveLoss(feature_dims={"audio": 8, "visual": 8}, projection_dim=4),
                                ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5}, hidden=0)])
    decay, no_decay = model.parameter_groups(weight_decay=0.1, lr=0.01)
    term = model.balance_losses["contrastive"]
    assert no_decay["weight_decay"] == 0.0 and [id(p) for p in no_decay["params"]] == [id(term.logit_scale)]
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == len(list(model.parameters())) - 1
    assert model.balance_losses["reconstruction"].no_weight_decay() == []  # the default
    torch.optim.AdamW(model.parameter_groups(weight_decay=0.1), lr=1e-3)  # the documented one line


# ---------------------------------------------------------------- fidelity: trained against the restated recipes
def _batches(epochs=2):
    return [b for _ in range(epochs) for b in loader()]


def test_contrastive_parameters_match_restated_clip_loss(tmp_path):
    model = Terms()
    model.configure_loss_terms([ContrastiveLoss(feature_dims={"audio": 8, "visual": 8}, projection_dim=4, weight=0.5)])
    reference = copy.deepcopy(model)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model, loader())

    # CLIP: logits = e^t * a_hat b_hat^T (e^t at most 100), loss = (CE(logits, i) + CE(logits^T, i)) / 2
    term = reference.balance_losses["contrastive"]
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for batch in _batches():
        za, zv = reference.audio_encoder(batch["audio"]), reference.visual_encoder(batch["visual"])
        ce = F.cross_entropy(reference.head(torch.cat([za, zv], dim=1)), batch["target"])
        pa, pv = term.projections["audio"](za), term.projections["visual"](zv)
        pa, pv = pa / pa.norm(dim=1, keepdim=True), pv / pv.norm(dim=1, keepdim=True)
        logits = torch.clamp(term.logit_scale, max=math.log(100)).exp() * pa @ pv.T
        labels = torch.arange(len(batch["target"]))
        clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        (ce + 0.5 * clip).backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def _decode(dec, u):
    """A two-layer decoder written out: W2 relu(W1 u + b1) + b2."""
    first, second = dec[0], dec[2]
    return torch.relu(u @ first.weight.T + first.bias) @ second.weight.T + second.bias


@pytest.mark.parametrize("form", ["autoencoder", "mfm"])
def test_reconstruction_parameters_match_the_restated_objective(tmp_path, form):
    model = Terms()
    model.configure_loss_terms([ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5}, hidden=16,
                                                   modality_weights={"audio": 1.0, "visual": 2.0}, form=form,
                                                   weight=0.5)])
    reference = copy.deepcopy(model)
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(model, loader())

    # autoencoder: x_m from z_m alone; MFM (MultiBench): x_m from [z_m ; fused], fused = [z_audio ; z_visual]
    decoders = reference.balance_losses["reconstruction"].decoders
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for batch in _batches():
        z = {"audio": reference.audio_encoder(batch["audio"]), "visual": reference.visual_encoder(batch["visual"])}
        fused = torch.cat([z["audio"], z["visual"]], dim=1)
        ce = F.cross_entropy(reference.head(fused), batch["target"])
        rec = 0.0
        for m, w in (("audio", 1.0), ("visual", 2.0)):
            u = z[m] if form == "autoencoder" else torch.cat([z[m], fused], dim=1)
            rec = rec + w * ((_decode(decoders[m], u) - batch[m]) ** 2).mean()
        opt.zero_grad()
        (ce + 0.5 * rec).backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


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

    # MFM: the audio decoder reads [z_a ; z_a ; z_v] = [1 ; 1 ; 2] with weights (1, 1, 2): 1 + 1 + 4 = 6 vs x = 4
    mfm = ReconstructionLoss({"audio": 1, "visual": 1}, {"audio": 1}, hidden=0, form="mfm")
    with torch.no_grad():
        mfm.decoders["audio"].weight.copy_(torch.tensor([[1.0, 1.0, 2.0]]))
        mfm.decoders["audio"].bias.zero_()
    za = torch.tensor([[1.0]], requires_grad=True)
    zv = torch.tensor([[2.0]], requires_grad=True)
    total, per = mfm({"audio": za, "visual": zv}, {"audio": torch.tensor([[4.0]])})
    assert total.item() == pytest.approx(4.0)
    total.backward()  # d/dz_v (6 - 4)^2 = 2 * 2 * 2: the visual encoder learns from audio's reconstruction
    assert zv.grad.item() == pytest.approx(8.0) and za.grad.item() == pytest.approx(2 * 2 * 2.0)
    auto = ReconstructionLoss({"audio": 1, "visual": 1}, {"audio": 1}, hidden=0)
    zv = torch.tensor([[2.0]], requires_grad=True)
    auto({"audio": torch.tensor([[1.0]], requires_grad=True), "visual": zv}, {"audio": torch.tensor([[4.0]])})[0].backward()
    assert zv.grad is None  # the autoencoder form never reaches another modality's encoder

    cb = LossTerms([ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5}, hidden=16)])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, log_every_n_steps=1))
    trainer.fit(Terms(), loader())
    assert "balance/reconstruction/mse/audio" in trainer.callback_metrics


def test_reconstruction_bad_input():
    model = TinyAV()
    model.configure_loss_terms([ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5})])
    batch = {"audio": torch.randn(4, 6), "visual": torch.randn(4, 5), "target": torch.randint(0, 4, (4,))}
    logits = model.fuse(model.forward_features(batch), batch["target"])
    with pytest.raises(ModalityContractError, match="inputs="):
        model.add_loss_terms(F.cross_entropy(logits, batch["target"]))
    with pytest.raises(ValueError, match="without a feature width"):
        ReconstructionLoss({"audio": 8}, {"visual": 5})
    with pytest.raises(ValueError, match="form"):
        ReconstructionLoss({"audio": 8}, {"audio": 5}, form="vae")
    model.configure_loss_terms([ReconstructionLoss({"audio": 8}, {"audio": 6}, form="mfm")])
    logits = model.fuse(model.forward_features(batch), batch["target"], inputs={"audio": batch["audio"]})
    with pytest.raises(ModalityContractError, match="every modality's features"):
        model.add_loss_terms(F.cross_entropy(logits, batch["target"]))


# ---------------------------------------------------------------- token features (N, T, D)
class TokenAV(MultimodalMixin, pl.LightningModule):
    """Token sequences (N, T=3, D=8) from per-token encoders; MMCosine's head pools them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio_encoder = nn.Linear(6, 8)
        self.visual_encoder = nn.Linear(5, 8)
        self.head = CosineHead([8, 8], 4)
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, fusion=self.head)
        self.configure_loss_terms([ContrastiveLoss(feature_dims={"audio": 8, "visual": 8}, projection_dim=4),
                                   ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 18, "visual": 15},
                                                      hidden=0, form="mfm")])


def test_token_features_are_pooled_not_flattened():
    model = TokenAV()
    x = {"audio": torch.randn(5, 3, 6), "visual": torch.randn(5, 3, 5)}
    y = torch.randint(0, 4, (5,))
    tokens = {"audio": model.audio_encoder(x["audio"]), "visual": model.visual_encoder(x["visual"])}
    logits = model.fuse(tokens, y, inputs=x)
    assert logits.shape == (5, 4)
    record = model.balance_record
    contrastive, _ = model.balance_losses["contrastive"].from_record(model, record)
    reconstruction, _ = model.balance_losses["reconstruction"].from_record(model, record)
    # by hand: one vector per sample, the mean of its tokens; decoders see D = 8 wide vectors
    va, vv = tokens["audio"].mean(1), tokens["visual"].mean(1)
    term = model.balance_losses["contrastive"]
    pa, pv = F.normalize(term.projections["audio"](va), dim=1), F.normalize(term.projections["visual"](vv), dim=1)
    sim = term.scale() * pa @ pv.T
    want = (F.cross_entropy(sim, torch.arange(5)) + F.cross_entropy(sim.T, torch.arange(5))) / 2
    torch.testing.assert_close(contrastive, want)
    dec = model.balance_losses["reconstruction"].decoders
    fused = torch.cat([va, vv], 1)
    want = sum(((dec[m](torch.cat([v, fused], 1)) - x[m].reshape(5, -1)) ** 2).mean()
               for m, v in (("audio", va), ("visual", vv)))
    torch.testing.assert_close(reconstruction, want)
    model.add_loss_terms(F.cross_entropy(logits, y)).backward()
    assert model.audio_encoder.weight.grad is not None


# ---------------------------------------------------------------- DDP
class GlobalBatch(Terms):
    """A contrastive term attached in __init__ (the form that works under DDP), and a cross-entropy that is
    the global batch's under DDP too (a sum scaled by world / 16: DDP averages), so that DDP with unequal
    per-rank batches can be compared with one process."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.configure_loss_terms([ContrastiveLoss(feature_dims={"audio": 8, "visual": 8}, projection_dim=4, weight=0.5)])

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"])
        world = self.trainer.world_size
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"], reduction="sum") * world / 16)


class SaveParamsAndLoss(SaveParams):
    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(float(trainer.callback_metrics["balance/contrastive/loss"]),
                   f"{self.directory}/loss{trainer.global_rank}.pt")


class GlobalBatchMasked(GlobalBatch):
    """The same with the batch's presence mask: the pairs are the samples of all ranks that have both."""

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch["present"])
        world = self.trainer.world_size
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"], reduction="sum") * world / 16)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("masked", [False, True])
def test_ddp_unequal_batches_match_one_process_and_log_the_global_loss(tmp_path, masked):
    # 63 samples: rank 0 reads 32 (batches 8, 8, 8, 8), rank 1 reads 31 (8, 8, 8, 7); one process: 16, 16, 16, 15
    net, missing = (GlobalBatchMasked, (0.3, 0.3)) if masked else (GlobalBatch, None)
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    trainer = pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParamsAndLoss(str(ddp_dir))], devices=2,
                                          strategy="ddp_spawn", use_distributed_sampler=False, log_every_n_steps=1))
    trainer.fit(net(), loader(n=63, batch_size=8, missing=missing))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = net()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, log_every_n_steps=1))
    trainer.fit(single, loader(n=63, batch_size=16, missing=missing))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    if masked:  # the mask reached the term: without it the same data trains other parameters
        plain = GlobalBatch()
        pl.Trainer(**trainer_kwargs(tmp_path)).fit(plain, loader(n=63, batch_size=16, missing=missing))
        assert (flat_params(plain) - flat_params(single)).abs().max() > 1e-3
    # the logged value is the global batch's loss (the last batch: 15 samples), on every rank
    logged = float(trainer.callback_metrics["balance/contrastive/loss"])
    for rank in (0, 1):
        assert torch.load(ddp_dir / f"loss{rank}.pt") == pytest.approx(logged, rel=1e-5)
    # without gathering (each rank its own negatives) the result would differ: the term matters
    plain = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(plain, loader(n=63, batch_size=16))
    assert (flat_params(plain) - flat_params(single)[: flat_params(plain).numel()]).abs().max() > 1e-3


class LateAndEarly(Terms):
    """A contrastive term from epoch 1 and a reconstruction term until epoch 0: in each epoch one term with
    parameters is inactive."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.configure_loss_terms([
            ContrastiveLoss(feature_dims={"audio": 8, "visual": 8}, projection_dim=4, weight=0.5, start_epoch=1),
            ReconstructionLoss({"audio": 8, "visual": 8}, {"audio": 6, "visual": 5}, hidden=4, weight=0.5, end_epoch=0),
        ])


def test_inactive_terms_get_zero_gradients():
    model = LateAndEarly()  # no trainer: epoch 0, the contrastive term is inactive
    batch = next(iter(loader()))
    logits = model.fuse(model.forward_features(batch), batch["target"], inputs={m: batch[m] for m in ("audio", "visual")})
    model.add_loss_terms(F.cross_entropy(logits, batch["target"])).backward()
    idle = list(model.balance_losses["contrastive"].parameters())
    assert all(p.grad is not None and not p.grad.any() for p in idle)


@pytest.mark.timeout(300)
def test_inactive_terms_under_default_ddp(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    trainer = pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParams(str(ddp_dir))], devices=2,
                                          strategy="ddp_spawn", use_distributed_sampler=False))
    trainer.fit(LateAndEarly(), loader(batch_size=8))  # find_unused_parameters=False: DDP's default
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = LateAndEarly()
    pl.Trainer(**trainer_kwargs(tmp_path)).fit(single, loader(batch_size=16))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_loss_terms_callback_refuses_ddp(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[LossTerms([ContrastiveLoss()])], devices=2,
                                          strategy="ddp_spawn", use_distributed_sampler=False))
    with pytest.raises(Exception, match="configure_loss_terms"):
        trainer.fit(Terms(), loader(batch_size=8))


def test_info_nce_is_float32_under_autocast():
    from lightning_balance.functional import symmetric_info_nce

    a, b = torch.randn(8, 16), torch.randn(8, 16)
    plain = symmetric_info_nce(a, b, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = symmetric_info_nce(a, b, torch.tensor(100.0))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)
