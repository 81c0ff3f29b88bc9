"""MMPareto: min-norm weights and merged gradients against hand-computed values; the callback's
first step against the official recipe (separate backward passes per loss); conflict engagement;
the unimodal auxiliary objectives; bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import MMPareto, ModalityContractError
from lightning_balance.functional import pareto_merge, pareto_merge_from_sum_, pareto_weights
from tests.helpers import DictDataset, FirstGradients, TinyAV, loader, trainer_kwargs


def test_weights_with_and_without_conflict():
    # g_mm = (1, 0), g_u = (-1, 1): <.,.> = -1, |g_mm|^2 = 1, |g_u|^2 = 2 -> c* = (2 + 1) / |(2, -1)|^2 = 3/5
    w_mm, w_u, cos = pareto_weights(torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(2.0))
    assert (w_mm.item(), w_u.item()) == pytest.approx((0.6, 0.4))
    assert cos.item() == pytest.approx(-1 / math.sqrt(2))
    # no conflict: uniform
    w_mm, w_u, cos = pareto_weights(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(2.0))
    assert (w_mm.item(), w_u.item()) == (0.5, 0.5) and cos.item() > 0
    # orthogonal counts as conflict (cos <= 0), min-norm point of two orthogonal vectors
    w_mm, w_u, _ = pareto_weights(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(4.0))
    assert (w_mm.item(), w_u.item()) == pytest.approx((0.8, 0.2))
    # not clipped, as the official MinNormSolver._min_norm_element_from2 (its middle case):
    # c* = (100 + 1e-9) / (1e-6 + 100 + 2e-9) = 0.99999999
    w_mm, _, _ = pareto_weights(torch.tensor(-1e-9), torch.tensor(1e-6), torch.tensor(100.0))
    assert w_mm.item() > 0.9995  # a clip would give 0.999
    # g_mm = (1, 0, 0), g_u = (-1e-4, 0.01, 0): official w_mm = 2.0e-4 (a clip would give 0.001)
    w_mm, _, _ = pareto_weights(torch.tensor(-1e-4), torch.tensor(1.0), torch.tensor(1e-8 + 1e-4))
    assert w_mm.item() == pytest.approx((1e-8 + 1e-4 + 1e-4) / (1.0 + 1e-8 + 1e-4 + 2e-4), rel=1e-5)
    # the solver's degenerate cases: a zero gradient
    w_mm, _, _ = pareto_weights(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0))
    assert w_mm.item() == pytest.approx(0.999)
    w_mm, _, _ = pareto_weights(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))
    assert w_mm.item() == pytest.approx(0.001)


def test_merge_by_hand():
    g_mm, g_u = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    merged = pareto_merge(g_mm, g_u, torch.tensor(0.6), torch.tensor(0.4), gamma=1.5)
    g_hat = torch.tensor([2 * (0.6 - 0.4), 2 * 0.4])  # (0.4, 0.8)
    factor = 1.5 * max(1.0, 1.0 / g_hat.norm().item())  # |g_mm + g_u| = |(0, 1)| = 1
    torch.testing.assert_close(merged[0], factor * g_hat)
    # without conflict: gamma * (g_mm + g_u), per tensor
    a, b = [torch.randn(3, 2), torch.randn(4)], [torch.randn(3, 2), torch.randn(4)]
    merged = pareto_merge(a, b, torch.tensor(0.5), torch.tensor(0.5), gamma=1.5)
    for m, x, y in zip(merged, a, b):
        torch.testing.assert_close(m, 1.5 * (x + y))


def test_in_place_merge_from_the_sum_equals_the_merge():
    g_mm = [torch.randn(3, 4), torch.randn(5)]
    g_u = [torch.randn(3, 4), torch.randn(5)]
    totals = [a + b for a, b in zip(g_mm, g_u)]
    want = pareto_merge(g_mm, g_u, torch.tensor(0.7), torch.tensor(0.3), gamma=1.5)
    pareto_merge_from_sum_(totals, g_u, 0.7, 0.3, gamma=1.5)
    for got, w in zip(totals, want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def _official_min_norm(v1v1, v1v2, v2v2):
    """MinNormSolver._min_norm_element_from2 of the official code, for x1 = g_mm, x2 = g_u: the weight of g_mm."""
    v1v1, v1v2, v2v2 = float(v1v1), float(v1v2), float(v2v2)
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def official_reference(model, batch, gamma):
    """The official recipe: separate backward passes for L_mm and each L_u, merge per encoder by hand."""
    y = batch["target"]
    encoders = {"audio": list(model.audio_encoder.parameters()), "visual": list(model.visual_encoder.parameters())}

    def losses():  # written out for TinyAV: split head (W_m z_m + b/2) with concat, auxiliary heads with the gate
        za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
        if hasattr(model, "head"):
            w, b = model.head.weight, model.head.bias
            fused = model.head(torch.cat([za, zv], 1))
            uni = {"audio": za @ w[:, :8].T + b / 2, "visual": zv @ w[:, 8:].T + b / 2}
        else:
            fused = model.fusion(za, zv)
            uni = {"audio": model.aux["audio"](za), "visual": model.aux["visual"](zv)}
        return F.cross_entropy(fused, y), {m: F.cross_entropy(uni[m], y) for m in uni}

    l_mm, l_uni = losses()
    total = l_mm + sum(l_uni.values())
    heads = [p for p in model.parameters() if all(p is not q for ps in encoders.values() for q in ps)]
    expected = dict(zip(map(id, heads), torch.autograd.grad(total, heads, retain_graph=True)))
    info = {}
    for m, params in encoders.items():
        g_mm = torch.autograd.grad(l_mm, params, retain_graph=True)
        g_u = torch.autograd.grad(l_uni[m], params, retain_graph=True)
        flat_mm = torch.cat([g.reshape(-1) for g in g_mm]).double()
        flat_u = torch.cat([g.reshape(-1) for g in g_u]).double()
        cos = (flat_mm @ flat_u / (flat_mm.norm() * flat_u.norm())).item()
        if cos > 0:
            w_mm = 0.5
        else:
            w_mm = _official_min_norm(flat_mm @ flat_mm, flat_mm @ flat_u, flat_u @ flat_u)
        info[m] = (cos, w_mm)
        for p, a, b in zip(params, g_mm, g_u):
            g_hat = 2 * (w_mm * a + (1 - w_mm) * b)
            expected[id(p)] = gamma * g_hat * max(1.0, ((a + b).norm() / g_hat.norm()).item())
    return [expected[id(p)] for p in model.parameters()], info


class Opposed(TinyAV):
    """Auxiliary unimodal heads initialised as the negated slices of the fused head: the unimodal and
    multimodal gradients of each encoder point in opposite directions (a conflict by construction)."""

    def __init__(self):
        super().__init__(fusion="gated", unimodal="heads", aux_losses=True)
        with torch.no_grad():
            self.aux["audio"].weight.copy_(-self.fusion.out.weight * 3)
            self.aux["visual"].weight.copy_(-self.fusion.out.weight * 3)


@pytest.mark.parametrize("kind", ["concat", "conflict"])
def test_first_step_equals_the_official_recipe(tmp_path, kind):
    model = TinyAV(aux_losses=True) if kind == "concat" else Opposed()
    reference = TinyAV(aux_losses=True) if kind == "concat" else Opposed()
    reference.load_state_dict(model.state_dict())
    cb, probe = MMPareto(gamma=1.5), FirstGradients()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, probe], max_steps=1, log_every_n_steps=1))
    trainer.fit(model, loader())
    data = DictDataset(n=64)
    batch = {k: torch.stack([data[i][k] for i in range(16)]) for k in ("audio", "visual", "target")}
    expected, info = official_reference(reference, batch, gamma=1.5)
    for got, want in zip(probe.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for m, (cos, w_mm) in info.items():
        assert trainer.callback_metrics[f"balance/mmpareto/cos/{m}"].item() == pytest.approx(cos, rel=1e-4, abs=1e-6)
        assert trainer.callback_metrics[f"balance/mmpareto/w_mm/{m}"].item() == pytest.approx(w_mm, rel=1e-4)
        if kind == "conflict":
            assert cos < 0 and w_mm != pytest.approx(0.5)  # the Pareto branch engaged
            assert cb.conflict_rate[m] == 1.0


def test_without_conflict_the_encoders_get_gamma_times_the_sum(tmp_path):
    """Aux heads equal to the fused head's slices: the two gradients agree, weights are uniform and the
    encoder gradient is gamma x the plain gradient of L_mm + L_u."""

    class Agreeing(TinyAV):
        def __init__(self):
            super().__init__(fusion="gated", unimodal="heads", aux_losses=True)
            with torch.no_grad():
                self.aux["audio"].weight.copy_(self.fusion.out.weight)
                self.aux["visual"].weight.copy_(self.fusion.out.weight)

    plain_probe, probe = FirstGradients(), FirstGradients()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[plain_probe], max_steps=1)).fit(Agreeing(), loader())
    cb = MMPareto(gamma=1.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, probe], max_steps=1, log_every_n_steps=1))
    model = Agreeing()
    trainer.fit(model, loader())
    assert cb.conflict_rate == {"audio": 0.0, "visual": 0.0}
    for name_p, plain, got in zip([n for n, _ in model.named_parameters()], plain_probe.grads, probe.grads):
        factor = 1.5 if name_p.startswith(("audio_encoder", "visual_encoder")) else 1.0
        torch.testing.assert_close(got, factor * plain, rtol=1e-5, atol=1e-7)


def test_conflict_rate_is_logged_and_checkpointed(tmp_path):
    cb = MMPareto()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1, log_every_n_steps=1))
    trainer.fit(Opposed(), loader())
    assert cb.merges == 4
    rate = trainer.callback_metrics["balance/mmpareto/conflict_rate/audio"].item()
    assert 0.0 < rate <= 1.0 and rate == pytest.approx(cb.conflict_rate["audio"])
    state = cb.state_dict()
    fresh = MMPareto()
    fresh.load_state_dict(state)
    assert fresh.merges == 4 and torch.equal(fresh.conflicts, state["conflicts"])


def test_needs_the_unimodal_losses(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[MMPareto()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="add_unimodal_losses"):
        trainer.fit(TinyAV(), loader())


def test_bad_gamma():
    for bad in (0, -1, "x", True):
        with pytest.raises(ValueError, match="gamma"):
            MMPareto(gamma=bad)


def test_add_unimodal_losses_by_hand():
    model = TinyAV()
    batch = {"audio": torch.randn(5, 6), "visual": torch.randn(5, 5), "target": torch.tensor([0, 1, 2, 3, 0])}
    feats = model.forward_features(batch)
    logits = model.fuse(feats, batch["target"])
    fused = F.cross_entropy(logits, batch["target"])
    model.loss_weights = {"fused": 0.5, "audio": 2.0, "visual": 0.0}
    total = model.add_unimodal_losses(fused)
    w = model.head.weight
    o_a = feats["audio"] @ w[:, :8].T + model.head.bias / 2
    want = 0.5 * fused + 2.0 * F.cross_entropy(o_a, batch["target"])
    torch.testing.assert_close(total, want)
    total.backward()  # attached: the audio encoder learns from its own prediction
    assert model.audio_encoder[0].weight.grad.abs().sum() > 0
    assert set(model.balance_record.extras["objective"]) == {"fused", "audio", "visual"}
    with pytest.raises(ModalityContractError, match="keys"):
        model.loss_weights = {"fused": 1.0, "audio": 1.0}
    with pytest.raises(ModalityContractError, match=">= 0"):
        model.loss_weights = {"fused": 1.0, "audio": -1.0, "visual": 1.0}
    with pytest.raises(ModalityContractError, match="scalar"):
        model.add_unimodal_losses(torch.ones(3))


def test_fp16_amp_uses_unscaled_per_loss_gradients(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    from tests.helpers import flat_params

    def fit(callbacks, **kw):
        model = TinyAV(aux_losses=True)
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=1, **kw)).fit(model, loader())
        return flat_params(model)

    plain = fit([])
    fp32 = fit([MMPareto(gamma=1.5)])
    amp = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    fp16 = fit([MMPareto(gamma=1.5)], plugins=[amp])
    gap = (fp32 - plain).abs().max().item()
    assert gap > 0.01
    assert (fp16 - fp32).abs().max().item() < gap / 5  # a scaled g_u would be 4096x too large


def _edit_with(g_mm, g_u, gamma=1.5):
    """MMPareto's edit on one encoder tensor whose .grad holds g_mm + g_u (what one backward of L_mm + L_u leaves)."""
    cb = MMPareto(gamma=gamma, log_metrics=False)
    audio, visual = torch.nn.Parameter(torch.zeros_like(g_mm)), torch.nn.Parameter(torch.zeros(3))
    audio.grad, visual.grad = (g_mm + g_u).clone(), torch.ones(3)
    cb._groups = cb._trainable = {"audio": [audio], "visual": [visual]}
    cb.conflicts, cb.stationary = torch.zeros(2), torch.zeros(2)
    cb.edit(cb._groups, {"grad/audio/00000": g_u, "grad/visual/00000": torch.full((3,), 0.5)}, torch.device("cpu"))
    return audio.grad, cb


def test_opposed_gradients_are_a_pareto_stationary_step_with_a_zero_gradient():
    g = torch.tensor([[0.3, -1.2, 0.7], [2.0, 0.1, -0.4]])
    for g_u in (-g, -2.5 * g, -2.5 * g * (1 + 1e-5 * torch.randn_like(g))):  # anti-parallel, equal and unequal norms
        merged, cb = _edit_with(g, g_u)
        assert torch.equal(merged, torch.zeros_like(g))  # exactly zero: not NaN (official 0/0), not amplified round-off
        assert cb.stationary.tolist() == [1.0, 0.0] and cb.conflicts.tolist() == [1.0, 0.0]
    # a conflict that is not stationary keeps the Pareto direction, enlarged to the uniform norm
    g_u = torch.tensor([[-0.3, 1.0, 0.2], [-1.0, 0.5, 0.9]])
    merged, cb = _edit_with(g, g_u)
    a, b = g.reshape(-1).double(), g_u.reshape(-1).double()
    w = _official_min_norm(a @ a, a @ b, b @ b)
    g_hat = 2 * (w * g + (1 - w) * g_u)
    expected = 1.5 * g_hat * max(1.0, float((g + g_u).norm() / g_hat.norm()))
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-7)
    assert cb.stationary.tolist() == [0.0, 0.0]


def test_frozen_encoders(tmp_path):
    class Frozen(TinyAV):
        def __init__(self, which):
            super().__init__(aux_losses=True)
            for m in which:
                for p in getattr(self, f"{m}_encoder").parameters():
                    p.requires_grad_(False)

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[MMPareto()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="every balanced encoder is frozen \\(audio, visual"):
        trainer.fit(Frozen(["audio", "visual"]), loader())
    cb = MMPareto()
    model = Frozen(["audio"])
    before = [p.clone() for p in model.audio_encoder.parameters()]
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(model, loader())
    assert cb.merges == 4 and all(torch.equal(a, b) for a, b in zip(before, model.audio_encoder.parameters()))


def test_donated_buffers_are_off_while_mmpareto_trains_and_restored_after(tmp_path):
    """autograd.grad(..., retain_graph=True) is refused by compiled backwards with donated buffers."""
    import torch._functorch.config as functorch_config

    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(functorch_config.donated_buffer)

    before = functorch_config.donated_buffer
    functorch_config.donated_buffer = True
    try:
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[MMPareto(), Spy()], max_epochs=1)).fit(
            TinyAV(aux_losses=True), loader())
        assert seen == [False] * 4 and functorch_config.donated_buffer is True
    finally:
        functorch_config.donated_buffer = before
