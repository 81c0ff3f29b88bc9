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
    cb = InfoReg(strength=0.7, score="mean", start_epoch=1, unimodal_losses=False)
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
    # the trace is measured in every epoch, also before start_epoch (the official history has no gaps)
    assert len(cb.history) == 2 and all(len(h) == 2 and all(t > 0 for t in h) for h in cb.history)


def test_window_closes_on_falling_traces(tmp_path):
    cb = InfoReg(window=1, threshold=0.0, window_from="own")
    cb.history = [[4.0, 1.0], [2.0, 3.0]]  # audio falling, visual rising
    model = TinyAV()
    cb._groups = {"audio": model.modality_parameters("audio"), "visual": model.modality_parameters("visual")}
    cb.log_metrics = False
    cb.begin_epoch(None, model, 2)
    assert cb._window_open.tolist() == [False, True]
    assert cb._window_k == pytest.approx([(2 - 4) / 2, (3 - 1) / 3])
    for rule, expected in (("audio", [False, False]), ("first", [False, False]), ("visual", [True, True]),
                           ("any", [True, True]), ("all", [False, False])):
        cb.window_from = rule
        cb.begin_epoch(None, model, 2)
        assert cb._window_open.tolist() == expected, rule


def test_official_preset_and_the_paper_defaults():
    cb = InfoReg.official(audio="a", visual="v")
    assert cb.strength == {"a": 0.95, "v": 0.10} and cb.window_from == "a" and cb.score == "sum"
    default = InfoReg()  # the published method for two modalities: first declared = the paper's audio
    assert default.strength == (0.95, 0.10) and default.window_from == "first" and default.unimodal_losses
    assert default.score == "sum" and default.threshold == 0.05 and default.window == 10
    default._groups = {"a": [], "v": [], "t": []}
    assert default._strength_values() == [0.95, 0.10, 0.10]  # M = 3: documented generalisation


def test_default_requires_the_unimodal_losses_of_the_paper(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[InfoReg()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="add_unimodal_losses.*unimodal_losses=False"):
        trainer.fit(TinyAV(), loader())


def _swapped_loader():
    """TinyAV's data with the roles swapped: the second modality ("visual") is the strong one, so the paper's
    0.10 constant and the first modality's trace (the window's source) are what the run exercises."""
    from torch.utils.data import DataLoader

    from tests.helpers import DictDataset, InterleavedSampler

    class Swapped(DictDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {"audio": item["visual"], "visual": item["audio"], "target": item["target"]}

    return DataLoader(Swapped(n=64), batch_size=16, sampler=InterleavedSampler(64))


def _official_inforeg(model, epochs, lr=0.1, momentum=0.9, threshold=0.05, window=10, data=loader):
    """The official InfoReg training loop (GeWu-Lab/InfoReg_CVPR2025, main.py), restated for TinyAV in plain torch:
    split-head unimodal logits with bias/2, L = CE(out) + CE(out_a) + CE(out_v) back-propagated, scores = batch sums
    of the true-class softmax probability, beta_a = 0.95 exp(tanh(s_a - s_v)) if s_a > s_v and k > 0.05,
    beta_v = 0.10 exp(tanh(s_v - s_a)) if s_v > s_a and k > 0.05, grad += beta (theta - theta_epoch_start) on the
    dominant encoder, Fisher trace of the final gradients of each encoder's Linear weights, k from the audio
    trace list pre-padded with 10 zeros: k = (mean(T[-10:]) - mean(T[-11:-1])) / mean(T[-10:]), k_0 = 1."""
    import copy

    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    audio_traces = [0.0] * window
    w = model.head.weight
    ks = []
    for epoch in range(epochs):
        if epoch == 0:
            k = 1.0
        else:
            tr1 = sum(audio_traces[-window:]) / window
            tr2 = sum(audio_traces[-window - 1:-1]) / window
            k = (tr1 - tr2) / tr1
        ks.append(k)
        start = copy.deepcopy(model)
        fim = {n: torch.zeros_like(m.weight) for n, m in model.audio_encoder.named_modules() if isinstance(m, torch.nn.Linear)}
        for batch in data():
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            y = batch["target"]
            out = model.head(torch.cat([za, zv], 1))
            out_a = za @ w[:, :8].T + model.head.bias / 2
            out_v = zv @ w[:, 8:].T + model.head.bias / 2
            opt.zero_grad()
            (F.cross_entropy(out, y) + F.cross_entropy(out_a, y) + F.cross_entropy(out_v, y)).backward()
            score_a = sum(torch.softmax(out_a, 1)[i, y[i]] for i in range(len(y)))
            score_v = sum(torch.softmax(out_v, 1)[i, y[i]] for i in range(len(y)))
            beta_a = beta_v = 0.0
            if score_a > score_v and k > threshold:
                beta_a = 0.95 * math.exp(math.tanh(float(score_a - score_v)))
            elif score_a < score_v and k > threshold:
                beta_v = 0.10 * math.exp(math.tanh(float(score_v - score_a)))
            with torch.no_grad():
                for p, p0 in zip(model.audio_encoder.parameters(), start.audio_encoder.parameters()):
                    p.grad += beta_a * (p - p0)
                for p, p0 in zip(model.visual_encoder.parameters(), start.visual_encoder.parameters()):
                    p.grad += beta_v * (p - p0)
                for n, m in model.audio_encoder.named_modules():
                    if isinstance(m, torch.nn.Linear):
                        fim[n] += m.weight.grad * m.weight.grad
            opt.step()
        audio_traces.append(sum(float(f.mean()) for f in fim.values()))
    return audio_traces[window:], ks


def test_parameters_follow_the_official_recipe_over_several_epochs(tmp_path):
    from tests.helpers import flat_params

    reference = TinyAV(seed=3)
    traces, _ = _official_inforeg(reference, epochs=3)
    model = TinyAV(seed=3, aux_losses=True)
    cb = InfoReg()  # the defaults: the published method
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(model, loader())
    assert cb.num_edits == 12
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    assert [h[0] for h in cb.history] == pytest.approx(traces, rel=1e-5)


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


def test_the_window_closes_and_reopens_as_in_the_official_loop(tmp_path):
    """With a short window and a high threshold the official indicator closes the window in some epochs: the
    parameters after 5 epochs still equal the restated loop, so regulation stops (and resumes) when it does."""
    from tests.helpers import flat_params

    reference = TinyAV(seed=3)
    _, ks = _official_inforeg(reference, epochs=5, threshold=0.5, window=2)
    assert any(k <= 0.5 for k in ks) and any(k > 0.5 for k in ks), ks  # both open and closed epochs
    model = TinyAV(seed=3, aux_losses=True)
    cb = InfoReg(threshold=0.5, window=2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=5)).fit(model, loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_the_visual_constant_and_the_first_modalitys_window_when_visual_leads(tmp_path):
    """Visual dominant: the official loop regulates it with 0.10 and opens the window from the audio trace; the
    defaults must do the same (a symmetric strength or each modality's own window would not)."""
    from tests.helpers import flat_params

    reference = TinyAV(seed=3, dims=(5, 6))
    _, ks = _official_inforeg(reference, epochs=5, threshold=0.5, window=2, data=_swapped_loader)
    model = TinyAV(seed=3, dims=(5, 6), aux_losses=True)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[InfoReg(threshold=0.5, window=2)], max_epochs=5)).fit(
        model, _swapped_loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    for variant in (InfoReg(threshold=0.5, window=2, strength=0.95), InfoReg(threshold=0.5, window=2, window_from="own")):
        other = TinyAV(seed=3, dims=(5, 6), aux_losses=True)
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[variant], max_epochs=5)).fit(other, _swapped_loader())
        assert (flat_params(other) - flat_params(reference)).abs().max() > 1e-4  # the defaults are discriminated
