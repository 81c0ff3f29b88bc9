"""The cross-modal polysemanticity score (ours) on constructed fusions whose neurons are known to be
monosemantic or mixed, against the attribution written out by hand."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import ModalityContractError, ModalityDiagnostics, MultimodalMixin
from lightning_balance.functional import fusion_polysemanticity, polysemanticity_scores, polysemanticity_summary
from tests.helpers import trainer_kwargs


class KnownFusion(nn.Module):
    """Hidden neurons: 0 reads audio only, 1 visual only, 2 both with equal weights, 3 audio 3:1, 4 dead."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 5, bias=False)
        w = torch.zeros(5, 4)
        w[0, :2] = torch.tensor([1.0, -1.0])
        w[1, 2:] = torch.tensor([0.5, 2.0])
        w[2] = torch.tensor([1.0, 0.0, 1.0, 0.0])
        w[3] = torch.tensor([3.0, 0.0, 1.0, 0.0])
        self.hidden.weight.data.copy_(w)
        self.out = nn.Linear(5, 3)

    def forward(self, za, zv):
        return self.out(self.hidden(torch.cat([za, zv], 1)))


class Net(MultimodalMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.v = nn.Linear(2, 2), nn.Linear(2, 2)  # the features are given: the encoders do not run
        self.fusion = KnownFusion()
        self.configure_modalities({"audio": self.a, "visual": self.v}, fusion=self.fusion)


def test_known_neurons_get_the_scores_of_the_formula():
    torch.manual_seed(0)
    net = Net()
    za, zv = torch.randn(200, 2), torch.randn(200, 2)
    out = fusion_polysemanticity(net, {"audio": za, "visual": zv}, net.fusion.hidden, threshold=0.5)
    # by hand: with a linear layer and the zero fill, removing m moves neuron k by W_km z_m
    w = net.fusion.hidden.weight
    attr = torch.stack([(za @ w[:, :2].T).abs().mean(0), (zv @ w[:, 2:].T).abs().mean(0)], 1).double()
    torch.testing.assert_close(out["attributions"], attr)
    p = attr[:4] / attr[:4].sum(1, keepdim=True)
    want = -(p * p.clamp_min(1e-300).log()).sum(1) / math.log(2)
    torch.testing.assert_close(out["scores"][:4], want)
    assert out["scores"][0] == pytest.approx(0.0) and out["scores"][1] == pytest.approx(0.0)  # monosemantic
    assert out["scores"][2] > 0.95  # equal weights on iid features: about 1
    assert 0.5 < float(out["scores"][3]) < 0.95  # mixed, audio-led
    assert math.isnan(float(out["scores"][4]))  # dead: no score
    assert out["live"] == 4 and out["fraction"] == pytest.approx(0.5)
    assert out["mean"] == pytest.approx(float(want.mean()))


def test_pure_functions_and_errors():
    attr = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = polysemanticity_scores(attr)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0) and math.isnan(float(scores[2]))
    assert polysemanticity_summary(scores, threshold=0.5) == {"mean": 0.5, "fraction": 0.5, "live": 2.0}
    with pytest.raises(ValueError, match="at least two modalities"):
        polysemanticity_scores(torch.ones(3, 1))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, za, zv, y):
        self.za, self.zv, self.y = za, zv, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"audio": self.za[i], "visual": self.zv[i], "target": self.y[i]}


class _Lit(MultimodalMixin, pl.LightningModule):
    """Identity encoders (the features are the inputs) and the known fusion."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.v = nn.Linear(2, 2), nn.Linear(2, 2)
        for enc in (self.a, self.v):
            enc.weight.data.copy_(torch.eye(2))
            enc.bias.data.zero_()
        self.fusion = KnownFusion()
        self.configure_modalities({"audio": self.a, "visual": self.v}, fusion=self.fusion)

    def validation_step(self, batch, batch_idx):
        self.fuse({"audio": self.a(batch["audio"]), "visual": self.v(batch["visual"])}, batch["target"])


def _validate(directory, data, devices, **diag_kwargs):
    from tests.test_modality_diagnostics import DumpDiagnostics

    directory.mkdir(parents=True)
    diag = ModalityDiagnostics(plot=False, verbose=False, probe=False, vif=False, bootstrap=0, **diag_kwargs)
    kwargs = trainer_kwargs(directory, callbacks=[diag, DumpDiagnostics(str(directory))], devices=devices)
    if devices > 1:
        kwargs["strategy"] = "ddp_spawn"
    pl.Trainer(**kwargs).validate(_Lit(), DataLoader(data, batch_size=8), verbose=False)
    with open(directory / "rank0.json") as f:
        return json.load(f)["diag"][-1]


@pytest.mark.timeout(300)
def test_in_modality_diagnostics_ddp_equals_one_process_and_the_value_is_the_formulas(tmp_path):
    torch.manual_seed(1)
    za, zv, y = torch.randn(40, 2), torch.randn(40, 2), torch.randint(0, 3, (40,))
    w = KnownFusion().hidden.weight
    attr = torch.stack([(za @ w[:, :2].T).abs().mean(0), (zv @ w[:, 2:].T).abs().mean(0)], 1)
    want = polysemanticity_summary(polysemanticity_scores(attr.double()), 0.5)
    one = _validate(tmp_path / "one", _Pairs(za, zv, y), 1, polysemantic_layer="fusion.hidden")
    assert one["polysemantic/mean"] == pytest.approx(want["mean"]) and one["polysemantic/live"] == 4
    assert one["polysemantic/fraction"] == pytest.approx(want["fraction"])
    two = _validate(tmp_path / "two", _Pairs(za, zv, y), 2, polysemantic_layer="fusion.hidden")
    for key in ("polysemantic/mean", "polysemantic/fraction", "polysemantic/live"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    with pytest.raises(ModalityContractError, match="did you mean 'fusion.hidden'"):
        _validate(tmp_path / "typo", _Pairs(za, zv, y), 1, polysemantic_layer="fusion.hiden")
