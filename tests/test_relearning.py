"""Diagnosing & Re-learning: the functional core against hand values and scikit-learn, the callback against the
official loop restated (ours.py), DDP, accumulation, resume inside an epoch and at an epoch's end, absence, M = 3."""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from sklearn.cluster import KMeans
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from torch.utils.data import DataLoader

from lightning_balance import MultimodalMixin
from lightning_balance._errors import ModalityContractError
from lightning_balance.callbacks import Relearning
from lightning_balance.data import ResumableDataLoader
from lightning_balance.functional.relearning import (
    canonical_order,
    cluster_purity,
    kmeans,
    minmax_scale,
    relearning_strength,
    soft_reinit_,
)
from tests.helpers import DictDataset, InterleavedSampler, SaveParams, TinyAV, flat_params, trainer_kwargs

# ---------------------------------------------------------------------------------------------- functional core


def test_minmax_scale_is_sklearns_including_a_constant_column():
    x = torch.randn(50, 4, dtype=torch.float64)
    x[:, 2] = 3.0
    x[:, 3] = 0.5 + 1e-17 * torch.randn(50, dtype=torch.float64)  # a range below 10·eps: constant for scikit-learn
    expected = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x.numpy())
    torch.testing.assert_close(minmax_scale(x), torch.from_numpy(expected))
    assert (minmax_scale(x)[:, 2] == -1).all()
    assert minmax_scale(x)[:, 3].max() < -0.99


def test_cluster_purity_by_hand_and_against_the_official_histogram():
    targets = torch.tensor([0, 0, 1, 1, 1, 2])
    clusters = torch.tensor([5, 5, 5, 7, 7, 9])
    assert cluster_purity(targets, clusters) == pytest.approx(5 / 6)  # {0,0,1} → 2, {1,1} → 2, {2} → 1

    def official(y_true, y_pred):  # code/ours.py: purity_score (labels re-ordered, histogram per cluster)
        y_true = y_true.copy()
        labels = np.unique(y_true)
        for k, label in enumerate(labels):
            y_true[y_true == label] = k
        labels = np.unique(y_true)
        bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
        voted = np.zeros(y_true.shape)
        for cluster in np.unique(y_pred):
            hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
            voted[y_pred == cluster] = np.argmax(hist)
        return float((voted == y_true).mean())

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        y = torch.randint(0, 6, (200,), generator=g) * 3  # labels with gaps
        c = torch.randint(0, 8, (200,), generator=g)
        assert cluster_purity(y, c) == pytest.approx(official(y.numpy(), c.numpy()))


def lloyd(x, centres, iters=300):
    """Lloyd's algorithm written out: assign to the nearest centre, move the centres to the means."""
    labels = None
    for _ in range(iters):
        new = torch.cdist(x.double(), centres.double()).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = torch.stack([x[labels == j].mean(0) for j in range(centres.shape[0])])
    return torch.cdist(x.double(), centres.double()).argmin(1)


def test_kmeans_from_given_centres_is_lloyds_algorithm():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(40, 3, generator=g) + 3 * torch.randn(1, 3, generator=g) for _ in range(4)])
    init = x[[0, 45, 90, 130]]
    labels, _ = kmeans(x, 4, init=init, tol=0.0)
    assert torch.equal(labels, lloyd(x, init))


def contingency_is_a_permutation(a, b, k):
    table = torch.zeros(k, k, dtype=torch.long)
    table.index_put_((torch.as_tensor(a).long(), torch.as_tensor(b).long()), torch.ones(len(a), dtype=torch.long),
                     accumulate=True)
    return bool(((table > 0).sum(0) == 1).all() and ((table > 0).sum(1) == 1).all())


def test_kmeans_finds_sklearns_clusters_where_the_data_decides_them():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(6, 5, generator=g) * 6
    truth = torch.randint(0, 6, (300,), generator=g)
    x = centres[truth] + torch.randn(300, 5, generator=g)
    ours, _ = kmeans(x, 6, seed=0, n_init=4)
    theirs = KMeans(n_clusters=6, random_state=0, n_init=4).fit_predict(x.numpy())
    assert contingency_is_a_permutation(ours, theirs, 6)
    assert cluster_purity(truth, ours) == 1.0


def test_kmeans_purity_is_close_to_sklearns_on_overlapping_classes():
    g = torch.Generator().manual_seed(3)
    truth = torch.randint(0, 5, (400,), generator=g)
    x = minmax_scale(torch.randn(5, 8, generator=g)[truth] * 1.5 + torch.randn(400, 8, generator=g))
    ours = cluster_purity(truth, kmeans(x, 5, seed=0, n_init=10)[0])
    theirs = cluster_purity(truth, torch.from_numpy(KMeans(5, random_state=0, n_init=10).fit_predict(x.numpy())))
    assert abs(ours - theirs) < 0.03


def test_kmeans_reseeds_an_empty_cluster_and_checks_its_input():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    labels, centres = kmeans(x, 2, init=torch.tensor([[100.0], [200.0]]))  # both start far away: one goes empty
    assert set(labels.tolist()) == {0, 1} and torch.isfinite(centres).all()
    with pytest.raises(ValueError, match="n >= k"):
        kmeans(x, 5)


def test_strength_reinit_and_canonical_order():
    assert relearning_strength(0.9, 0.7, 3.0) == pytest.approx(math.tanh(0.6))
    assert relearning_strength(0.7, 0.9, 3.0) == pytest.approx(math.tanh(0.6))  # absolute gap, as official
    p, p0 = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    soft_reinit_(p, p0, 0.25)
    torch.testing.assert_close(p[0], 0.25 * torch.tensor([3.0, -2.0]) + 0.75 * torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="alpha"):
        soft_reinit_(p, p0, 1.5)
    x = torch.randn(30, 4)
    perm = torch.randperm(30)
    assert torch.equal(x[canonical_order(x)], x[perm][canonical_order(x[perm])])


# ---------------------------------------------------------------------------------------------- the callback


def sorted_sklearn_kmeans(z, k):
    """scikit-learn's KMeans (random_state=0, as official) on rows put in lexicographic order first, so that the
    clustering does not depend on the order the samples came in (the callback orders them by value too)."""
    z = np.asarray(z, dtype=np.float64)
    order = np.lexsort(z.T[::-1])
    labels = KMeans(n_clusters=k, random_state=0, n_init=1).fit_predict(z[order])
    out = np.empty_like(labels)
    out[order] = labels
    return torch.from_numpy(out)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16, missing=None, resumable: bool = False) -> None:
        super().__init__()
        self.batch_size, self.missing, self.resumable = batch_size, missing, resumable

    def train_dataloader(self):
        kind = ResumableDataLoader if self.resumable else DataLoader
        return kind(DictDataset(64, seed=0, missing=self.missing), batch_size=self.batch_size,
                    sampler=InterleavedSampler(64))

    def holdout_dataloader(self):
        return DataLoader(DictDataset(32, seed=1, missing=self.missing), batch_size=16)


def official_loop(model, epochs, every, times, strength):
    """code/ours.py restated: plain SGD epochs; at the end of epoch e (e % every == 0, e > 0, at most `times`),
    features of the training and held-out data in eval mode, MinMaxScaler(-1, 1), KMeans(k = classes), purity,
    w = tanh(λ |P_train − P_val|), and every encoder parameter θ ← w θ⁰ + (1 − w) θ."""
    init = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=model.momentum)
    data = Data()
    weights, done = [], 0
    for epoch in range(epochs):
        model.train()
        for batch in data.train_dataloader():
            opt.zero_grad()
            feats = model.forward_features(batch)
            F.cross_entropy(model.head(torch.cat([feats["audio"], feats["visual"]], 1)), batch["target"]).backward()
            opt.step()
        if epoch % every == 0 and epoch > 0 and done < times:
            done += 1
            model.eval()
            purities = {}
            with torch.no_grad():
                for split, loader in (("train", data.train_dataloader()), ("val", data.holdout_dataloader())):
                    feats = [model.forward_features(b) for b in loader]
                    labels = torch.cat([b["target"] for b in loader]).numpy()
                    for m in ("audio", "visual"):
                        z = torch.cat([f[m] for f in feats]).numpy()
                        z = MinMaxScaler(feature_range=(-1, 1)).fit_transform(z)
                        y_pred = sorted_sklearn_kmeans(z, 4).numpy()
                        purities[split, m] = cluster_purity(torch.from_numpy(labels), torch.from_numpy(y_pred))
            w = {m: math.tanh(strength * abs(purities["train", m] - purities["val", m])) for m in ("audio", "visual")}
            weights.append(w)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    for m in ("audio", "visual"):
                        if name.startswith(f"{m}_encoder"):
                            param.copy_(w[m] * init[name] + (1 - w[m]) * param)
    return weights


def test_matches_the_official_loop_over_two_reinits(tmp_path):
    cb = Relearning(strength=3.0, every_n_epochs=2, max_reinits=2, clusterer=sorted_sklearn_kmeans)
    model = TinyAV(lr=0.2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=7)).fit(model, datamodule=Data())
    reference = TinyAV(lr=0.2)
    weights = official_loop(reference, epochs=7, every=2, times=2, strength=3.0)
    assert [e["epoch"] for e in cb.history] == [2, 4]  # the third due epoch (6) is past max_reinits
    for entry, w in zip(cb.history, weights):
        assert entry["alpha/audio"] == pytest.approx(w["audio"], abs=1e-9)
        assert entry["alpha/visual"] == pytest.approx(w["visual"], abs=1e-9)
    assert any(e[f"alpha/{m}"] > 0.05 for e in cb.history for m in ("audio", "visual")), "the test never re-initialises"
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)


def test_builtin_kmeans_runs_and_logs(tmp_path):
    cb = Relearning(every_n_epochs=1, max_reinits=2)
    model = TinyAV(lr=0.2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=4))
    trainer.fit(model, datamodule=Data())
    assert [e["epoch"] for e in cb.history] == [1, 2]  # after epochs 1 and 2, at the start of 2 and 3
    for m in ("audio", "visual"):
        assert trainer.callback_metrics[f"balance/relearning/alpha/{m}"] == pytest.approx(cb.history[-1][f"alpha/{m}"])
        gap = cb.history[-1][f"purity_train/{m}"] - cb.history[-1][f"purity_holdout/{m}"]
        assert cb.history[-1][f"alpha/{m}"] == pytest.approx(math.tanh(3.0 * abs(gap)))


def test_ddp_equals_one_process_and_ranks_agree(tmp_path):
    """Each rank encodes its half of the training data; the gathered features, put in value order, cluster as in
    one process; rank 0's α is broadcast."""
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    cb = Relearning(every_n_epochs=1, max_reinits=2)
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[cb, SaveParams(str(ddp_dir))], max_epochs=4, devices=2,
                                strategy="ddp_spawn", use_distributed_sampler=False)).fit(
        TinyAV(lr=0.2), datamodule=Data(batch_size=8))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single_cb = Relearning(every_n_epochs=1, max_reinits=2)
    single = TinyAV(lr=0.2)
    pl.Trainer(**trainer_kwargs(tmp_path / "one", callbacks=[single_cb], max_epochs=4)).fit(single, datamodule=Data())
    history = rank0["states"]["Relearning"]["history"]
    assert [e["epoch"] for e in history] == [1, 2]
    for got, want in zip(history, single_cb.history):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_accumulation_equals_the_full_batch(tmp_path):
    runs = []
    for batch_size, accumulate in ((16, 1), (8, 2)):
        cb = Relearning(every_n_epochs=1, max_reinits=2)
        model = TinyAV(lr=0.2)
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=4, accumulate_grad_batches=accumulate)).fit(
            model, datamodule=Data(batch_size=batch_size))
        runs.append((cb.history, flat_params(model)))
    assert [e["epoch"] for e in runs[0][0]] == [1, 2]
    for a, b in zip(runs[0][0], runs[1][0]):
        assert a == pytest.approx(b, abs=1e-6)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [10, 12, 14])
def test_resume_inside_an_epoch_and_at_an_epochs_last_batch(tmp_path, step):
    """Four steps per epoch; re-inits after epochs 2 and 4, at the starts of epochs 3 and 5 (after steps 12 and 20).
    Step 10 is inside epoch 2, before the first; step 12 is epoch 2's last batch (Lightning resumes into epoch 3
    without its epoch-start hook); step 14 is inside epoch 3, after the first re-init (its history is restored)."""
    straight_cb = Relearning(every_n_epochs=2, max_reinits=2)
    straight = TinyAV(lr=0.2)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[straight_cb], max_epochs=6)).fit(
        straight, datamodule=Data(resumable=True))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1, filename="{step}")
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[Relearning(every_n_epochs=2, max_reinits=2), ckpt],
                                max_epochs=6, enable_checkpointing=True)).fit(TinyAV(lr=0.2),
                                                                              datamodule=Data(resumable=True))
    resumed_cb, resumed = Relearning(every_n_epochs=2, max_reinits=2), TinyAV(lr=0.2, seed=123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**trainer_kwargs(tmp_path / "c", callbacks=[resumed_cb], max_epochs=6)).fit(
            resumed, datamodule=Data(resumable=True), ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
    assert [e["epoch"] for e in straight_cb.history] == [2, 4]
    assert [e["epoch"] for e in resumed_cb.history] == [2, 4]
    for a, b in zip(resumed_cb.history, straight_cb.history):
        assert a == pytest.approx(b, abs=1e-7)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)


class WithVal(Data):
    def val_dataloader(self):
        return DataLoader(DictDataset(32, seed=2), batch_size=16)


def test_a_best_checkpoint_holds_the_weights_it_was_scored_on(tmp_path):
    """The re-init follows the epoch's validation and checkpoint (official order): the best checkpoint of a
    re-init epoch is the model that was validated, and resuming from it re-initialises as the straight fit did."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, filename="{epoch}")
    cb = Relearning(every_n_epochs=2, max_reinits=1)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[cb, ckpt], max_epochs=4, enable_checkpointing=True,
                                num_sanity_val_steps=0)).fit(TinyAV(lr=0.2), datamodule=WithVal())
    assert [e["epoch"] for e in cb.history] == [2]
    state = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=False)
    model = TinyAV(lr=0.2)
    model.load_state_dict(state["state_dict"])
    val = WithVal().val_dataloader()
    with torch.no_grad():
        losses = [F.cross_entropy(model.head(torch.cat(list(model.forward_features(b).values()), 1)), b["target"])
                  for b in val]
    scored = state["callbacks"][next(k for k in state["callbacks"] if "ModelCheckpoint" in k)]["current_score"]
    assert float(torch.stack(losses).mean()) == pytest.approx(float(scored), rel=1e-5)


def test_eval_modes_are_restored_and_batchnorm_buffers_untouched(tmp_path):
    class Normed(TinyAV):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.audio_encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Tanh())
            self.configure_modalities({"audio": self.audio_encoder, "visual": self.visual_encoder}, head=self.head)
            self.audio_encoder[1].eval()  # the user keeps this BatchNorm frozen

    seen = {}

    class Watch(pl.Callback):  # listed after Relearning: sees the state right after its epoch-start work
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = (pl_module.audio_encoder[1].training, pl_module.audio_encoder[2].training,
                                           pl_module.audio_encoder[1].running_mean.clone())

    cb = Relearning(every_n_epochs=1, max_reinits=1, strength=10.0)
    model = Normed(lr=0.2)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, Watch()], max_epochs=3)).fit(model, datamodule=Data())
    assert cb.history and cb.history[0]["epoch"] == 1
    assert seen[2][:2] == (False, True)  # the frozen BatchNorm stays in eval, the dropout back in train
    torch.testing.assert_close(seen[2][2], seen[1][2])  # the diagnosis pass did not move the running statistics


def test_a_reused_callback_starts_afresh(tmp_path):
    cb = Relearning(every_n_epochs=1, max_reinits=1)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", callbacks=[cb], max_epochs=3)).fit(TinyAV(lr=0.2), datamodule=Data())
    second = TinyAV(lr=0.2, seed=7)
    initial = [p.detach().clone() for p in second.modality_parameters("audio")]
    pl.Trainer(**trainer_kwargs(tmp_path / "b", callbacks=[cb], max_epochs=3)).fit(second, datamodule=Data())
    assert [e["epoch"] for e in cb.history] == [1]  # re-initialised in the second fit too
    assert all(torch.equal(a, b) for a, b in zip(cb.initial["audio"], initial))  # toward the second model's θ⁰


def test_max_samples_below_the_clusters_warns(tmp_path):
    cb = Relearning(every_n_epochs=1, max_reinits=1, max_samples=3)
    with pytest.warns(UserWarning, match="max_samples=3"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(TinyAV(lr=0.2), datamodule=Data())
    assert cb.history[0]["alpha/audio"] == 0.0


def test_absent_samples_are_left_out_of_their_modalitys_diagnosis(tmp_path):
    seen = []

    def clusterer(z, k):
        seen.append(z.shape[0])
        return sorted_sklearn_kmeans(z, k)

    data = Data(missing=(0.3, 0.2))
    cb = Relearning(every_n_epochs=1, max_reinits=1, clusterer=clusterer)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=3)).fit(TinyAV(lr=0.2), datamodule=data)
    train, held = DictDataset(64, seed=0, missing=(0.3, 0.2)), DictDataset(32, seed=1, missing=(0.3, 0.2))
    # per modality: training then held-out, the samples that have the modality
    expected = [int(train.present[:, 0].sum()), int(held.present[:, 0].sum()),
                int(train.present[:, 1].sum()), int(held.present[:, 1].sum())]
    assert seen == expected and min(expected) < 64 - 10


class TokenFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(24, 4)

    def forward(self, a, v, t):
        return self.head(torch.cat([a, v, t.mean(1)], -1))


class Tokens3(MultimodalMixin, pl.LightningModule):
    """Three modalities; one a Conv1d over a sequence giving token features (N, T, D), pooled for the diagnosis."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(6, 8)
        self.v = nn.Linear(5, 8)
        self.t = nn.Conv1d(2, 8, kernel_size=3, padding=1)
        self.fusion = TokenFusion()
        self.configure_modalities({"a": self.a, "v": self.v, "t": self.t}, fusion=self.fusion)

    def features(self, batch):
        seq = torch.stack([batch["audio"][:, :5], batch["visual"]], 1)  # (N, 2, 5)
        return {"a": torch.tanh(self.a(batch["audio"])), "v": torch.tanh(self.v(batch["visual"])),
                "t": torch.tanh(self.t(seq)).transpose(1, 2)}  # (N, 5, 8) tokens

    def encode_batch(self, batch):
        return self.features(batch), batch["target"]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.fuse(self.features(batch), batch["target"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_three_modalities_with_token_features_and_adamw(tmp_path):
    cb = Relearning(every_n_epochs=1, max_reinits=1, strength=10.0)
    model = Tokens3()
    before = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in model.modalities}
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, Snapshot()], max_epochs=3)).fit(model, datamodule=Data())
    entry = cb.history[0]
    assert {k.split("/")[1] for k in entry if "/" in k} == {"a", "v", "t"}
    for m in model.modalities:  # the re-init is exactly the interpolation toward θ⁰ of the snapshot before it
        alpha = entry[f"alpha/{m}"]
        for p0, p_pre, p_post in zip(before[m], Snapshot.pre[m], Snapshot.post[m]):
            torch.testing.assert_close(p_post, alpha * p0 + (1 - alpha) * p_pre)
        assert any(not torch.equal(a, b) for a, b in zip(Snapshot.pre[m], Snapshot.post[m])) or alpha == 0
    

class Snapshot(pl.Callback):
    """Each modality's parameters at epoch 1's last batch end and at epoch 2's start (listed after Relearning, its
    on_train_epoch_start runs after the re-init)."""

    pre: dict = {}
    post: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1:
            Snapshot.pre = {m: [p.detach().clone() for p in pl_module.modality_parameters(m)]
                            for m in pl_module.modalities}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            Snapshot.post = {m: [p.detach().clone() for p in pl_module.modality_parameters(m)]
                             for m in pl_module.modalities}


def test_bad_input_names_the_fix(tmp_path):
    for kwargs, match in (({"strength": -1.0}, "strength"), ({"every_n_epochs": 0}, "every_n_epochs"),
                          ({"max_reinits": 1.5}, "max_reinits"), ({"num_classes": 1}, "num_classes"),
                          ({"clusterer": 3}, "clusterer")):
        with pytest.raises(ValueError, match=match):
            Relearning(**kwargs)
    with pytest.raises(ModalityContractError, match="holdout_dataloader"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Relearning()], max_epochs=1)).fit(
            TinyAV(), DataLoader(DictDataset(16), batch_size=8))
    with pytest.raises(ModalityContractError, match="MultimodalMixin"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Relearning()], max_epochs=1)).fit(
            BoringModel(), datamodule=Data())
    cb = Relearning(every_n_epochs=1, max_reinits=1)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(TinyAV(), datamodule=Data())
    other = Relearning(every_n_epochs=1, max_reinits=1)
    other.load_state_dict(cb.state_dict())
    with pytest.raises(ModalityContractError, match="another model"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[other], max_epochs=1)).fit(Tokens3(), datamodule=Data())
