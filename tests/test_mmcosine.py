"""MMCosine head: cosine logits by hand, unimodal logits through the contract's masking, training against
the restated cosine logits, token features."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_balance import MultimodalMixin
from lightning_balance.heads import CosineHead
from tests.helpers import flat_params, loader, trainer_kwargs


def test_logits_by_hand():
    head = CosineHead([2, 1], num_classes=2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0, 2.0], [0.0, -1.0, -5.0]]))
    za, zv = torch.tensor([[1.0, 1.0]]), torch.tensor([[4.0]])
    # audio: cos((1,1),(3,0)) = 1/sqrt2 ; cos((1,1),(0,-1)) = -1/sqrt2 ; visual: cos(4, 2) = 1 ; cos(4, -5) = -1
    want = 10 * torch.tensor([[2**-0.5 + 1, -(2**-0.5) - 1]])
    torch.testing.assert_close(head(za, zv), want)
    a, v = head.unimodal(za, zv)
    torch.testing.assert_close(a, 10 * torch.tensor([[2**-0.5, -(2**-0.5)]]))
    torch.testing.assert_close(head(za, torch.zeros_like(zv)), a)  # a zeroed modality adds nothing
    # invariant to the scale of features and of class weights
    torch.testing.assert_close(head(5 * za, 0.1 * zv), head(za, zv))
    with pytest.raises(ValueError, match="expects 2"):
        head(za)
    with pytest.raises(ValueError, match="scale"):
        CosineHead([2], 3, scale=0)


class CosineAV(MultimodalMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = CosineHead([8, 8], 4, scale=10.0)
        self.configure_modalities({"audio": self.audio, "visual": self.visual}, fusion=self.head)

    def training_step(self, batch, batch_idx):
        logits = self.fuse({"audio": self.audio(batch["audio"]), "visual": self.visual(batch["visual"])}, batch["target"])
        return F.cross_entropy(logits, batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_contract_unimodal_logits_are_the_cosine_terms(tmp_path):
    model = CosineAV()
    batch = {"audio": torch.randn(5, 6), "visual": torch.randn(5, 5)}
    feats = {"audio": model.audio(batch["audio"]), "visual": model.visual(batch["visual"])}
    uni = model.compute_unimodal_logits(feats)
    a, v = model.head.unimodal(feats["audio"], feats["visual"])
    torch.testing.assert_close(uni["audio"], a)
    torch.testing.assert_close(uni["visual"], v)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader())
    assert model.head.weight.grad is not None


def test_parameters_match_the_restated_cosine_logits(tmp_path):
    model = CosineAV()
    reference = copy.deepcopy(model)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader())

    # MMCosine: o_c = sum_m s * <z_m / |z_m|, w_mc / |w_mc|>, no bias, cross-entropy; modality by modality
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for batch in [b for _ in range(2) for b in loader()]:
        z = [reference.audio(batch["audio"]), reference.visual(batch["visual"])]
        w = [reference.head.weight[:, :8], reference.head.weight[:, 8:]]
        logits = 0
        for z_m, w_m in zip(z, w):
            cos = (z_m / z_m.norm(dim=1, keepdim=True)) @ (w_m / w_m.norm(dim=1, keepdim=True)).T
            logits = logits + 10.0 * cos
        loss = F.cross_entropy(logits, batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_token_features_are_averaged():
    head = CosineHead([2, 1], num_classes=2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0, 2.0], [0.0, -1.0, -5.0]]))
    # audio tokens (2, 0) and (0, 2): mean (1, 1), as in test_logits_by_hand; visual tokens 3 and 5: mean 4
    za = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    zv = torch.tensor([[[3.0], [5.0]]])
    torch.testing.assert_close(head(za, zv), 10 * torch.tensor([[2**-0.5 + 1, -(2**-0.5) - 1]]))
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, T, D\)"):
        head(torch.ones(2), torch.ones(1))


def test_cosine_logits_are_float32_under_autocast():
    from lightning_balance import CosineHead

    head = CosineHead([4, 3], num_classes=5)
    a, v = torch.randn(6, 4), torch.randn(6, 3)
    plain = head(a, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(a, v)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)
