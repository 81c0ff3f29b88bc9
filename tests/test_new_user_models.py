"""The gradient methods on models that are not ours, as a new user would bring them: a transformer fusion over
token features trained with AdamW, a gated fusion over three tabular views, a Conv1d encoder next to an MLP."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_balance import AGM, OGMGE, PMR, InfoReg, MMPareto, MultimodalMixin
from tests.helpers import flat_params, trainer_kwargs


class TokenFusion(nn.Module):
    """Concatenates the modalities' token sequences, one transformer layer, mean over tokens, a classifier."""

    def __init__(self, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(d, classes)

    def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(torch.cat(tokens, dim=1)).mean(dim=1))


class TokenModel(MultimodalMixin, pl.LightningModule):
    """Token features (N, T, D) per modality, AdamW, unimodal losses through the masked fusion."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(6, 16)  # (N, 5, 6) -> (N, 5, 16) tokens
        self.visual = nn.Linear(4, 16)  # (N, 3, 4) -> (N, 3, 16)
        self.fusion = TokenFusion()
        self.configure_modalities({"audio": self.audio, "visual": self.visual}, fusion=self.fusion)

    def encode_batch(self, batch):
        a, v, y = batch
        return {"audio": self.audio(a), "visual": self.visual(v)}, y

    def training_step(self, batch, batch_idx):
        features, y = self.encode_batch(batch)
        return self.add_unimodal_losses(F.cross_entropy(self.fuse(features, y), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


def _token_data(n=48):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    a = torch.randn(n, 5, 6, generator=g) + y[:, None, None].float()
    v = torch.randn(n, 3, 4, generator=g) + 0.3 * y[:, None, None].float()
    return DataLoader(TensorDataset(a, v, y), batch_size=12)


def _all_methods(**inforeg):
    return [OGMGE(seed=0), InfoReg(**inforeg), AGM(alpha=0.5), PMR(fraction=0.5), MMPareto()]


@pytest.mark.parametrize("reverse", [False, True])
def test_transformer_fusion_over_tokens_with_adamw_and_every_method_stacked(tmp_path, reverse):
    model = TokenModel()
    before = flat_params(model)
    callbacks = _all_methods()[::-1] if reverse else _all_methods()
    with pytest.warns(UserWarning, match="designed and published with SGD.*AdamW"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(model, _token_data())
    after = flat_params(model)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3
    assert all(cb.num_edits > 0 for cb in callbacks if not isinstance(cb, PMR)) and callbacks[0].num_edits > 0
    pmr = next(cb for cb in callbacks if isinstance(cb, PMR))
    assert pmr.centroids["audio"].shape == (3, 16)  # prototypes of the pooled tokens
    if reverse:
        reference = TokenModel()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(**trainer_kwargs(tmp_path, callbacks=_all_methods(), max_epochs=2)).fit(reference, _token_data())
        torch.testing.assert_close(after, flat_params(reference), rtol=0, atol=0)  # the list order does not matter


class GatedThree(MultimodalMixin, pl.LightningModule):
    """Three tabular views, a softmax gate over the three projected views, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, 8), nn.ReLU()) for m, d in
                                       (("a", 5), ("b", 7), ("c", 3))})
        self.gate = nn.Linear(24, 3)
        self.out = nn.Linear(8, 4)
        self.configure_modalities({m: self.encoders[m] for m in ("a", "b", "c")})  # fusion: fuse_features below

    def fuse_features(self, features):
        z = [features[m] for m in ("a", "b", "c")]
        w = torch.softmax(self.gate(torch.cat(z, -1)), -1)
        return self.out(sum(w[:, i:i + 1] * z[i] for i in range(3)))

    def training_step(self, batch, batch_idx):
        *views, y = batch
        features = {m: self.encoders[m](x) for m, x in zip(("a", "b", "c"), views)}
        return self.add_unimodal_losses(F.cross_entropy(self.fuse(features, y), y))

    def encode_batch(self, batch):
        *views, y = batch
        return {m: self.encoders[m](x) for m, x in zip(("a", "b", "c"), views)}, y

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_gated_fusion_over_three_views_with_every_method(tmp_path):
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (64,), generator=g)
    views = [torch.randn(64, d, generator=g) + s * y[:, None].float() for d, s in ((5, 1.0), (7, 0.3), (3, 0.1))]
    data = DataLoader(TensorDataset(*views, y), batch_size=16)
    model = GatedThree()
    callbacks = _all_methods()
    before = flat_params(model)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(model, data)
    assert torch.isfinite(flat_params(model)).all() and (flat_params(model) - before).abs().max() > 1e-3
    assert all(cb.num_edits > 0 for cb in callbacks)
    agm = next(cb for cb in callbacks if isinstance(cb, AGM))
    assert agm.running.shape == (3,) and torch.isfinite(agm.running).all()
