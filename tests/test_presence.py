"""Absent modalities in the contract: the presence mask of `fuse`, the fills (zeros, learned, a fusion that
takes the mask), subset passes, unimodal logits and losses over the present samples only, bad masks."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_balance import ModalityContractError, MultimodalMixin
from tests.helpers import DictDataset, GatedFusion, TinyAV, trainer_kwargs


def batch(n=6, seed=0):
    ds = DictDataset(n=n, seed=seed)
    return {"audio": ds.a, "visual": ds.v, "target": ds.y}


PRESENT = {"audio": torch.tensor([True, False, True, True, False, True]),
           "visual": torch.tensor([True, True, False, True, True, True])}


def test_absent_features_are_replaced_by_zeros_before_the_concat_head():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    poisoned = {m: torch.where(PRESENT[m][:, None], z, torch.full_like(z, float("nan"))) for m, z in feats.items()}
    logits = model.fuse(poisoned, b["target"], present=PRESENT)
    # by hand: absent rows are zero in the concatenation
    za = feats["audio"] * PRESENT["audio"][:, None]
    zv = feats["visual"] * PRESENT["visual"][:, None]
    expected = torch.cat([za, zv], 1) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(logits, expected)
    record = model.balance_record
    assert not record.complete and torch.equal(record.presence("audio"), PRESENT["audio"])
    # the (N, M) form says the same
    matrix = torch.stack([PRESENT["audio"], PRESENT["visual"]], 1)
    torch.testing.assert_close(model.fuse(poisoned, b["target"], present=matrix), expected)
    # no gradient reaches what stood in an absent sample's features
    raw = {m: z.detach().clone().requires_grad_() for m, z in feats.items()}
    model.fuse(raw, b["target"], present=PRESENT).sum().backward()
    assert raw["audio"].grad[~PRESENT["audio"]].abs().sum() == 0
    assert raw["audio"].grad[PRESENT["audio"]].abs().sum() > 0


def test_counted_samples_are_labelled_and_present():
    model = TinyAV()
    b = batch()
    targets = b["target"].clone()
    targets[0] = -100
    model.fuse(model.forward_features(b), targets, present=PRESENT)
    record = model.balance_record
    assert record.counted("audio").tolist() == [False, False, True, True, False, True]
    assert record.counted("visual").tolist() == [False, True, False, True, True, True]
    model.fuse(model.forward_features(b), targets)
    assert model.balance_record.complete and model.balance_record.counted("audio").tolist() == [False] + [True] * 5


def test_unimodal_logits_and_losses_count_present_samples_only():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    model.fuse(feats, b["target"], present=PRESENT)
    total = model.add_unimodal_losses(torch.tensor(0.0, requires_grad=True))
    terms = model.balance_record.extras["objective"]
    w = model.head.weight
    for m, cols in (("audio", slice(0, 8)), ("visual", slice(8, 16))):
        keep = PRESENT[m]
        logits = feats[m][keep] @ w[:, cols].T + model.head.bias / 2  # the split head on present rows
        # summed over the present rows, divided by all 6 labelled samples: absent ones add 0
        torch.testing.assert_close(terms[m], F.cross_entropy(logits, b["target"][keep], reduction="sum") / 6)
    torch.testing.assert_close(total, terms["audio"] + terms["visual"])
    uni = model.balance_record.unimodal_logits()
    torch.testing.assert_close(uni["audio"][PRESENT["audio"]],
                               (feats["audio"][PRESENT["audio"]] @ w[:, :8].T + model.head.bias / 2).detach())


def test_subset_passes_combine_the_subset_with_each_samples_presence():
    model = TinyAV(fusion="gated")
    b = batch()
    feats = model.forward_features(b)
    only_audio = model.fuse_subset(feats, ["audio"], present=PRESENT)
    za = feats["audio"] * PRESENT["audio"][:, None]
    torch.testing.assert_close(only_audio, model.fusion(za, torch.zeros_like(feats["visual"])))
    # without a mask: the old behaviour, the other modality zeroed for everyone
    torch.testing.assert_close(model.fuse_subset(feats, ["audio"]),
                               model.fusion(feats["audio"], torch.zeros_like(feats["visual"])))
    # masked unimodal logits are subset passes too
    model.fuse(feats, b["target"], present=PRESENT)
    torch.testing.assert_close(model.balance_record.unimodal_logits()["audio"], only_audio.detach())


class MaskedAttentionFusion(nn.Module):
    """Attention over the modality tokens with a key padding mask: takes `present` itself."""

    def __init__(self, d=8, classes=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.query = nn.Parameter(torch.randn(1, 1, d))
        self.out = nn.Linear(d, classes)
        self.seen = []

    def forward(self, za, zv, present=None):
        self.seen.append(present)
        tokens = torch.stack([za, zv], 1)
        # an all-absent row (the empty coalition of a subset pass) attends to nothing: give it zeros
        empty = ~present.any(1)
        mask = ~present
        mask[empty] = False
        pooled, _ = self.attn(self.query.expand(len(za), -1, -1), tokens, tokens, key_padding_mask=mask)
        pooled = torch.where(empty[:, None, None], torch.zeros_like(pooled), pooled)
        return self.out(pooled[:, 0])


class AttentionModel(MultimodalMixin, pl.LightningModule):
    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.audio_encoder = nn.Linear(6, 8)
        self.visual_encoder = nn.Linear(5, 8)
        self.fusion = MaskedAttentionFusion()
        self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder},
                                  fusion=self.fusion, **kwargs)


def test_a_fusion_that_takes_the_mask_gets_it_and_untouched_features():
    model = AttentionModel()
    assert model.modality_spec.missing == "none" and model.modality_spec.fusion_takes_present
    b = batch()
    feats = {"audio": model.audio_encoder(b["audio"]), "visual": model.visual_encoder(b["visual"])}
    poisoned = {m: torch.where(PRESENT[m][:, None], z, torch.full_like(z, 1e6)) for m, z in feats.items()}
    logits = model.fuse(poisoned, b["target"], present=PRESENT)
    assert torch.equal(model.fusion.seen[-1], torch.stack([PRESENT["audio"], PRESENT["visual"]], 1))
    assert model.balance_record.features["audio"] is poisoned["audio"]  # nothing was filled
    # the key padding mask hides the garbage: same logits as with the true features
    torch.testing.assert_close(logits, model.fuse(feats, b["target"], present=PRESENT))
    model.fuse(feats, b["target"])
    assert bool(model.fusion.seen[-1].all())  # no mask given: all present
    model.fuse_subset(feats, ["visual"], present=PRESENT)
    assert model.fusion.seen[-1][:, 0].sum() == 0 and torch.equal(model.fusion.seen[-1][:, 1], PRESENT["visual"])
    # such a fusion may still ask for a fill
    filled = AttentionModel(missing="zeros")
    assert filled.modality_spec.missing == "zeros"


def test_the_learned_missing_embedding_stands_in_and_learns():
    class Learned(TinyAV):
        def __init__(self):
            super().__init__()
            self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, head=self.head,
                                      missing="learned", feature_dims={"audio": 8, "visual": 8})

    model = Learned()
    emb = model.missing_embeddings
    assert emb["audio"].shape == (8,) and bool((emb["audio"] == 0).all())  # starts as the zero fill
    with torch.no_grad():
        emb["audio"].fill_(0.5)
    b = batch()
    feats = model.forward_features(b)
    logits = model.fuse(feats, b["target"], present=PRESENT)
    za = torch.where(PRESENT["audio"][:, None], feats["audio"], torch.full_like(feats["audio"], 0.5))
    zv = feats["visual"] * PRESENT["visual"][:, None]
    torch.testing.assert_close(logits, torch.cat([za, zv], 1) @ model.head.weight.T + model.head.bias)
    F.cross_entropy(logits, b["target"]).backward()
    assert emb["audio"].grad.abs().sum() > 0 and emb["visual"].grad.abs().sum() > 0
    # removing a modality in a subset pass uses the same embedding
    torch.testing.assert_close(model.fuse_without(feats, "audio"),
                               torch.cat([torch.full_like(feats["audio"], 0.5), feats["visual"]], 1)
                               @ model.head.weight.T + model.head.bias)
    # it is a parameter of the module: trained and checkpointed, not part of any encoder's group
    assert any(p is emb["audio"] for p in model.parameters())
    assert not any(p is emb["audio"] for p in model.modality_parameters("audio"))


def test_a_fit_with_absent_modalities_trains_and_never_sees_the_garbage(tmp_path):
    ds = DictDataset(n=64, missing=(0.3, 0.3))
    assert ds.present.all(1).sum() < 64 and ds.present.any(1).all()
    model = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, torch.utils.data.DataLoader(ds, batch_size=16))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_masks_name_the_problem():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    nobody = {"audio": PRESENT["audio"], "visual": ~PRESENT["audio"] & False}
    with pytest.raises(ModalityContractError, match=r"2 sample\(s\) have no modality at all \(rows \[1, 4\]\)"):
        model.fuse(feats, b["target"], present=nobody)
    with pytest.raises(ModalityContractError, match="must be a bool .* not a weight"):
        model.fuse(feats, b["target"], present={"audio": PRESENT["audio"].float()})
    with pytest.raises(ModalityContractError, match=r"must have shape \(6,\)"):
        model.fuse(feats, b["target"], present={"audio": PRESENT["audio"][:4]})
    with pytest.raises(ModalityContractError, match=r"unknown modalities \['depth'\]"):
        model.fuse(feats, b["target"], present={"depth": PRESENT["audio"]})
    with pytest.raises(ModalityContractError, match=r"\(N, M\) = \(6, 2\)"):
        model.fuse(feats, b["target"], present=torch.ones(6, 3, dtype=torch.bool))
    # 0/1 integers are read as bool
    model.fuse(feats, b["target"], present={"audio": PRESENT["audio"].long()})
    assert model.balance_record.presence("audio").dtype == torch.bool


def test_bad_declarations_of_the_fill():
    base = TinyAV()
    with pytest.raises(ModalityContractError, match="feature_dims=\\{'audio': D, 'visual': D\\}"):
        base.configure_modalities({"audio": base.audio_encoder, "visual": base.visual_encoder}, head=base.head,
                                  missing="learned")
    with pytest.raises(ModalityContractError, match="missing='none'.*has no `present` argument"):
        base.configure_modalities({"audio": base.audio_encoder, "visual": base.visual_encoder}, head=base.head,
                                  missing="none")
    with pytest.raises(ModalityContractError, match="is not one of 'auto', 'zeros', 'learned', 'none'"):
        base.configure_modalities({"audio": base.audio_encoder, "visual": base.visual_encoder}, head=base.head,
                                  missing="mean")
    with pytest.raises(ModalityContractError, match="feature_dims is only used with missing='learned'"):
        base.configure_modalities({"audio": base.audio_encoder, "visual": base.visual_encoder}, head=base.head,
                                  feature_dims={"audio": 8, "visual": 8})
    gated = TinyAV(fusion="gated")
    assert gated.modality_spec.missing == "zeros" and not gated.modality_spec.fusion_takes_present
    assert isinstance(gated.fusion, GatedFusion)


class NaiveAttentionFusion(MaskedAttentionFusion):
    """The same attention without the care for an all-absent row: every key masked gives NaN."""

    def forward(self, za, zv, present=None):
        tokens = torch.stack([za, zv], 1)
        pooled, _ = self.attn(self.query.expand(len(za), -1, -1), tokens, tokens, key_padding_mask=~present)
        return self.out(pooled[:, 0])


def test_a_mask_taking_fusion_that_gives_nan_for_an_empty_row_is_named():
    model = AttentionModel()
    model.fusion = NaiveAttentionFusion()
    model.configure_modalities({"audio": model.audio_encoder, "visual": model.visual_encoder}, fusion=model.fusion)
    b = batch()
    feats = model.forward_features(b) if hasattr(model, "forward_features") else {
        "audio": model.audio_encoder(b["audio"]), "visual": model.visual_encoder(b["visual"])}
    model.fuse(feats, b["target"], present=PRESENT)  # no sample is empty here: fine
    with pytest.raises(ModalityContractError, match=r"finite logits for an all-False row.*CLS key"):
        model.fuse_subset(feats, ["visual"], present=PRESENT)  # row 2 lacks visual: left with nothing


def test_masks_of_other_integers_and_numpy_masks_are_refused_with_the_fix():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    with pytest.raises(ModalityContractError, match=r"values other than 0 and 1 \(\[-1, 1\]\).*mask > 0"):
        model.fuse(feats, b["target"], present={"audio": torch.where(PRESENT["audio"], 1, -1)})
    with pytest.raises(ModalityContractError, match=r"torch.from_numpy"):
        model.fuse(feats, b["target"], present={"audio": PRESENT["audio"].numpy()})
    with pytest.raises(ModalityContractError, match=r"torch.from_numpy"):
        model.fuse(feats, b["target"], present=torch.stack([PRESENT["audio"], PRESENT["visual"]], 1).numpy())
    with pytest.raises(ModalityContractError, match=r"feature_dims\['audio'\] must be a positive int"):
        model.configure_modalities({"audio": model.audio_encoder, "visual": model.visual_encoder}, head=model.head,
                                   missing="learned", feature_dims={"audio": 8.0, "visual": 8})
