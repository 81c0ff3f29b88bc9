"""Greedy and MMTM: the module's formulas by hand, the guided algorithm against the official loop restated
(``MMTM_mitigate`` + ``Bias_Mitigation_Strong``: separate sums per group, numpy log10, the window counter), DDP,
accumulation, resume inside a window, fp16 overflow, stacking in both orders, absence, M = 3 tokens, bad input."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_balance import MMTM, OGMGE, Greedy, MultimodalMixin, cross_modal_off
from lightning_balance._errors import ModalityContractError
from lightning_balance.functional.greedy import conditional_utilization_rate, squeeze
from tests.helpers import OverflowAt, SaveParams, flat_params, fp16_plugin, loader, resume_inside_an_epoch, \
    resumable_loader, states_equal, trainer_kwargs


class MeanFusion(nn.Module):
    """The official prediction: the average of the branches' logits."""

    def forward(self, *logits: torch.Tensor) -> torch.Tensor:
        return torch.stack(logits).mean(0)


class GreedyNet(MultimodalMixin, pl.LightningModule):
    """Two Conv1d branches joined by two MMTMs, a classifier per branch; loss = the sum of the branches'
    cross-entropies (the official ``blend_loss``)."""

    def __init__(self, seed: int = 0, lr: float = 0.1, tokens: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a1, self.v1 = nn.Conv1d(1, 4, 3, padding=1), nn.Conv1d(1, 4, 3, padding=1)
        self.a2, self.v2 = nn.Conv1d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
        self.fa, self.fv = nn.Linear(4, 4), nn.Linear(4, 4)
        self.mmtm1, self.mmtm2 = MMTM({"audio": 4, "visual": 4}, ratio=2), MMTM([4, 4], ratio=2)
        self.lr = lr
        self.fusion = MeanFusion()
        self.configure_modalities({"audio": [self.a1, self.a2, self.fa], "visual": [self.v1, self.v2, self.fv]},
                                  fusion=self.fusion)

    def branches(self, batch, mmtm=None):
        present = batch.get("present")
        xa, xv = torch.relu(self.a1(batch["audio"][:, None])), torch.relu(self.v1(batch["visual"][:, None]))
        xa, xv = self.mmtm1(xa, xv, present=present) if mmtm is None else mmtm(self.mmtm1, xa, xv)
        xa, xv = torch.relu(self.a2(xa)), torch.relu(self.v2(xv))
        xa, xv = self.mmtm2(xa, xv, present=present) if mmtm is None else mmtm(self.mmtm2, xa, xv)
        return self.fa(xa.mean(-1)), self.fv(xv.mean(-1))

    def training_step(self, batch, batch_idx):
        la, lv = self.branches(batch)
        self.fuse({"audio": la, "visual": lv}, batch["target"], present=batch.get("present"))
        return F.cross_entropy(la, batch["target"]) + F.cross_entropy(lv, batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Trace(pl.Callback):
    """The cared-for modality after each optimizer step (what the next forward uses), as the MMTMs hold it."""

    def __init__(self) -> None:
        self.caring: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.caring.append(int(pl_module.mmtm1.caring))


# ---------------------------------------------------------------------- the module by hand
def test_mmtm_gates_by_hand_and_running_averages():
    torch.manual_seed(0)
    mmtm = MMTM({"a": 3, "b": 2}, ratio=2)  # hidden int(2 * 5 / 2) = 5
    assert mmtm.squeeze.out_features == 5
    xa, xb = torch.randn(4, 3, 7), torch.randn(4, 2, 5, 2)
    sa, sb = xa.mean(-1), xb.reshape(4, 2, -1).mean(-1)
    z = torch.relu(torch.cat([sa, sb], 1) @ mmtm.squeeze.weight.T + mmtm.squeeze.bias)
    ga = torch.sigmoid(z @ mmtm.excite[0].weight.T + mmtm.excite[0].bias)
    gb = torch.sigmoid(z @ mmtm.excite[1].weight.T + mmtm.excite[1].bias)
    oa, ob = mmtm(xa, xb)  # training mode, unmanaged: folded at once
    torch.testing.assert_close(oa, xa * ga[:, :, None])
    torch.testing.assert_close(ob, xb * gb[:, :, None, None])
    torch.testing.assert_close(mmtm.gate_mean[0], ga.mean(0))
    torch.testing.assert_close(mmtm.gate_mean[1], gb.mean(0))  # its own gate (the official code: ga for both)
    mmtm(xa[:2], xb[:2])
    ga2 = torch.sigmoid(torch.relu(torch.cat([sa[:2], sb[:2]], 1) @ mmtm.squeeze.weight.T + mmtm.squeeze.bias)
                        @ mmtm.excite[0].weight.T + mmtm.excite[0].bias)
    torch.testing.assert_close(mmtm.gate_mean[0], (ga.mean(0) + ga2.mean(0)) / 2)  # mean of the batch means
    torch.testing.assert_close(mmtm.squeeze_mean[1], torch.cat([sb, sb[:2]]).mean(0))  # mean over samples
    mmtm.eval()
    steps = mmtm.gate_steps.clone()
    mmtm(xa, xb)
    assert torch.equal(mmtm.gate_steps, steps)  # evaluation folds nothing
    # re-balancing (training mode): modality 1's gate is its running average, modality 0's is live
    mmtm.train()
    mmtm.set_caring(torch.tensor(1))
    mean_b = mmtm.gate_mean[1].clone()
    oa, ob = mmtm(xa, xb)
    # unmanaged, the batch is folded before it is used (official order): the average of three batch means
    torch.testing.assert_close(mmtm.gate_mean[1], (2 * mean_b + gb.mean(0)) / 3)
    torch.testing.assert_close(ob, xb * mmtm.gate_mean[1][None, :, None, None])
    torch.testing.assert_close(oa, xa * ga[:, :, None])
    assert squeeze(torch.randn(2, 5, 3), channel_dim=-1).shape == (2, 3)


def test_absent_rows_take_the_average_squeeze_and_count_nowhere():
    torch.manual_seed(1)
    mmtm = MMTM({"a": 3, "b": 2}, ratio=1)
    xa, xb = torch.randn(6, 3, 4), torch.randn(6, 2, 4)
    mmtm(xa, xb)  # one step of statistics
    sq_b, steps = mmtm.squeeze_mean[1].clone(), mmtm.squeeze_count.clone()
    present = torch.tensor([[True, True], [True, False], [True, False], [True, True], [True, True], [True, True]])
    xb_nan = xb.clone()
    xb_nan[~present[:, 1]] = float("nan")
    oa, _ = mmtm(xa, xb_nan, present=present)
    sb = torch.where(present[:, 1:], xb.mean(-1), sq_b)
    z = torch.relu(torch.cat([xa.mean(-1), sb], 1) @ mmtm.squeeze.weight.T + mmtm.squeeze.bias)
    ga = torch.sigmoid(z @ mmtm.excite[0].weight.T + mmtm.excite[0].bias)
    torch.testing.assert_close(oa, xa * ga[:, :, None])  # finite: the NaN rows never reach the gates
    torch.testing.assert_close(mmtm.squeeze_count, steps + torch.tensor([6.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(mmtm.squeeze_mean[1], (sq_b * 6 + xb.mean(-1)[present[:, 1]].sum(0)) / 10)


def test_cross_modal_off_and_the_utilisation_rate():
    torch.manual_seed(2)
    mmtm = MMTM({"a": 2, "b": 3}, ratio=1)
    xa, xb = torch.randn(5, 2, 3), torch.randn(5, 3, 3)
    mmtm(xa, xb)
    mmtm.eval()
    with cross_modal_off(nn.Sequential(mmtm)):
        oa, ob = mmtm(xa, xb)
    mean_a, mean_b = mmtm.squeeze_mean
    z_a = torch.relu(torch.cat([xa.mean(-1), mean_b.expand(5, 3)], 1) @ mmtm.squeeze.weight.T + mmtm.squeeze.bias)
    z_b = torch.relu(torch.cat([mean_a.expand(5, 2), xb.mean(-1)], 1) @ mmtm.squeeze.weight.T + mmtm.squeeze.bias)
    torch.testing.assert_close(oa, xa * torch.sigmoid(z_a @ mmtm.excite[0].weight.T + mmtm.excite[0].bias)[:, :, None])
    torch.testing.assert_close(ob, xb * torch.sigmoid(z_b @ mmtm.excite[1].weight.T + mmtm.excite[1].bias)[:, :, None])
    assert not mmtm.turned_off
    assert float(conditional_utilization_rate(0.8, 0.6)) == pytest.approx(0.25)
    with pytest.warns(UserWarning, match="no average squeezed map yet"):
        with cross_modal_off(MMTM([2, 2])):
            pass
    with pytest.raises(ModalityContractError, match="no MMTM"):
        with cross_modal_off(nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------------- the official loop restated
def _official_mmtm(mmtm, avg, xa, xv, caring):
    """MMTM_mitigate.forward restated from the weights (copy-paste bug fixed: each modality's own average)."""
    s = torch.cat([xa.mean(-1), xv.mean(-1)], 1)
    e = torch.relu(F.linear(s, mmtm.squeeze.weight, mmtm.squeeze.bias))
    g = [torch.sigmoid(F.linear(e, mmtm.excite[k].weight, mmtm.excite[k].bias)) for k in range(2)]
    batch_means = [x.detach().mean(0) for x in g]
    if caring is not None:
        g[caring] = avg[caring].expand_as(g[caring])
    return xa * g[0][:, :, None], xv * g[1][:, :, None], batch_means


def official_loop(model, epochs, epsilon, window, starting_epoch, batch_size=16):
    """train.py + Bias_Mitigation_Strong restated. compute_BDR: per group the sum of squared gradient norms over
    the sum of squared weight norms, 'mmtm' parameters to the bypass of their modality (the squeeze layer to
    both), the branch's own to main; sums in Python floats, np.log10, np.sign. Ours folds the running gate average
    after each step (the documented deviation), so a re-balancing step uses the average up to the previous step."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    avg = {name: [torch.zeros(4), torch.zeros(4)] for name in ("mmtm1", "mmtm2")}
    steps = 0
    M_byp, M_main = [0.0, 0.0], [0.0, 0.0]
    curation, caring, unlock, curation_step = False, None, False, 0
    trace = []
    for epoch in range(1, epochs + 1):  # framework.py counts epochs from 1
        if epoch >= starting_epoch:
            unlock = True
        for batch in loader(64, batch_size):
            means = {}

            def run(mmtm, xa, xv):
                name = "mmtm1" if mmtm is model.mmtm1 else "mmtm2"
                oa, ov, means[name] = _official_mmtm(mmtm, avg[name], xa, xv, caring if curation else None)
                return oa, ov

            la, lv = model.branches(batch, mmtm=run)
            loss = F.cross_entropy(la, batch["target"]) + F.cross_entropy(lv, batch["target"])
            opt.zero_grad()
            loss.backward()

            def compute_bdr():
                wn_m, wn_b, gn_m, gn_b = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
                for name, p in model.named_parameters():
                    wn, gn = (p.double() ** 2).sum().item(), (p.grad.double() ** 2).sum().item()
                    if "mmtm" in name:
                        owners = [int(name.split(".")[2])] if ".excite." in name else [0, 1]
                        for k in owners:
                            wn_b[k] += wn
                            gn_b[k] += gn
                    else:
                        k = 0 if name[0] == "a" or name.startswith("fa") else 1
                        wn_m[k] += wn
                        gn_m[k] += gn
                for k in range(2):
                    M_byp[k] += gn_b[k] / wn_b[k]
                    M_main[k] += gn_m[k] / wn_m[k]
                return np.log10(M_byp[0] / M_main[0]) - np.log10(M_byp[1] / M_main[1])

            if unlock:
                if not curation:
                    d = compute_bdr()
                    if abs(d) > epsilon:
                        curation, curation_step = True, 0
                        caring = 1 if np.sign(d) == -1 else 0
                else:
                    curation_step += 1
                    if curation_step == window:
                        curation = False
            else:
                compute_bdr()
                curation = False
            opt.step()
            for name in avg:  # fold: (batch mean + avg * step) / (step + 1)
                avg[name] = [(means[name][k] + avg[name][k] * steps) / (steps + 1) for k in range(2)]
            steps += 1
            trace.append(caring if curation else -1)
    return trace


@pytest.mark.parametrize("epsilon,window", [(0.01, 2), (0.05, 3)])
def test_matches_the_official_loop(tmp_path, epsilon, window):
    ours, reference = GreedyNet(), GreedyNet()
    reference.load_state_dict(ours.state_dict())
    trace = Trace()
    cb = Greedy(epsilon=epsilon, window=window)  # start_epoch 1 (0-based): the official starting_epoch 2 (1-based)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=5, callbacks=[cb, trace])).fit(ours, loader(64, 16))
    expected = official_loop(reference, 5, epsilon, window, starting_epoch=2)
    assert trace.caring == expected
    assert expected[:4] == [-1] * 4 and sum(c >= 0 for c in expected) >= 3  # windows happened after epoch 0
    torch.testing.assert_close(flat_params(ours), flat_params(reference), rtol=1e-5, atol=1e-6)
    assert cb.windows == sum(1 for i, c in enumerate(expected) if c >= 0 and (i == 0 or expected[i - 1] < 0))
    assert not cb._state.bypass.requires_grad and cb._state.bypass.grad_fn is None  # no graph grows across steps


def test_random_variant_draws_every_mode_identically_on_refit(tmp_path):
    traces = []
    for run in range(2):
        trace = Trace()
        pl.Trainer(**trainer_kwargs(tmp_path / str(run), max_epochs=4, callbacks=[
            Greedy(mode="random", seed=3, start_epoch=1), trace])).fit(GreedyNet(), loader(64, 16))
        traces.append(trace.caring)
    assert traces[0] == traces[1]
    assert traces[0][:4] == [-1] * 4 and {-1, 0, 1} <= set(traces[0][4:])


# ---------------------------------------------------------------------- invariants
def test_ddp_equals_one_process_and_ranks_agree(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[Greedy(epsilon=0.01, window=2, start_epoch=1),
                                                    SaveParams(str(ddp_dir))],
                                max_epochs=4, devices=2, strategy="ddp_spawn", use_distributed_sampler=False)).fit(
        GreedyNet(), loader(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"]) and states_equal(rank0["states"], rank1["states"])
    single, cb = GreedyNet(), Greedy(epsilon=0.01, window=2, start_epoch=1)
    pl.Trainer(**trainer_kwargs(tmp_path / "one", max_epochs=4, callbacks=[cb])).fit(single, loader())
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    assert states_equal(rank0["states"]["Greedy"], cb.state_dict(), rtol=1e-4, atol=1e-6)
    assert rank0["states"]["Greedy"]["windows"] >= 1


def test_accumulation_equals_the_large_batch(tmp_path):
    big, cb_big, trace_big = GreedyNet(), Greedy(epsilon=0.01, window=2, start_epoch=1), Trace()
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=4, callbacks=[cb_big, trace_big])).fit(big, loader(64, 16))
    acc, cb_acc = GreedyNet(), Greedy(epsilon=0.01, window=2, start_epoch=1)
    pl.Trainer(**trainer_kwargs(tmp_path / "b", max_epochs=4, accumulate_grad_batches=2, callbacks=[cb_acc])).fit(
        acc, loader(64, 8))
    torch.testing.assert_close(flat_params(acc), flat_params(big), rtol=1e-5, atol=1e-6)
    assert states_equal(cb_acc.state_dict(), cb_big.state_dict(), rtol=1e-4, atol=1e-6)
    assert any(c >= 0 for c in trace_big.caring)
    for k in range(2):
        torch.testing.assert_close(acc.mmtm1.gate_mean[k], big.mmtm1.gate_mean[k])


@pytest.mark.parametrize("step", [6, 7])
def test_resume_inside_an_epoch_and_inside_a_window(tmp_path, step):
    """Four steps per epoch: with window 3 the checkpoints at steps 6 and 7 fall inside re-balancing windows
    (checked on the uninterrupted trace)."""
    trace = Trace()
    straight, cbs, resumed, rcbs = resume_inside_an_epoch(
        tmp_path, lambda: [Greedy(epsilon=0.01, window=3, start_epoch=1)], GreedyNet, resumable_loader, step,
        epochs=4)
    reference = GreedyNet()
    pl.Trainer(**trainer_kwargs(tmp_path / "t", max_epochs=4, callbacks=[Greedy(epsilon=0.01, window=3, start_epoch=1),
                                                                         trace])).fit(reference, resumable_loader())
    assert trace.caring[step - 1] >= 0  # the checkpointed step sits inside a window
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(rcbs[0].state_dict(), cbs[0].state_dict())
    for k in range(2):
        torch.testing.assert_close(resumed.mmtm2.gate_mean[k], straight.mmtm2.gate_mean[k])


def test_fp16_overflow_step_changes_nothing(tmp_path):
    greedy = Greedy(epsilon=0.01, window=2, start_epoch=0)
    overflow = OverflowAt(lambda m: (flat_params(m), greedy.state_dict(), m.mmtm1.get_extra_state()))
    model = GreedyNet()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, plugins=[fp16_plugin(2.0 ** 8)],
                                callbacks=[greedy, overflow])).fit(model, loader())
    (params, state, extra), before = overflow.after, overflow.before
    assert overflow.scale_after == 2.0 ** 52 and greedy.num_skipped >= 1
    assert torch.equal(params, before[0])
    assert states_equal(state, before[1], rtol=0, atol=0) and states_equal(extra, before[2], 0, 0)
    assert torch.isfinite(flat_params(model)).all() and greedy.windows >= 1
    assert torch.isfinite(greedy._state.bypass).all() and torch.isfinite(greedy._state.main).all()


@pytest.mark.parametrize("order", ["greedy_first", "ogm_first"])
def test_stacks_with_ogm_ge_in_either_order(tmp_path, order):
    def run(first_greedy, directory):
        cbs = [Greedy(epsilon=0.01, window=2, start_epoch=1), OGMGE(alpha=0.5)]
        model = GreedyNet()
        pl.Trainer(**trainer_kwargs(directory, max_epochs=3, callbacks=cbs if first_greedy else cbs[::-1])).fit(
            model, loader())
        return model, cbs

    model, cbs = run(order == "greedy_first", tmp_path / "x")
    other, other_cbs = run(order != "greedy_first", tmp_path / "y")
    torch.testing.assert_close(flat_params(model), flat_params(other), rtol=0, atol=0)
    assert cbs[1].num_edits > 0 and cbs[0].windows >= 1
    alone = GreedyNet()
    pl.Trainer(**trainer_kwargs(tmp_path / "z", max_epochs=3, callbacks=[Greedy(epsilon=0.01, window=2,
                                                                                start_epoch=1)])).fit(alone, loader())
    assert not torch.allclose(flat_params(alone), flat_params(model))  # OGM-GE's edit took part


def test_absent_modalities_train_finite(tmp_path):
    model, cb = GreedyNet(), Greedy(epsilon=0.01, window=2, start_epoch=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[cb])).fit(model, loader(missing=(0.3, 0.3)))
    assert torch.isfinite(flat_params(model)).all() and cb.windows >= 1
    # absent rows count in no average: the squeeze counts are the present samples of three epochs
    ds = loader(missing=(0.3, 0.3)).dataset
    torch.testing.assert_close(model.mmtm1.squeeze_count, 3 * ds.present.sum(0).double())


class Tokens3(MultimodalMixin, pl.LightningModule):
    """Three modalities, token features (N, T, D) joined by one MMTM on the last axis, AdamW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.v, self.t = nn.Linear(1, 6), nn.Linear(1, 6), nn.Conv1d(2, 5, 3, padding=1)
        self.mmtm = MMTM({"t": 5, "a": 6, "v": 6}, channel_dim=-1)
        self.heads = nn.ModuleDict({m: nn.Linear(d, 4) for m, d in (("a", 6), ("v", 6), ("t", 5))})
        self.fusion = MeanFusion()
        self.configure_modalities({"a": [self.a, self.heads["a"]], "v": [self.v, self.heads["v"]],
                                   "t": [self.t, self.heads["t"]]}, fusion=self.fusion)

    def training_step(self, batch, batch_idx):
        seq = torch.stack([batch["audio"][:, :5], batch["visual"]], 1)
        za, zv = torch.relu(self.a(batch["audio"][..., None])), torch.relu(self.v(batch["visual"][..., None]))
        zt = torch.relu(self.t(seq)).transpose(1, 2)
        zt, za, zv = self.mmtm(zt, za, zv)
        logits = {m: self.heads[m](z.mean(1)) for m, z in (("a", za), ("v", zv), ("t", zt))}
        self.fuse(logits, batch["target"])
        return sum(F.cross_entropy(o, batch["target"]) for o in logits.values())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_three_modalities_with_tokens_and_adamw(tmp_path):
    model, cb, trace = Tokens3(), Greedy(epsilon=0.01, window=2, start_epoch=1), []

    class Cared(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trace.append(int(pl_module.mmtm.caring))

    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[cb, Cared()])).fit(model, loader())
    assert torch.isfinite(cb._state.bdr).all() and cb.windows >= 1
    bdr = cb._state.bdr
    assert math.isfinite(float(bdr.max() - bdr.min())) and set(trace) - {-1}  # some modality was cared for


def test_bad_input_names_the_fix(tmp_path):
    for kwargs, match in (({"epsilon": -1}, "epsilon"), ({"window": 0}, "window"), ({"mode": "greedy"}, "mode")):
        with pytest.raises(ValueError, match=match):
            Greedy(**kwargs)
    with pytest.raises(ValueError, match="at least two"):
        MMTM([4])
    with pytest.raises(ModalityContractError, match="channels"):
        MMTM([4, 4])(torch.randn(2, 3, 5), torch.randn(2, 4, 5))
    from tests.helpers import TinyAV

    with pytest.raises(ModalityContractError, match="has none"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[Greedy()])).fit(TinyAV(), loader())

    class TwoOptimizers(GreedyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            return [torch.optim.SGD(self.mmtm1.parameters(), lr=0.1), torch.optim.SGD(self.a1.parameters(), lr=0.1)]

        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(ValueError, match="one optimizer"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[Greedy()])).fit(TwoOptimizers(), loader())

    class Mismatch(GreedyNet):
        def __init__(self):
            super().__init__()
            self.mmtm2 = MMTM({"audio": 4, "depth": 4}, ratio=2)

    with pytest.raises(ModalityContractError, match=r"every MMTM must connect.*MMTM\(\{.audio.: C"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[Greedy()])).fit(Mismatch(), loader())


class HeadsInFusion(GreedyNet):
    """The branches' classifiers inside the fusion, declared as the contract's unimodal heads."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.fusion = HeadMean(self.fa, self.fv)
        del self.fa, self.fv
        self.configure_modalities({"audio": [self.a1, self.a2], "visual": [self.v1, self.v2]}, fusion=self.fusion,
                                  unimodal="heads", unimodal_heads={"audio": self.fusion.fa, "visual": self.fusion.fv})

    def branches(self, batch, mmtm=None):
        self.fa, self.fv = self.fusion.fa, self.fusion.fv
        return super().branches(batch, mmtm)


class HeadMean(nn.Module):
    def __init__(self, fa, fv):
        super().__init__()
        self.fa, self.fv = fa, fv

    def forward(self, za, zv):
        return (self.fa(za) + self.fv(zv)) / 2


@pytest.mark.parametrize("branch_heads", ["unimodal_heads", {"audio": "fusion.fa", "visual": "fusion.fv"}])
def test_branch_heads_join_the_main_path(tmp_path, branch_heads):
    """The same network as GreedyNet with its classifiers inside the fusion: with branch_heads the main path
    holds them again, so training (and the re-balancing trace) is GreedyNet's."""
    ours, trace = HeadsInFusion(), Trace()
    cb = Greedy(epsilon=0.01, window=2, start_epoch=1, branch_heads=branch_heads)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_epochs=4, callbacks=[cb, trace])).fit(ours, loader())
    assert {id(p) for p in ours.fusion.fa.parameters()} <= {id(p) for p in cb._main[0]}
    reference, ref_trace = GreedyNet(), Trace()
    pl.Trainer(**trainer_kwargs(tmp_path / "b", max_epochs=4, callbacks=[
        Greedy(epsilon=0.01, window=2, start_epoch=1), ref_trace])).fit(reference, loader())
    assert trace.caring == ref_trace.caring and any(c >= 0 for c in trace.caring)
    with pytest.raises(ModalityContractError, match="no submodule 'fusion.nope'"):
        pl.Trainer(**trainer_kwargs(tmp_path / "c", max_epochs=1, callbacks=[
            Greedy(branch_heads={"audio": "fusion.nope"})])).fit(HeadsInFusion(), loader())
    with pytest.raises(ModalityContractError, match="both 'audio' and 'visual'"):
        pl.Trainer(**trainer_kwargs(tmp_path / "e", max_epochs=1, callbacks=[
            Greedy(branch_heads={"audio": "fusion.fv", "visual": "fusion.fv"})])).fit(HeadsInFusion(), loader())
    with pytest.raises(ModalityContractError, match="unimodal heads declared"):
        pl.Trainer(**trainer_kwargs(tmp_path / "d", max_epochs=1, callbacks=[
            Greedy(branch_heads="unimodal_heads")])).fit(GreedyNet(), loader())


def test_nan_in_absent_rows_reaches_no_gradient():
    torch.manual_seed(3)
    mmtm = MMTM({"a": 3, "b": 2}, ratio=1)
    xa, xb = torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 2, 5)
    present = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    xb = torch.where(present[:, 1, None, None], xb, float("nan")).requires_grad_()
    oa, ob = mmtm(xa, xb, present=present)
    loss = oa.sum() + torch.where(present[:, 1, None, None], ob, 0.0).sum()  # the user masks the absent rows
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mmtm.parameters()) and torch.isfinite(xa.grad).all()
    assert torch.isnan(ob[~present[:, 1]]).all()  # the absent map passes unchanged (gate 1)


def test_sequence_mmtms_take_the_declared_order_whatever_modalities_says(tmp_path):
    model = GreedyNet()
    cb = Greedy(modalities=["visual", "audio"])
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[cb])).fit(model, loader())
    assert model.mmtm2.names == ("audio", "visual")
    # "visual" (first in the callback's order) owns mmtm2's second gate layer
    assert {id(p) for p in model.mmtm2.excite[1].parameters()} <= {id(p) for p in cb._bypass[0]}
    assert not {id(p) for p in model.mmtm2.excite[0].parameters()} & {id(p) for p in cb._bypass[0]}


def test_a_fit_ending_inside_a_window_leaves_normal_gates(tmp_path):
    model, trace = GreedyNet(), Trace()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, max_epochs=-1, callbacks=[
        Greedy(epsilon=0.01, window=5), trace])).fit(model, loader())
    assert trace.caring[-1] >= 0  # the last step was inside a window
    assert int(model.mmtm1.caring) == -1 and int(model.mmtm2.caring) == -1
    fresh = GreedyNet(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.mmtm1.caring) == -1


def test_recording_statistics_gives_the_official_average_maps():
    torch.manual_seed(4)
    mmtm = MMTM({"a": 3, "b": 2}, ratio=1)
    mmtm(torch.randn(8, 3, 4), torch.randn(8, 2, 4))  # some running statistics
    xa, xb = torch.randn(6, 3, 4), torch.randn(6, 2, 4)
    present = torch.tensor([[True, True]] * 4 + [[True, False]] * 2)
    gates_before = [g.clone() for g in mmtm.gate_mean]
    mmtm.eval()
    from lightning_balance.mmtm import recording_statistics

    with torch.no_grad(), recording_statistics(mmtm):
        mmtm(xa[:3], xb[:3], present=present[:3])
        mmtm(xa[3:], xb[3:], present=present[3:])
    torch.testing.assert_close(mmtm.squeeze_mean[0], xa.mean(-1).mean(0))
    torch.testing.assert_close(mmtm.squeeze_mean[1], xb[:4].mean(-1).mean(0))  # the samples that have b
    assert all(torch.equal(a, b) for a, b in zip(gates_before, mmtm.gate_mean))


def test_frozen_mmtms_are_refused_with_the_reason(tmp_path):
    model = GreedyNet()
    for p in [*model.mmtm1.parameters(), *model.mmtm2.parameters()]:
        p.requires_grad_(False)
    with pytest.raises(ModalityContractError, match="frozen"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[Greedy()])).fit(model, loader())


def test_warns_when_it_never_rebalances(tmp_path):
    with pytest.warns(UserWarning, match="never re-balanced"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[Greedy(epsilon=50.0)])).fit(GreedyNet(), loader())
