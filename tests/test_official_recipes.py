"""Each gradient method against its official training loop, restated in plain torch in this file (separate
backward passes, explicit coefficient formulas, the official update order), compared on the parameters
after several epochs. Nothing here calls the library's math: only the models and the data are shared.
(InfoReg's restatement is in tests/test_inforeg.py; Gradient-Blending's in tests/test_gblend*.py.)"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import AGM, OGMGE, PMR, MMPareto
from tests.helpers import TinyAV, flat_params, loader, trainer_kwargs


def _fit(model, callbacks, tmp_path, epochs):
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, max_epochs=epochs)).fit(model, loader())
    return model


def _split(model, za, zv):
    """Split-head unimodal logits of the official code: W_a z_a + b/2, W_v z_v + b/2 (audio first in the concat)."""
    w, b = model.head.weight, model.head.bias
    return za @ w[:, :8].T + b / 2, zv @ w[:, 8:].T + b / 2


def _score(logits, y):
    """Official score: sum over the batch of the softmax probability of the true class (a Python loop, as there)."""
    p = torch.softmax(logits, 1)
    return sum(float(p[i, y[i]]) for i in range(len(y)))


# ------------------------------------------------------------------------------------------------ OGM-GE
def _splitmix_generator(seed: int, counter: int) -> torch.Generator:
    """The documented noise stream of OGMGE(seed=...): a generator seeded by a splitmix of (seed, edit count)."""
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


def _official_ogm_ge(model, epochs, alpha, noise, seed, start=0, end=50):
    """OGM-GE_CVPR2022 main.py: CE on the fused output; after backward, ratio_v = s_v / s_a; the dominant
    modality's encoder weights get g * (1 - tanh(alpha * ratio)) (+ N(0, std(g) + 1e-8) on both, OGM-GE)
    inside modulation_starts <= epoch <= modulation_ends. MLP encoders: the edited tensors are the weight
    matrices (the library's default rule for encoders without convolution kernels)."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    edits = 0
    for epoch in range(epochs):
        for batch in loader():
            y = batch["target"]
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            out = model.head(torch.cat([za, zv], 1))
            out_a, out_v = _split(model, za, zv)
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            ratio_v = _score(out_v, y) / _score(out_a, y)
            ratio_a = 1 / ratio_v
            if ratio_v > 1:
                coeff_v, coeff_a = 1 - math.tanh(alpha * ratio_v), 1.0
            else:
                coeff_a, coeff_v = 1 - math.tanh(alpha * ratio_a), 1.0
            if start <= epoch <= end:
                gen = _splitmix_generator(seed, edits)
                with torch.no_grad():
                    for enc, coeff in ((model.audio_encoder, coeff_a), (model.visual_encoder, coeff_v)):
                        for p in enc.parameters():
                            if p.ndim < 2:
                                continue
                            std = p.grad.std() + 1e-8
                            draw = torch.empty_like(p.grad).normal_(generator=gen) if noise else 0.0
                            p.grad = p.grad * coeff + draw * std
                edits += 1
            opt.step()


@pytest.mark.parametrize("noise", [False, True])
def test_ogm_ge_follows_the_official_loop(tmp_path, noise):
    reference = TinyAV(seed=5)
    _official_ogm_ge(reference, epochs=3, alpha=0.8, noise=noise, seed=11, start=1)
    model = _fit(TinyAV(seed=5), [OGMGE(alpha=0.8, noise=noise, seed=11, start_epoch=1)], tmp_path, 3)
    plain = _fit(TinyAV(seed=5), [], tmp_path, 3)
    assert (flat_params(plain) - flat_params(reference)).abs().max() > 1e-2  # the method did act
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ AGM
def _official_agm(model, epochs, alpha, start=0, end=20, clamp=10.0, clip=1.0):
    """AGM run/CREMAD_main.py + model/CREMAD_net.py: F(a,v) and the zero-padded F(a,0), F(0,v); responses
    m_a = (F(a,v) - F(0,v) + F(a,0)) / 2, m_v = (F(a,v) - F(a,0) + F(0,v)) / 2; scores -mean log max(p_y, 1e-8);
    ratio_a = exp(s_v - s_a), optimal ratio from the running means before this batch; coeff = exp(alpha * min(
    optimal - ratio, 10)); running means updated on every iteration (t counted from the start of training);
    backward hooks on m_a, m_v multiply by the coefficients inside the modulation window (scale 1 before it);
    loss CE(m_a + m_v); the clip rule on every step: if a fusion-weight gradient element leaves [-1, 1], clip the
    total norm to 1."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    run_a = run_v = 0.0
    iteration = 0
    for epoch in range(epochs):
        for batch in loader():
            iteration += 1
            y = batch["target"]
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            f_av = model.head(torch.cat([za, zv], 1))
            f_a0 = model.head(torch.cat([za, torch.zeros_like(zv)], 1))
            f_0v = model.head(torch.cat([torch.zeros_like(za), zv], 1))
            m_a = 0.5 * (f_av - f_0v + f_a0)
            m_v = 0.5 * (f_av - f_a0 + f_0v)
            with torch.no_grad():
                s_a = float(-torch.log(torch.softmax(m_a, 1).gather(1, y[:, None]).clamp_min(1e-8)).mean())
                s_v = float(-torch.log(torch.softmax(m_v, 1).gather(1, y[:, None]).clamp_min(1e-8)).mean())
            ratio_a, ratio_v = math.exp(s_v - s_a), math.exp(s_a - s_v)
            opt_a, opt_v = math.exp(run_v - run_a), math.exp(run_a - run_v)
            coeff_a = math.exp(alpha * min(opt_a - ratio_a, clamp))
            coeff_v = math.exp(alpha * min(opt_v - ratio_v, clamp))
            run_a = run_a * (iteration - 1) / iteration + s_a / iteration
            run_v = run_v * (iteration - 1) / iteration + s_v / iteration
            if start <= epoch <= end:
                m_a.register_hook(lambda g, c=coeff_a: g * c)
                m_v.register_hook(lambda g, c=coeff_v: g * c)
            opt.zero_grad()
            F.cross_entropy(m_a + m_v, y).backward()
            g = model.head.weight.grad
            if g.max() > clip or g.min() < -clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
            opt.step()
    return run_a, run_v, iteration


def test_agm_follows_the_official_loop(tmp_path):
    reference = TinyAV(seed=2, lr=0.5)
    run_a, run_v, iterations = _official_agm(reference, epochs=3, alpha=1.5, start=1, clip=0.05)
    cb = AGM(alpha=1.5, start_epoch=1, clip=0.05)  # a threshold the head's gradients cross on some steps
    model = _fit(TinyAV(seed=2, lr=0.5), [cb], tmp_path, 3)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    assert cb.iterations == iterations == 12  # every step, also before start_epoch
    assert cb.running.tolist() == pytest.approx([run_a, run_v], rel=1e-5)
    no_clip = _fit(TinyAV(seed=2, lr=0.5), [AGM(alpha=1.5, start_epoch=1, clip=None)], tmp_path, 3)
    assert (flat_params(no_clip) - flat_params(reference)).abs().max() > 1e-3  # the clip rule fired


# ------------------------------------------------------------------------------------------------ PMR
def _official_pmr(model, epochs, alpha, momentum):
    """Modal-Imbalance-PMR main_Prototype_grad.py: prototypes = class means of the features (eval, no_grad) over the
    first len(loader) // 10 batches (here: 1), before training and after every epoch; momentum
    c = (1 - mu) c_new + mu c_old when the epoch just finished is > 0; per step: prototype logits -||z - c||,
    ratio = s_a^p / s_v^p of the summed true-class softmax, loss = CE(out) + alpha * CE(visual protos) if ratio > 1,
    + alpha * CE(audio protos) if ratio < 1."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)

    def prototypes(epoch, old):
        model.eval()
        with torch.no_grad():
            batch = next(iter(loader()))
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            y = batch["target"]
            new = []
            for z, prev in zip((za, zv), old or (None, None)):
                sums, counts = torch.zeros(4, 8), [0] * 4
                for i, label in enumerate(y.tolist()):
                    sums[label] += z[i]
                    counts[label] += 1
                c = torch.stack([sums[k] / counts[k] for k in range(4)])
                new.append(c if epoch <= 0 else (1 - momentum) * c + momentum * prev)
        model.train()
        return new

    protos = prototypes(0, None)
    history = [protos]
    for epoch in range(epochs):
        for batch in loader():
            y = batch["target"]
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            out = model.head(torch.cat([za, zv], 1))
            sim_a, sim_v = -torch.cdist(za, protos[0]), -torch.cdist(zv, protos[1])
            ratio = _score(sim_a.detach(), y) / _score(sim_v.detach(), y)
            beta, lam = (0.0, alpha) if ratio > 1 else (alpha, 0.0) if ratio < 1 else (0.0, 0.0)
            loss = F.cross_entropy(out, y) + beta * F.cross_entropy(sim_a, y) + lam * F.cross_entropy(sim_v, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        protos = prototypes(epoch, protos)
        history.append(protos)
    return history


def test_pmr_follows_the_official_loop(tmp_path):
    reference = TinyAV(seed=4)
    history = _official_pmr(reference, epochs=4, alpha=2.0, momentum=0.5)
    cb = PMR(alpha=2.0, momentum=0.5)
    model = _fit(TinyAV(seed=4), [cb], tmp_path, 4)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    # the prototypes the callback used in the last epoch are the official ones of that epoch (momentum included)
    torch.testing.assert_close(cb.centroids["audio"], history[3][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.centroids["visual"], history[3][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ MMPareto
def _per_loss_gradients(opt, losses, encoders):
    """The official per-loss passes: one retain-graph backward per loss with the encoders' gradients cloned and
    zeroed in between, then the summed loss's backward (which leaves the heads' ordinary gradients)."""
    grads = {}
    for name, loss in losses.items():
        opt.zero_grad()
        loss.backward(retain_graph=True)
        grads[name] = {m: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ps]
                       for m, ps in encoders.items()}
    opt.zero_grad()
    sum(losses.values()).backward()
    return grads


def _official_min_norm_weight(a, b):
    """min_norm_solvers._min_norm_element_from2 for x1 = g_mm (a), x2 = g_u (b): the weight of g_mm."""
    v11, v12, v22 = float(a @ a), float(a @ b), float(b @ b)
    return 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else -(v12 - v22) / (v11 + v22 - 2 * v12)


def _official_merge(encoders, grads, gamma, coeff=None):
    """The official merge of each encoder's gradients after the per-loss passes (in place on ``p.grad``):
    (0.5, 0.5) if the multimodal and unimodal gradients agree (cos > 0), else the two-vector min-norm
    weights; per tensor gamma * g_hat * max(1, |g_mm + g_u| / |g_hat|), g_hat = 2 (w g_mm + (1 - w) g_u).
    ``coeff`` (modality -> factor): OGM's coefficient on the merged weight matrices, for a stack."""
    with torch.no_grad():
        for m, params in encoders.items():
            g_mm, g_u = grads["both"][m], grads[m][m]
            a = torch.cat([g.reshape(-1) for g in g_mm]).double()
            b = torch.cat([g.reshape(-1) for g in g_u]).double()
            w = 0.5 if float(a @ b) > 0 else _official_min_norm_weight(a, b)
            for p, gm, gu in zip(params, g_mm, g_u):
                g_hat = 2 * w * gm + 2 * (1 - w) * gu
                p.grad = gamma * g_hat * max(1.0, float(p.grad.norm() / g_hat.norm()))
                if coeff is not None and p.ndim >= 2:
                    p.grad = p.grad * coeff[m]


def _official_mmpareto(model, epochs, gamma):
    """MMPareto_ICML2024 code/MMPareto.py with separate unimodal heads: one backward per loss (L_mm, L_a, L_v) with
    the encoder gradients cloned; cos over the whole encoder; (0.5, 0.5) if cos > 0, else the two-vector min-norm
    point of min_norm_solvers._min_norm_element_from2 (0.999 / 0.001 in its degenerate cases, else unclipped);
    then the summed loss's backward; per encoder tensor
    grad = gamma * g_hat * max(1, |g_mm + g_u| / |g_hat|), g_hat = 2 (w_mm g_mm + w_u g_u); heads keep theirs."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    encoders = {"audio": list(model.audio_encoder.parameters()), "visual": list(model.visual_encoder.parameters())}
    conflicts = 0
    for _ in range(epochs):
        for batch in loader():
            y = batch["target"]
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            out = model.fusion(za, zv)
            losses = {"both": F.cross_entropy(out, y), "audio": F.cross_entropy(model.aux["audio"](za), y),
                      "visual": F.cross_entropy(model.aux["visual"](zv), y)}
            grads = _per_loss_gradients(opt, losses, encoders)
            with torch.no_grad():
                for m, params in encoders.items():
                    g_mm, g_u = grads["both"][m], grads[m][m]
                    a = torch.cat([g.reshape(-1) for g in g_mm]).double()
                    b = torch.cat([g.reshape(-1) for g in g_u]).double()
                    cos = float(a @ b / (a.norm() * b.norm()))
                    if cos > 0:
                        w = 0.5
                    else:
                        conflicts += 1
                        w = _official_min_norm_weight(a, b)
                    for p, gm, gu in zip(params, g_mm, g_u):
                        uniform = p.grad.norm()
                        g_hat = 2 * w * gm + 2 * (1 - w) * gu
                        ratio = uniform / g_hat.norm()
                        p.grad = (ratio * g_hat * gamma) if ratio > 1 else (g_hat * gamma)
            opt.step()
    return conflicts


class _Opposed(TinyAV):
    """Auxiliary heads that start as negated fusion weights: the two gradients of each encoder conflict early."""

    def __init__(self, seed):
        super().__init__(fusion="gated", unimodal="heads", aux_losses=True, seed=seed)
        with torch.no_grad():
            self.aux["audio"].weight.copy_(-self.fusion.out.weight * 3)
            self.aux["visual"].weight.copy_(-self.fusion.out.weight * 3)


def test_mmpareto_follows_the_official_loop(tmp_path):
    reference = _Opposed(seed=6)
    conflicts = _official_mmpareto(reference, epochs=3, gamma=1.5)
    assert conflicts > 0  # the Pareto branch is exercised, not only the uniform one
    cb = MMPareto(gamma=1.5)
    model = _fit(_Opposed(seed=6), [cb], tmp_path, 3)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-4, atol=1e-5)
    assert int(cb.conflicts.sum()) == conflicts


def test_restatements_are_not_the_plain_run(tmp_path):
    """The restated recipes differ from training without the method, so the comparisons above are not vacuous."""
    plain = flat_params(_fit(TinyAV(seed=4), [], tmp_path, 4))
    reference = TinyAV(seed=4)
    _official_pmr(reference, epochs=4, alpha=2.0, momentum=0.5)
    assert (plain - flat_params(reference)).abs().max() > 1e-2
    plain = flat_params(_fit(TinyAV(seed=2, lr=0.5), [], tmp_path, 3))
    reference = TinyAV(seed=2, lr=0.5)
    _official_agm(reference, epochs=3, alpha=1.5, start=1)
    assert (plain - flat_params(reference)).abs().max() > 1e-2
    reference = copy.deepcopy(_Opposed(seed=6))
    plain = flat_params(_fit(_Opposed(seed=6), [], tmp_path, 3))
    _official_mmpareto(reference, epochs=3, gamma=1.5)
    assert (plain - flat_params(reference)).abs().max() > 1e-2


def test_mmpareto_then_ogm_follows_the_declared_order(tmp_path):
    """A stack restated: each step, MMPareto's official merge of the encoders' gradients, then OGM's coefficient
    (from the unimodal heads' scores) on the merged weight matrices — the declared order, whatever the list order."""
    reference = _Opposed(seed=7)
    opt = torch.optim.SGD(reference.parameters(), lr=reference.lr, momentum=reference.momentum)
    encoders = {"audio": list(reference.audio_encoder.parameters()), "visual": list(reference.visual_encoder.parameters())}
    alpha = 0.8
    for _ in range(2):
        for batch in loader():
            y = batch["target"]
            za, zv = reference.audio_encoder(batch["audio"]), reference.visual_encoder(batch["visual"])
            uni = {"audio": reference.aux["audio"](za), "visual": reference.aux["visual"](zv)}
            losses = {"both": F.cross_entropy(reference.fusion(za, zv), y), "audio": F.cross_entropy(uni["audio"], y),
                      "visual": F.cross_entropy(uni["visual"], y)}
            grads = _per_loss_gradients(opt, losses, encoders)
            ratio_v = _score(uni["visual"].detach(), y) / _score(uni["audio"].detach(), y)
            coeff = {"audio": 1.0, "visual": 1.0}
            if ratio_v > 1:
                coeff["visual"] = 1 - math.tanh(alpha * ratio_v)
            else:
                coeff["audio"] = 1 - math.tanh(alpha / ratio_v)
            _official_merge(encoders, grads, gamma=1.5, coeff=coeff)  # then OGM on the merged weight matrices
            opt.step()
    for order in ((MMPareto(), OGMGE(alpha=alpha, noise=False)), (OGMGE(alpha=alpha, noise=False), MMPareto())):
        model = _fit(_Opposed(seed=7), list(order), tmp_path, 2)
        torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-4, atol=1e-5)
