"""PMR: prototypes, prototype logits and weights against hand-computed values; the first step's
gradient against the loss written out by hand; AMP; bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_balance import PMR, ModalityContractError
from lightning_balance.functional import (
    class_feature_sums,
    pmr_weights,
    prototype_entropy,
    prototype_logits,
    update_prototypes,
)
from tests.helpers import FirstGradients, DictDataset, TinyAV, flat_params, loader, trainer_kwargs


def test_class_sums_and_prototype_update():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    y = torch.tensor([0, 0, 2])
    sums, counts = class_feature_sums(z, y, 3)
    torch.testing.assert_close(sums, torch.tensor([[4.0, 2.0], [0.0, 0.0], [0.0, 4.0]]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 1.0]))
    protos, seen = update_prototypes(sums, counts, None, None, momentum=0.5)
    torch.testing.assert_close(protos, torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 4.0]]))
    assert seen.tolist() == [True, False, True]
    # second update: class 1 appears (no old prototype: taken as is), class 2 is absent (kept), class 0 mixed
    sums2 = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]])
    counts2 = torch.tensor([1.0, 1.0, 0.0])
    protos2, seen2 = update_prototypes(sums2, counts2, protos, seen, momentum=0.5)
    torch.testing.assert_close(protos2, torch.tensor([[1.0, 0.5], [5.0, 5.0], [0.0, 4.0]]))
    assert seen2.tolist() == [True, True, True]


def test_prototype_logits_and_entropy():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    logits = prototype_logits(z, c)
    torch.testing.assert_close(logits, torch.tensor([[0.0, -3.0], [-5.0, -4.0]]))
    masked = prototype_logits(z, c, torch.tensor([True, False]))
    assert masked[:, 1].isinf().all() and masked[:, 0].tolist() == [0.0, -5.0]
    p = torch.softmax(logits[0], -1)
    assert prototype_entropy(logits)[0].item() == pytest.approx(-(p * p.log()).sum().item())
    assert prototype_entropy(masked).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_weights_by_hand():
    # rho = s_a / s_v = 1.5 > 1: audio ahead
    pce, ent = pmr_weights(torch.tensor([6.0, 4.0]), "binary")
    assert pce.tolist() == [0.0, 1.0]  # official: PCE on the visual branch
    pce, ent = pmr_weights(torch.tensor([6.0, 4.0]), "continuous")
    rho = 1.5
    beta, gamma = min(max(1 / rho - 1, 0), 1), min(max(rho - 1, 0), 1)  # paper: beta on audio PCE, gamma on visual
    assert pce.tolist() == pytest.approx([beta, gamma])
    assert ent.tolist() == pytest.approx([gamma, beta])  # entropy of the leader (audio) weighted by gamma
    pce, _ = pmr_weights(torch.tensor([3.0, 3.0]), "binary")
    assert pce.tolist() == [0.0, 0.0]
    pce, _ = pmr_weights(torch.tensor([1.0, 9.0, 2.0]), "continuous")
    assert pce.tolist() == pytest.approx([1.0, 0.0, 1.0])  # clipped at 1
    with pytest.raises(ValueError, match="rule"):
        pmr_weights(torch.ones(2), "soft")




@pytest.mark.parametrize("rule", ["binary", "continuous"])
def test_first_step_equals_the_loss_written_out(tmp_path, rule):
    alpha = 2.0
    cb = PMR(alpha=alpha, rule=rule, fraction=1.0, entropy_weight=0.3, entropy_epochs=1)
    probe = FirstGradients()
    model = TinyAV()
    reference = TinyAV()
    reference.load_state_dict(model.state_dict())
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, probe], max_steps=1)).fit(model, loader())

    data = DictDataset(n=64)
    full = {k: torch.stack([data[i][k] for i in range(64)]) for k in ("audio", "visual", "target")}
    with torch.no_grad():  # prototypes: class means of the whole (fraction=1) training set before training
        feats = reference.forward_features(full)
        protos = {m: torch.stack([feats[m][full["target"] == k].mean(0) for k in range(4)]) for m in feats}
    for m in protos:
        torch.testing.assert_close(cb.centroids[m], protos[m], rtol=1e-5, atol=1e-6)
    batch = {k: v[:16] for k, v in full.items()}
    y = batch["target"]
    z = reference.forward_features(batch)
    logits = {m: -torch.cdist(z[m], protos[m]) for m in z}
    s = {m: torch.softmax(logits[m].detach(), -1).gather(1, y[:, None]).sum().item() for m in z}
    rho = s["audio"] / s["visual"]
    if rule == "binary":
        w = {"audio": float(rho < 1), "visual": float(rho > 1)}
    else:
        w = {"audio": min(max(1 / rho - 1, 0), 1), "visual": min(max(rho - 1, 0), 1)}
    e = {"audio": min(max(rho - 1, 0), 1), "visual": min(max(1 / rho - 1, 0), 1)}
    assert max(w.values()) > 0
    loss = F.cross_entropy(reference.head(torch.cat([z["audio"], z["visual"]], 1)), y)
    for m in z:
        p = torch.softmax(logits[m], -1)
        entropy = -(p * torch.log_softmax(logits[m], -1)).sum(-1)  # the entropy written out, per sample
        loss = loss + alpha * w[m] * F.cross_entropy(logits[m], y) - 0.3 * e[m] * entropy.mean()
    loss.backward()
    for got, p in zip(probe.grads, reference.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_fp16_amp_scales_the_term_like_the_loss(tmp_path):
    fp32, _ = _fit(tmp_path, [PMR(alpha=2.0)])
    plain, _ = _fit(tmp_path, [])
    amp = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    fp16, _ = _fit(tmp_path, [PMR(alpha=2.0)], plugins=[amp])
    gap = (flat_params(fp32) - flat_params(plain)).abs().max().item()
    assert gap > 0.05
    assert (flat_params(fp16) - flat_params(fp32)).abs().max().item() < gap / 5


def _fit(tmp_path, callbacks, model=None, **kw):
    model = model or TinyAV()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=1, **kw))
    trainer.fit(model, loader())
    return model, trainer


def test_steps_mode_has_no_term_in_the_first_epoch(tmp_path):
    plain, _ = _fit(tmp_path, [])
    cb = PMR(prototypes="steps")
    steps, _ = _fit(tmp_path, [cb])
    assert torch.equal(flat_params(plain), flat_params(steps))
    assert cb.num_edits == 0 and set(cb._epoch_sums) == {"sum/audio", "count/audio", "sum/visual", "count/visual"}
    assert cb._epoch_sums["count/audio"].sum().item() == 64


def test_logs_under_balance_pmr(tmp_path):
    _, trainer = _fit(tmp_path, [PMR()], log_every_n_steps=1)
    keys = set(trainer.callback_metrics)
    assert {f"balance/pmr/{k}/{m}" for k in ("score", "pce_weight") for m in ("audio", "visual")} <= keys


def test_pass_mode_needs_encode_batch(tmp_path):
    class NoEncode(TinyAV):
        encode_batch = TinyAV.__mro__[1].encode_batch  # the mixin's default

    with pytest.raises(ModalityContractError, match="encode_batch"):
        _fit(tmp_path, [PMR()], model=NoEncode())
    _fit(tmp_path, [PMR(prototypes="steps")], model=NoEncode())  # steps mode does not need it


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": -1}, "alpha"), ({"momentum": 1.5}, "momentum"), ({"rule": "x"}, "rule"),
     ({"prototypes": "epoch"}, "prototypes"), ({"fraction": 0}, "fraction"), ({"entropy_epochs": -1}, "entropy_epochs"),
     ({"entropy_weight": -0.1}, "entropy_weight")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PMR(**kwargs)


def test_math_is_finite_with_unseen_classes():
    logits = prototype_logits(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([True, True, False, False]))
    assert math.isfinite(prototype_entropy(logits).sum().item())


def test_prototype_pass_leaves_the_shuffling_unchanged(tmp_path):
    """With a shuffling loader, the pass must not consume training's random stream: with alpha=0 the
    run equals plain training exactly."""
    from torch.utils.data import DataLoader

    def shuffled():
        return DataLoader(DictDataset(n=64), batch_size=16, shuffle=True)

    runs = []
    for callbacks in ([], [PMR(alpha=0.0)]):
        torch.manual_seed(7)
        model = TinyAV()
        torch.manual_seed(7)
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=2)).fit(model, shuffled())
        runs.append(flat_params(model))
    assert torch.equal(runs[0], runs[1])
