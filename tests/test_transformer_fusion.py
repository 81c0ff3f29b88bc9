"""The token-fusion transformer: tokens from vectors and token features, absence as an attention mask (the absent
features cannot change the output), the contract's masking path, and the shipped methods of the comparison
registry on a model that fuses with it (each runs or refuses clearly)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import (
    METHODS,
    ModalityContractError,
    ModalityDiagnostics,
    MultimodalMixin,
    fit_alone,
    fit_method,
)
from lightning_balance.data import MultimodalTensorDataset
from lightning_balance.transformer import TokenFusionTransformer


def _features(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 5, generator=g), torch.randn(n, 4, 3, generator=g), torch.randn(n, 2, generator=g)]


def test_vectors_and_token_features_become_tokens_and_absent_ones_cannot_change_the_output():
    fusion = TokenFusionTransformer([5, 3, 2], num_classes=4, d_model=16, tokens_per_modality=2, num_heads=2).eval()
    a, b, c = _features()
    tokens, owner = fusion.tokens(a, b, c)
    # a vector gives 2 tokens, each of the 4 input tokens 2: CLS + 2 + 8 + 2
    assert tokens.shape == (6, 1 + 2 + 8 + 2, 16) and owner.tolist() == [0, 0] + [1] * 8 + [2, 2]
    present = torch.tensor([[True, True, True], [False, True, True], [True, False, True]] * 2)
    out = fusion(a, b, c, present=present)
    # replace what the absent samples carry by anything, NaN included: their logits stay
    a2, b2 = a.clone(), b.clone()
    a2[~present[:, 0]] = float("nan")
    b2[~present[:, 1]] = 1e6
    torch.testing.assert_close(fusion(a2, b2, c, present=present), out)
    # the complete samples are those of a call without a mask, and removing a modality changes the output
    torch.testing.assert_close(out[present.all(1)], fusion(a, b, c)[present.all(1)])
    assert not torch.allclose(out[1], fusion(a, b, c)[1])
    with pytest.raises(ValueError, match="expects 3 feature tensors"):
        fusion(a, b)
    with pytest.raises(ValueError, match="divisible"):
        TokenFusionTransformer([5], 3, d_model=10, num_heads=4)


class TransformerNet(MultimodalMixin, pl.LightningModule):
    """Three MLP encoders (one of them emitting 3 tokens), fused by the token transformer; AdamW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleDict({"a": nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
                                  "b": nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
                                  "c": nn.Sequential(nn.Linear(3, 8), nn.ReLU())})
        self.fusion = TokenFusionTransformer([8, 8, 8], num_classes=4, d_model=16, num_layers=1, num_heads=2,
                                             dropout=0.0)
        self.configure_modalities({m: self.enc[m] for m in ("a", "b", "c")}, fusion=self.fusion)

    def features(self, batch: dict) -> dict:
        out = {m: self.enc[m](batch[m]) for m in ("a", "b", "c")}
        out["b"] = out["b"].reshape(-1, 1, 8).expand(-1, 3, 8) * torch.arange(1, 4.0)[None, :, None]  # tokens
        return out

    def encode_batch(self, batch: dict):
        return self.features(batch), batch["target"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.fuse(self.features(batch), batch["target"], inputs={m: batch[m] for m in ("a", "b", "c")})
        return self.balanced_loss(F.cross_entropy(logits, batch["target"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.fuse(self.features(batch), batch["target"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Data(pl.LightningDataModule):
    def setup(self, stage=None):
        g = torch.Generator().manual_seed(1)
        y = torch.randint(0, 4, (96,), generator=g)
        means = torch.randn(4, 13, generator=torch.Generator().manual_seed(2))
        x = means[y] + torch.randn(96, 13, generator=g)
        self.tensors = {"a": x[:, :6], "b": x[:, 6:10], "c": x[:, 10:], "target": y}

    def train_dataloader(self):
        return DataLoader(MultimodalTensorDataset(self.tensors), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(MultimodalTensorDataset(self.tensors), batch_size=48)


def test_the_contract_masks_through_it_and_the_diagnosis_runs():
    model = TransformerNet()
    assert model.modality_spec.missing == "none" and model.modality_spec.fusion_takes_present
    data = Data()
    data.setup()
    batch = next(iter(data.val_dataloader()))
    feats = model.features(batch)
    n = len(batch["target"])
    without_b = model.fuse_subset(feats, {"a", "c"})
    mask = torch.tensor([[True, False, True]]).expand(n, 3)
    torch.testing.assert_close(without_b, model.fusion(feats["a"], feats["b"], feats["c"], present=mask))
    diag = ModalityDiagnostics(verbose=False, plot=False, bootstrap=20)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[diag], accelerator="cpu", devices=1).validate(
        model, data.val_dataloader(), verbose=False)
    values = diag.diagnostics_history[-1]
    assert all(torch.isfinite(torch.tensor(values[f"contribution/{m}"])) for m in "abc")


# methods that refuse this model, and what their message must say: AMCo needs a concat + linear head; UMT's teachers
# (the encoders trained alone) output (N, 8) where this model's "b" features are tokens made outside the encoder
REFUSED = {"amco": "concat", "umt": "teacher of 'b' outputs features of shape"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registry_method_runs_with_it_or_refuses_clearly(name):
    references = fit_alone(TransformerNet(), Data(), max_epochs=1) if name == "umt" else None  # UMT's teachers
    if name in REFUSED:
        with pytest.raises(ModalityContractError, match=REFUSED[name]):
            fit_method(TransformerNet, Data(), name, max_epochs=1, references=references)
        return
    fitted = fit_method(TransformerNet, Data(), name, max_epochs=2, references=references)
    assert fitted.val_accuracy > 0.25 and all(torch.isfinite(p).all() for p in fitted.module.parameters())
