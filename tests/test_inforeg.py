"""InfoReg: formulas against hand-computed values, the callback's edit, state and bad input."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_balance import InfoReg, ModalityContractError
from lightning_balance.functional import fisher_trace_increment, inforeg_coefficients, prime_window_indicator
from tests.helpers import TinyAV, loader, trainer_kwargs


def test_fisher_trace_increment_is_sum_of_per_layer_mean_squares():
    g1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean of squares 30/4
    g2 = torch.tensor([[2.0, 0.0, 0.0]])  # 4/3
    assert fisher_trace_increment([g1, g2]).item() == pytest.approx(30 / 4 + 4 / 3)
    assert fisher_trace_increment([]).item() == 0.0


def test_prime_window_indicator_by_hand():
    assert prime_window_indicator([]) == 1.0  # k_0
    assert prime_window_indicator([5.0]) == 1.0  # (5 - 0) / 5
    # W = 3, history 1, 2, 4, 3: padded [0,0,0,1,2,4,3] -> (3 - 1) / (2 + 4 + 3)
    assert prime_window_indicator([1.0, 2.0, 4.0, 3.0], window=3) == pytest.approx(2 / 9)
    # falling traces close the window
    assert prime_window_indicator([4.0, 3.0, 2.0, 1.0], window=3) == pytest.approx((1 - 4) / 6)
    with pytest.raises(ValueError, match="window"):
        prime_window_indicator([1.0], window=0)


def test_coefficients_by_hand():
    open_ = torch.tensor([True, True])
    strengths = torch.tensor([0.95, 0.10])
    # audio leads by 0.3: beta_a = 0.95 exp(tanh 0.3)
    beta = inforeg_coefficients(torch.tensor([1.3, 1.0]), strengths, open_)
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(0.3)), 0.0])
    # visual leads: its own constant
    beta = inforeg_coefficients(torch.tensor([2.0, 7.0]), strengths, open_)
    assert beta.tolist() == pytest.approx([0.0, 0.10 * math.exp(math.tanh(5.0))])
    # tie, or the leader's window closed: nothing
    assert inforeg_coefficients(torch.tensor([2.0, 2.0]), strengths, open_).tolist() == [0.0, 0.0]
    closed = torch.tensor([False, True])
    assert inforeg_coefficients(torch.tensor([3.0, 2.0]), strengths, closed).tolist() == [0.0, 0.0]
    # three modalities: the leader against the runner-up
    beta = inforeg_coefficients(torch.tensor([1.0, 4.0, 3.5]), torch.ones(3), torch.ones(3, dtype=torch.bool))
    assert beta.tolist() == pytest.approx([0.0, math.exp(math.tanh(0.5)), 0.0])
    with pytest.raises(ValueError, match="must match"):
        inforeg_coefficients(torch.ones(2), torch.ones(3), open_)


class Capture(pl.Callback):
    """Records the audio encoder's gradient before and after InfoReg edits it (InfoReg runs first)."""

    def __init__(self):
        self.after = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.after.append([p.grad.clone() for p in pl_module.audio_encoder.parameters()])


def test_edit_is_the_proximal_gradient(tmp_path):
    """Second epoch, step by step: g_after = g_plain + beta (theta - theta_epoch_start) on the dominant encoder."""
    cb = InfoReg(strength=0.7, score="mean", start_epoch=1)
    cap = Capture()
    model = TinyAV()
    start = {}

    class Snap(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            start[trainer.current_epoch] = [p.detach().clone() for p in pl_module.audio_encoder.parameters()]

    class Plain(pl.Callback):  # the gradient before InfoReg's edit, and the theta it sees
        def __init__(self):
            self.before = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before.append(([p.grad.clone() for p in pl_module.audio_encoder.parameters()],
                                [p.detach().clone() for p in pl_module.audio_encoder.parameters()]))

    plain = Plain()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Snap(), plain, cb, cap], max_epochs=2,
                                          log_every_n_steps=1, logger=pl.loggers.CSVLogger(tmp_path)))
    trainer.fit(model, loader())
    assert cb.num_edits == 4  # epoch 1 only
    betas = trainer.callback_metrics
    assert "balance/inforeg/beta/audio" in betas
    # the audio branch dominates TinyAV's data (class means 4x further apart)
    regulated = 0
    for (g_plain, theta), g_after in zip(plain.before[4:], cap.after[4:]):
        diff = [t - s for t, s in zip(theta, start[1])]
        ratio = [(a - p) for a, p in zip(g_after, g_plain)]
        if all(torch.allclose(r, torch.zeros_like(r)) for r in ratio):
            continue
        regulated += 1
        beta = (ratio[0] / diff[0])[diff[0].abs() > 1e-6].mean().item()
        assert 0.7 < beta <= 0.7 * math.e + 1e-5
        for r, d in zip(ratio, diff):
            torch.testing.assert_close(r, beta * d, rtol=1e-4, atol=1e-6)
    assert regulated > 0
    assert len(cb.history) == 1 and len(cb.history[0]) == 2 and all(t > 0 for t in cb.history[0])


def test_window_closes_on_falling_traces(tmp_path):
    cb = InfoReg(window=1, threshold=0.0)
    cb.history = [[4.0, 1.0], [2.0, 3.0]]  # audio falling, visual rising

    class Trainer:
        current_epoch = 2

    model = TinyAV()
    cb._groups = {"audio": model.modality_parameters("audio"), "visual": model.modality_parameters("visual")}
    cb.log_metrics = False
    cb.on_train_epoch_start(Trainer(), model)
    assert cb._window_open.tolist() == [False, True]
    assert cb._window_k == pytest.approx([(2 - 4) / 2, (3 - 1) / 3])
    cb.window_from = "audio"
    cb.on_train_epoch_start(Trainer(), model)
    assert cb._window_open.tolist() == [False, False]
    cb.window_from = "any"
    cb.on_train_epoch_start(Trainer(), model)
    assert cb._window_open.tolist() == [True, True]


def test_official_preset():
    cb = InfoReg.official(audio="a", visual="v")
    assert cb.strength == {"a": 0.95, "v": 0.10} and cb.window_from == "a" and cb.score == "sum"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strength": -1}, "strength"),
        ({"strength": {"audio": "x"}}, "strength"),
        ({"window": 0}, "window"),
        ({"score": "max"}, "score"),
        ({"window_from": ""}, "window_from"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoReg(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strength": {"audio": 1.0}}, "missing: \\['visual'\\]"),
        ({"strength": {"audio": 1.0, "visual": 1.0, "depth": 1.0}}, "unknown: \\['depth'\\]"),
        ({"window_from": "depth"}, "window_from='depth'"),
    ],
)
def test_bad_modalities_named_at_setup(tmp_path, kwargs, match):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[InfoReg(**kwargs)], max_epochs=1))
    with pytest.raises(ModalityContractError, match=match):
        trainer.fit(TinyAV(), loader())
