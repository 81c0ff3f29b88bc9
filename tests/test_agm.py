"""AGM: Shapley weights and coefficients against hand-computed values; the backward-pass modulation
against the official mechanism (identity modules whose backward hooks multiply by κ_u); bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import AGM
from lightning_balance.functional import agm_coefficients, agm_scores, shapley_responses, shapley_weights
from tests.helpers import FirstGradients, DictDataset, TinyAV, loader, trainer_kwargs


def test_shapley_weights_two_and_three_modalities():
    # subsets as bit masks: 1 = {a}, 2 = {v}, 3 = {a, v}
    expected2 = torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]])
    torch.testing.assert_close(shapley_weights(2), expected2)
    w = shapley_weights(3)  # modalities A=bit0, V=bit1, T=bit2
    # phi_A = 1/3 [F(AVT) - F(VT)] + 1/6 [F(AV) - F(V) + F(AT) - F(T)] + 1/3 F(A)
    expected_a = {0b111: 1 / 3, 0b110: -1 / 3, 0b011: 1 / 6, 0b010: -1 / 6, 0b101: 1 / 6, 0b100: -1 / 6, 0b001: 1 / 3}
    for subset, value in expected_a.items():
        assert w[0, subset - 1].item() == pytest.approx(value)
    torch.testing.assert_close(w.sum(0), torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))


def test_responses_sum_to_the_fused_output():
    subsets = torch.randn(3, 4, 5)
    m = shapley_responses(subsets, shapley_weights(2))
    torch.testing.assert_close(m.sum(0), subsets[-1])
    torch.testing.assert_close(m[0], 0.5 * (subsets[2] - subsets[1] + subsets[0]))


def test_scores_and_coefficients_by_hand():
    responses = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # M=2, N=1, C=2
    y = torch.tensor([0])
    scores = agm_scores(responses, y)
    la, lv = -math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e))
    assert scores.tolist() == pytest.approx([la, lv])
    running = torch.tensor([0.3, 0.9])
    kappa, r, r_bar = agm_coefficients(scores, running, alpha=0.5, clamp=10.0)
    r_a, r_v = math.exp(lv - la), math.exp(la - lv)  # M/(M-1) (mean - l_u) = l_other - l_u
    rb_a, rb_v = math.exp(0.9 - 0.3), math.exp(0.3 - 0.9)
    assert r.tolist() == pytest.approx([r_a, r_v], rel=1e-5)
    assert r_bar.tolist() == pytest.approx([rb_a, rb_v], rel=1e-5)
    assert kappa.tolist() == pytest.approx([math.exp(0.5 * (rb_a - r_a)), math.exp(0.5 * (rb_v - r_v))], rel=1e-5)
    # the clamp bounds the boost
    kappa, _, _ = agm_coefficients(torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0]), alpha=1.0, clamp=2.0)
    assert kappa[0].item() == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="at least 2"):
        shapley_weights(1)




@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_first_step_matches_the_official_hook_mechanism(tmp_path, fusion):
    cb = AGM(alpha=1.5, clip=None)
    probe = FirstGradients()
    model = TinyAV(fusion=fusion)
    reference = TinyAV(fusion=fusion)
    reference.load_state_dict(model.state_dict())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, probe], max_steps=1))
    trainer.fit(model, loader())

    # official mechanism on the same first batch: F(a,v), F(a,0), F(0,v) with autograd; m_a, m_v; hooks x kappa
    data = DictDataset(n=64)
    batch = {k: torch.stack([data[i][k] for i in range(16)]) for k in ("audio", "visual", "target")}
    za, zv = reference.audio_encoder(batch["audio"]), reference.visual_encoder(batch["visual"])
    fuse = reference.fuse_features
    f_av = fuse({"audio": za, "visual": zv})
    f_a0 = fuse({"audio": za, "visual": torch.zeros_like(zv)})
    f_0v = fuse({"audio": torch.zeros_like(za), "visual": zv})
    m_a = 0.5 * (f_av - f_0v + f_a0)
    m_v = 0.5 * (f_av - f_a0 + f_0v)
    y = batch["target"]
    la = -torch.log(torch.softmax(m_a, -1).gather(1, y[:, None]).clamp_min(1e-8)).mean()
    lv = -torch.log(torch.softmax(m_v, -1).gather(1, y[:, None]).clamp_min(1e-8)).mean()
    # first iteration: running means are 0, so r_bar = 1
    kappa_a = math.exp(1.5 * min(1 - math.exp(lv.item() - la.item()), 10))
    kappa_v = math.exp(1.5 * min(1 - math.exp(la.item() - lv.item()), 10))
    assert kappa_a != pytest.approx(1.0, abs=1e-3)
    m_a.register_hook(lambda g: g * kappa_a)
    m_v.register_hook(lambda g: g * kappa_v)
    F.cross_entropy(m_a + m_v, y).backward()
    for got, p in zip(probe.grads, reference.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7)
    assert cb.iterations == 1
    assert cb.running.tolist() == pytest.approx([la.item(), lv.item()], rel=1e-5)


def test_clip_rule(tmp_path):
    """With a tiny threshold the rule always fires: every step's gradient norm is at most `clip`."""
    norms = []

    class Norm(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.append(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).norm().item())

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AGM(clip=1e-3), Norm()], max_epochs=1))
    trainer.fit(TinyAV(lr=0.5), loader())
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-4)


def test_logs_under_balance_agm(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AGM()], max_epochs=1, log_every_n_steps=1))
    trainer.fit(TinyAV(), loader())
    keys = {k for k in trainer.callback_metrics if k.startswith("balance/agm/")}
    assert {f"balance/agm/{k}/{m}" for k in ("kappa", "score", "ratio", "target_ratio")
            for m in ("audio", "visual")} <= keys


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": -1}, "alpha"), ({"clamp": "x"}, "clamp"), ({"clip": -2}, "clip"), ({"accumulation": "sum"}, "accumulation")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AGM(**kwargs)


def test_logged_kappa_is_the_applied_one_outside_the_window(tmp_path):
    """Outside [start_step, end_step] no gradient is modulated: the logged kappa is 1 there, the computed one inside."""

    class Record(pl.Callback):
        def __init__(self):
            self.kappa = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.kappa.append(float(trainer.callback_metrics["balance/agm/kappa/audio"]))

    agm, record = AGM(alpha=1.0, start_step=2, end_step=3), Record()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[agm, record], max_steps=6, log_every_n_steps=1)).fit(
        TinyAV(), loader(n=128))
    assert record.kappa[:2] == [1.0, 1.0] and record.kappa[4:] == [1.0, 1.0]
    assert all(k != pytest.approx(1.0, abs=1e-4) for k in record.kappa[2:4]), record.kappa
    assert agm.iterations == 6  # the running means advance on every step, in the window or not
