"""Each gradient method on batches where some samples lack a modality, against its recipe restated here in plain
torch with the present-only rule written out: an absent modality's features are zeros before the head, and a
modality's statistics (scores, prototypes, unimodal losses) are taken over the samples that have it, each
modality's batch sum put on the footing of the batch (times n / n_m). Nothing here calls the library's math."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import AGM, OGMGE, PMR, MMPareto
from tests.helpers import TinyAV, flat_params, loader, trainer_kwargs
from tests.test_official_recipes import _official_merge, _per_loss_gradients

MISSING = (0.3, 0.25)


def data():
    return loader(missing=MISSING)


def _fit(model, callbacks, tmp_path, epochs):
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=epochs)).fit(model, data())
    return model


def _encode(model, batch):
    """Encoders on every input (garbage where absent), then zeros where a modality is absent."""
    pa, pv = batch["present"]["audio"], batch["present"]["visual"]
    za = torch.where(pa[:, None], model.audio_encoder(batch["audio"]), torch.zeros(()))
    zv = torch.where(pv[:, None], model.visual_encoder(batch["visual"]), torch.zeros(()))
    return za, zv, pa, pv


def _split(model, za, zv):
    w, b = model.head.weight, model.head.bias
    return za @ w[:, :8].T + b / 2, zv @ w[:, 8:].T + b / 2


def _present_score(logits, y, present):
    """Sum of the true-class softmax over the samples that have the modality, times n / n_m."""
    p = torch.softmax(logits, 1)
    rows = [i for i in range(len(y)) if present[i]]
    return sum(float(p[i, y[i]]) for i in rows) * len(y) / len(rows)


def test_the_data_has_absent_modalities_and_garbage_in_them():
    batches = list(data())
    pa = torch.cat([b["present"]["audio"] for b in batches])
    pv = torch.cat([b["present"]["visual"] for b in batches])
    assert 0 < int((~pa).sum()) and 0 < int((~pv).sum()) and bool((pa | pv).all())
    assert float(torch.cat([b["audio"] for b in batches])[~pa].abs().mean()) > 20  # not zeros: garbage


# ------------------------------------------------------------------------------------------------ OGM-GE
def _ogm_present(model, epochs, alpha, noise, seed, count_absent=False):
    """The official OGM-GE loop with the present-only scores (``count_absent``: the zero-filled absent samples
    scored as real ones instead, the defect the rule prevents)."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    edits = 0
    for _ in range(epochs):
        for batch in data():
            y = batch["target"]
            za, zv, pa, pv = _encode(model, batch)
            out_a, out_v = _split(model, za, zv)
            opt.zero_grad()
            F.cross_entropy(model.head(torch.cat([za, zv], 1)), y).backward()
            if count_absent:
                pa = pv = torch.ones(len(y), dtype=torch.bool)
            ratio_v = _present_score(out_v, y, pv) / _present_score(out_a, y, pa)
            coeff_a, coeff_v = 1.0, 1.0
            if ratio_v > 1:
                coeff_v = 1 - math.tanh(alpha * ratio_v)
            else:
                coeff_a = 1 - math.tanh(alpha / ratio_v)
            x = (seed * 0x9E3779B97F4A7C15 + edits * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
            x ^= x >> 31
            gen = torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)  # the documented noise stream
            with torch.no_grad():
                for enc, coeff in ((model.audio_encoder, coeff_a), (model.visual_encoder, coeff_v)):
                    for p in enc.parameters():
                        if p.ndim < 2:
                            continue
                        draw = torch.empty_like(p.grad).normal_(generator=gen) if noise else 0.0
                        p.grad = p.grad * coeff + draw * (p.grad.std() + 1e-8)
            edits += 1
            opt.step()


@pytest.mark.parametrize("noise", [False, True])
def test_ogm_ge_scores_each_modality_over_its_present_samples(tmp_path, noise):
    reference = TinyAV(seed=5)
    _ogm_present(reference, epochs=2, alpha=0.8, noise=noise, seed=11)
    model = _fit(TinyAV(seed=5), [OGMGE(alpha=0.8, noise=noise, seed=11)], tmp_path, 2)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    # counting absent samples as real ones (their zero-filled logits) gives another run
    counted_all = TinyAV(seed=5)
    _ogm_present(counted_all, epochs=2, alpha=0.8, noise=noise, seed=11, count_absent=True)
    assert (flat_params(counted_all) - flat_params(reference)).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ AGM
def test_agm_scores_each_modality_over_its_present_samples(tmp_path):
    reference = TinyAV(seed=2, lr=0.5)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    alpha, run_a, run_v, t = 1.5, 0.0, 0.0, 0
    for _ in range(2):
        for batch in data():
            t += 1
            y = batch["target"]
            za, zv, pa, pv = _encode(reference, batch)
            head = reference.head
            f_av = head(torch.cat([za, zv], 1))
            f_a0 = head(torch.cat([za, torch.zeros_like(zv)], 1))
            f_0v = head(torch.cat([torch.zeros_like(za), zv], 1))
            m_a, m_v = 0.5 * (f_av - f_0v + f_a0), 0.5 * (f_av - f_a0 + f_0v)
            with torch.no_grad():
                nll_a = -torch.log(torch.softmax(m_a, 1).gather(1, y[:, None]).clamp_min(1e-8)).squeeze(1)
                nll_v = -torch.log(torch.softmax(m_v, 1).gather(1, y[:, None]).clamp_min(1e-8)).squeeze(1)
                s_a, s_v = float(nll_a[pa].mean()), float(nll_v[pv].mean())  # means over the present samples
            coeff_a = math.exp(alpha * min(math.exp(run_v - run_a) - math.exp(s_v - s_a), 10.0))
            coeff_v = math.exp(alpha * min(math.exp(run_a - run_v) - math.exp(s_a - s_v), 10.0))
            run_a, run_v = run_a * (t - 1) / t + s_a / t, run_v * (t - 1) / t + s_v / t
            m_a.register_hook(lambda g, c=coeff_a: g * c)
            m_v.register_hook(lambda g, c=coeff_v: g * c)
            opt.zero_grad()
            F.cross_entropy(m_a + m_v, y).backward()
            if head.weight.grad.abs().max() > 1.0:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
            opt.step()
    cb = AGM(alpha=alpha)
    model = _fit(TinyAV(seed=2, lr=0.5), [cb], tmp_path, 2)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    assert cb.running.tolist() == pytest.approx([run_a, run_v], rel=1e-5)


# ------------------------------------------------------------------------------------------------ PMR
def test_pmr_prototypes_and_its_loss_use_present_samples_only(tmp_path):
    reference = TinyAV(seed=4)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    alpha = 2.0

    def prototypes():  # class means over the first batch's samples that have the modality (momentum 0)
        reference.eval()
        with torch.no_grad():
            batch = next(iter(data()))
            za, zv, pa, pv = _encode(reference, batch)
            out = []
            for z, present in ((za, pa), (zv, pv)):
                rows = [[i for i in range(len(z)) if batch["target"][i] == k and present[i]] for k in range(4)]
                out.append(torch.stack([z[r].mean(0) if r else torch.zeros(8) for r in rows]))
                seen = [bool(r) for r in rows]
        reference.train()
        assert all(seen)  # every class has a present sample in this batch: no unseen-class handling needed
        return out

    protos = prototypes()
    used = []
    for _ in range(2):
        used.append(protos)
        for batch in data():
            y = batch["target"]
            za, zv, pa, pv = _encode(reference, batch)
            out = reference.head(torch.cat([za, zv], 1))
            sim_a, sim_v = -torch.cdist(za, protos[0]), -torch.cdist(zv, protos[1])
            ratio = _present_score(sim_a.detach(), y, pa) / _present_score(sim_v.detach(), y, pv)
            beta, lam = (0.0, alpha) if ratio > 1 else (alpha, 0.0)
            n = len(y)  # each loss a batch mean, a sample without the modality adding 0
            loss = (F.cross_entropy(out, y) + beta * F.cross_entropy(sim_a[pa], y[pa], reduction="sum") / n
                    + lam * F.cross_entropy(sim_v[pv], y[pv], reduction="sum") / n)
            opt.zero_grad()
            loss.backward()
            opt.step()
        protos = prototypes()
    cb = PMR(alpha=alpha, momentum=0.0)
    model = _fit(TinyAV(seed=4), [cb], tmp_path, 2)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.centroids["audio"], used[-1][0], rtol=1e-5, atol=1e-6)  # those of the last epoch
    torch.testing.assert_close(cb.centroids["visual"], used[-1][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ MMPareto
def test_mmpareto_merges_unimodal_losses_of_the_present_samples(tmp_path):
    reference = TinyAV(fusion="gated", unimodal="heads", aux_losses=True, seed=6)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    encoders = {"audio": list(reference.audio_encoder.parameters()),
                "visual": list(reference.visual_encoder.parameters())}
    for _ in range(2):
        for batch in data():
            y = batch["target"]
            za, zv, pa, pv = _encode(reference, batch)
            losses = {"both": F.cross_entropy(reference.fusion(za, zv), y),
                      "audio": F.cross_entropy(reference.aux["audio"](za)[pa], y[pa], reduction="sum") / len(y),
                      "visual": F.cross_entropy(reference.aux["visual"](zv)[pv], y[pv], reduction="sum") / len(y)}
            grads = _per_loss_gradients(opt, losses, encoders)  # the official per-loss passes
            _official_merge(encoders, grads, gamma=1.0)
            opt.step()
    model = _fit(TinyAV(fusion="gated", unimodal="heads", aux_losses=True, seed=6), [MMPareto(gamma=1.0)], tmp_path, 2)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ InfoReg
def test_inforeg_scores_each_modality_over_its_present_samples(tmp_path):
    from lightning_balance import InfoReg

    class Logged(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.first = {k: float(v) for k, v in trainer.callback_metrics.items() if "inforeg" in k}

    start = TinyAV(seed=3, aux_losses=True)
    batch = next(iter(data()))
    with torch.no_grad():
        za, zv, pa, pv = _encode(start, batch)
        out_a, out_v = _split(start, za, zv)
    y = batch["target"]
    s_a, s_v = _present_score(out_a, y, pa), _present_score(out_v, y, pv)
    conf_a = float(torch.softmax(out_a, 1)[pa].gather(1, y[pa][:, None]).mean())  # the mean over the present samples
    # epoch 0: the window is open (no history); only the leader is pulled, c = 0.95 (audio) or 0.10 (visual)
    beta_a = 0.95 * math.exp(math.tanh(s_a - s_v)) if s_a > s_v else 0.0
    beta_v = 0.10 * math.exp(math.tanh(s_v - s_a)) if s_v > s_a else 0.0
    logged = Logged()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[InfoReg(), logged], max_steps=1, log_every_n_steps=1)).fit(
        TinyAV(seed=3, aux_losses=True), data())
    assert logged.first["balance/inforeg/confidence/audio"] == pytest.approx(conf_a, rel=1e-5)
    assert logged.first["balance/inforeg/beta/audio"] == pytest.approx(beta_a, rel=1e-5, abs=1e-7)
    assert logged.first["balance/inforeg/beta/visual"] == pytest.approx(beta_v, rel=1e-5, abs=1e-7)
    assert beta_a + beta_v > 0
