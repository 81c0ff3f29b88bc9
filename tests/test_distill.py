"""Cross-modal distillation (CRD and in-batch InfoNCE) against the official CRD recipe restated here in plain
torch (embeddings, memories, normalisers, the NCE loss, the momentum update), over several steps; DDP, resume,
absent modalities, the teacher sequence and the errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_balance import CrossModalDistillation, ModalityContractError
from tests.helpers import (DictDataset, InterleavedSampler, ResumableLoader, SaveParams, TinyAV, flat_params,
                           resume_inside_an_epoch, trainer_kwargs)

N, FEAT, K, TEMP, MOMENTUM, SEED, WEIGHT = 64, 4, 10, 0.07, 0.5, 3, 0.8


class Indexed(DictDataset):
    """DictDataset whose items carry their dataset index."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "index": torch.tensor(i)}


def indexed_loader(batch_size=16, missing=None, kind=DataLoader):
    return kind(Indexed(n=N, missing=missing), batch_size=batch_size, sampler=InterleavedSampler(N))


class KDModel(TinyAV):
    """TinyAV distilling audio (the strong modality of DictDataset) into the visual encoder."""

    def __init__(self, seed=0, method="crd", negatives="uniform", **term):
        super().__init__(seed=seed)
        self.configure_loss_terms([CrossModalDistillation(
            "visual", "audio", {"audio": 8, "visual": 8}, method=method, num_samples=N, feat_dim=FEAT, nce_k=K,
            nce_t=TEMP, nce_m=MOMENTUM, negatives=negatives, seed=SEED, weight=WEIGHT, **term)])

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"], inputs={"index": batch["index"]},
                           present=batch.get("present"))
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


# ---------------------------------------------------------------------------- the official recipe, restated
def embed(linear, x):
    return F.normalize(linear(x), dim=1)


def nce(p):
    """Eq. 18 of CRD as the official ContrastLoss computes it (noise 1/N, eps 1e-7)."""
    m = p.shape[1] - 1
    pn = 1.0 / N
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + m * pn + 1e-7))
    log_d0 = torch.log((m * pn) / (p[:, 1:] + m * pn + 1e-7))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def crd_recipe(model, batches, epochs, method="crd", accumulate=1):
    """Joint training on CE + 0.8 · CRD(student = visual, teacher = audio detached), SGD as TinyAV's; with
    ``accumulate`` > 1 each micro-batch's loss / accumulate is backpropagated, the memories move after every
    micro-batch (the official code's per-iteration update) and the optimizer steps every ``accumulate``."""
    term = model.balance_losses["distill"]
    ws, wt = term.embed_student.linear, term.embed_teachers["audio"].linear
    g = torch.Generator().manual_seed(SEED)
    bound = 1.0 / math.sqrt(FEAT / 3)
    mem_s = torch.rand(N, FEAT, generator=g) * 2 * bound - bound  # memory_v1: student embeddings
    mem_t = torch.rand(N, FEAT, generator=g) * 2 * bound - bound  # memory_v2: teacher embeddings
    z_s = z_t = None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = 0
    for _ in range(epochs):
        for i, batch in enumerate(batches):
            step += 1
            if i % accumulate == 0:
                optimizer.zero_grad()
            za, zv = model.audio_encoder(batch["audio"]), model.visual_encoder(batch["visual"])
            ce = F.cross_entropy(model.head(torch.cat([za, zv], 1)), batch["target"])
            s, t = embed(ws, zv), embed(wt, za.detach())
            if method == "infonce":
                logits = (s @ t.T) / TEMP
                y = torch.arange(len(s))
                kd = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))
            else:
                index = batch["index"]
                neg = torch.randint(0, N, (len(index), K), generator=torch.Generator().manual_seed(SEED * 1_000_003 + step))
                # the negatives' rows go to the samples in the order of their dataset indices
                idx = torch.cat([index[:, None], neg[torch.argsort(torch.argsort(index))]], 1)
                out_v1 = torch.exp(torch.einsum("bkd,bd->bk", mem_t[idx], s) / TEMP)  # student anchor, teacher memory
                out_v2 = torch.exp(torch.einsum("bkd,bd->bk", mem_s[idx], t) / TEMP)  # teacher anchor, student memory
                if z_s is None:
                    z_s, z_t = float(out_v1.detach().mean() * N), float(out_v2.detach().mean() * N)
                kd = nce(out_v1 / z_s) + nce(out_v2 / z_t)
                with torch.no_grad():
                    mem_s[index] = F.normalize(mem_s[index] * MOMENTUM + s * (1 - MOMENTUM), dim=1)
                    mem_t[index] = F.normalize(mem_t[index] * MOMENTUM + t * (1 - MOMENTUM), dim=1)
            ((ce + WEIGHT * kd) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                optimizer.step()
    return mem_s, mem_t, (z_s, z_t)


@pytest.mark.parametrize("method", ["crd", "infonce"])
def test_matches_the_official_recipe_over_two_epochs(tmp_path, method):
    reference = KDModel(method=method)
    mem_s, mem_t, zs = crd_recipe(reference, list(indexed_loader()), epochs=2, method=method)
    model = KDModel(method=method)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, indexed_loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    assert (flat_params(model) - flat_params(KDModel(method=method))).abs().max() > 1e-2  # it trained
    term = model.balance_losses["distill"]
    assert int(term.steps) == 8
    if method == "crd":
        torch.testing.assert_close(term.memory_student, mem_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(term.memory_audio, mem_t, rtol=1e-5, atol=1e-6)
        assert term.normalisers.tolist() == pytest.approx(list(zs), rel=1e-5)
    # without the term the run is another one: the distillation acts
    plain = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(plain, indexed_loader())
    assert (flat_params(plain) - flat_params(model)[: flat_params(plain).numel()]).abs().max() > 1e-3


def test_the_teacher_learns_nothing_from_the_term():
    model = KDModel()
    batch = next(iter(indexed_loader()))
    feats = model.forward_features(batch)
    model.fuse(feats, batch["target"], inputs={"index": batch["index"]})
    loss, _ = model.balance_losses["distill"].from_record(model, model.balance_record)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.audio_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual_encoder.parameters())
    assert model.balance_losses["distill"].embed_teachers["audio"].linear.weight.grad.abs().sum() > 0


def test_other_class_negatives_avoid_the_anchors_class_once_labels_are_known(tmp_path):
    from lightning_balance.functional import draw_negatives

    labels = torch.arange(40) % 4
    targets = torch.tensor([0, 1, 2, 3, 1])
    idx = draw_negatives(torch.tensor([0, 1, 2, 3, 5]), 40, 200, torch.Generator().manual_seed(0), labels, targets)
    assert idx.shape == (5, 201) and idx[:, 0].tolist() == [0, 1, 2, 3, 5]
    assert not bool((labels[idx[:, 1:]] == targets[:, None]).any())
    unseen = torch.full((40,), -1)  # nothing seen yet: any index is a negative
    idx = draw_negatives(torch.tensor([0]), 40, 500, torch.Generator().manual_seed(0), unseen, torch.tensor([0]))
    assert len(set(idx[0, 1:].tolist())) > 30
    # imbalanced classes (90% class 0): exactly the other class, without replacement while the pool allows
    labels = (torch.arange(100) >= 90).long()
    idx = draw_negatives(torch.tensor([0, 95]), 100, 10, torch.Generator().manual_seed(1), labels,
                         torch.tensor([0, 1]))
    assert bool((labels[idx[0, 1:]] == 1).all()) and len(set(idx[0, 1:].tolist())) == 10
    assert bool((labels[idx[1, 1:]] == 0).all()) and len(set(idx[1, 1:].tolist())) == 10
    idx = draw_negatives(torch.tensor([0]), 100, 30, torch.Generator().manual_seed(1), labels, torch.tensor([0]))
    assert bool((labels[idx[0, 1:]] == 1).all())  # 30 > the 10 of class 1: with replacement
    model = KDModel(negatives="other_class")
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, indexed_loader())
    assert torch.equal(model.balance_losses["distill"].labels, Indexed(n=N).y)  # learned from the targets
    given = CrossModalDistillation("visual", "audio", {"audio": 8, "visual": 8}, num_samples=N, labels=Indexed(n=N).y)
    assert torch.equal(given.labels, Indexed(n=N).y)
    with pytest.raises(ValueError, match="labels must give the class of each"):
        CrossModalDistillation("visual", "audio", {"audio": 8, "visual": 8}, num_samples=N, labels=[0, 1])


def test_validation_calls_leave_the_state_alone_and_the_memory_takes_a_repeated_index_once():
    from lightning_balance.functional import crd_memory_update

    model = KDModel(negatives="other_class").eval()
    term = model.balance_losses["distill"]
    before = {k: v.clone() for k, v in term.state_dict().items()}
    batch = next(iter(indexed_loader()))
    with torch.no_grad():
        model.fuse(model.forward_features(batch), batch["target"], inputs={"index": batch["index"]})
        loss, _ = term.from_record(model, model.balance_record)
    assert float(loss) == 0.0
    assert all(torch.equal(before[k], v) for k, v in term.state_dict().items())  # no Z, labels, memory or step
    memory = F.normalize(torch.randn(5, 3), dim=1)
    rows = torch.randn(3, 3)
    want = memory.clone()
    want[2] = F.normalize(memory[2] * 0.5 + rows[2] * 0.5, dim=0)  # index 2 twice: its last row
    want[0] = F.normalize(memory[0] * 0.5 + rows[1] * 0.5, dim=0)
    crd_memory_update(memory, torch.tensor([2, 0, 2]), rows, 0.5)
    torch.testing.assert_close(memory, want)
    with pytest.raises(ModalityContractError, match=r"needs \(N,\) integer class targets"):
        term.train()(torch.randn(4, 8), torch.randn(4, 8), index=torch.arange(4), targets=torch.rand(4, 3))


def test_only_samples_with_both_modalities_count_and_move_the_memories():
    model = KDModel()
    term = model.balance_losses["distill"]
    batch = next(iter(indexed_loader(missing=(0.3, 0.4))))
    both = batch["present"]["audio"] & batch["present"]["visual"]
    assert 0 < int(both.sum()) < 16
    before = term.memory_student.clone()
    feats = model.forward_features(batch)
    model.fuse(feats, batch["target"], inputs={"index": batch["index"]}, present=batch["present"])
    model.train()
    with torch.enable_grad():
        loss, _ = term.from_record(model, model.balance_record)
    moved = (term.memory_student != before).any(1)
    assert torch.equal(moved.nonzero().reshape(-1).sort().values, batch["index"][both].sort().values)
    # by hand on the complete rows, from the memories before the update (a fresh term, the same stream)
    fresh = KDModel().balance_losses["distill"]
    fresh.steps.zero_()
    vectors = model.balance_record.vectors()
    want = fresh(vectors["visual"][both], vectors["audio"][both], "audio", batch["index"][both],
                 batch["target"][both])
    torch.testing.assert_close(loss, want)


def test_several_teachers_are_distilled_in_turn_from_the_weakest():
    term = CrossModalDistillation("a", ["b", "c"], {"a": 4, "b": 4, "c": 4}, method="infonce", epochs_per_teacher=2,
                                  start_epoch=1)
    assert [term.teacher_at(e) for e in range(7)] == ["b", "b", "b", "c", "c", "c", "c"]
    with pytest.raises(ValueError, match="give epochs_per_teacher"):
        CrossModalDistillation("a", ["b", "c"], {"a": 4, "b": 4, "c": 4}, method="infonce")


def test_clear_errors():
    with pytest.raises(ValueError, match="give num_samples"):
        CrossModalDistillation("visual", "audio", {"audio": 8, "visual": 8})
    with pytest.raises(ValueError, match="cannot be its own teacher"):
        CrossModalDistillation("audio", "audio", {"audio": 8}, method="infonce")
    with pytest.raises(ValueError, match=r"feature_dims must give the width of \['visual'\]"):
        CrossModalDistillation("visual", "audio", {"audio": 8}, method="infonce")
    model = KDModel()
    batch = next(iter(indexed_loader()))
    feats = model.forward_features(batch)
    model.fuse(feats, batch["target"])
    with pytest.raises(ModalityContractError, match="needs each sample's dataset index"):
        model.balance_losses["distill"].from_record(model, model.balance_record)
    model.fuse(feats, batch["target"], inputs={"index": batch["index"] + N})
    with pytest.raises(ModalityContractError, match=r"indices must be in \[0, num_samples=64\)"):
        model.balance_losses["distill"].from_record(model, model.balance_record)
    with pytest.raises(ModalityContractError, match=r"expected \(N, 8\)"):
        model.balance_losses["distill"](torch.randn(4, 5), torch.randn(4, 8), index=torch.arange(4))


def test_resume_inside_an_epoch(tmp_path):
    straight, _, resumed, _ = resume_inside_an_epoch(
        tmp_path, lambda: [], lambda seed=0: KDModel(seed=seed, negatives="other_class"),
        lambda: indexed_loader(kind=ResumableLoader), step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    a, b = straight.balance_losses["distill"], resumed.balance_losses["distill"]
    assert torch.equal(a.memory_student, b.memory_student) and int(a.steps) == int(b.steps) == 12


class SaveTerm(SaveParams):
    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(pl_module.balance_losses["distill"].state_dict(), f"{self.directory}/term{trainer.global_rank}.pt")


class GlobalCE(KDModel):
    """The cross-entropy of the global batch under DDP too (a sum scaled by world / 16: DDP averages)."""

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"], inputs={"index": batch["index"]},
                           present=batch.get("present"))
        ce = F.cross_entropy(logits, batch["target"], reduction="sum") * self.trainer.world_size / 16
        return self.add_loss_terms(ce)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["crd", "infonce"])
def test_ddp_equals_one_process_on_the_global_batch(tmp_path, method):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    kwargs = dict(negatives="other_class") if method == "crd" else {}
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveTerm(str(ddp_dir))], devices=2, strategy="ddp_spawn",
                                use_distributed_sampler=False, max_epochs=2)).fit(
        GlobalCE(method=method, **kwargs), indexed_loader(batch_size=8, missing=(0.2, 0.2)))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    term0, term1 = torch.load(ddp_dir / "term0.pt"), torch.load(ddp_dir / "term1.pt")
    assert all(torch.equal(term0[k], term1[k]) for k in term0)
    single = GlobalCE(method=method, **kwargs)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(single, indexed_loader(batch_size=16, missing=(0.2, 0.2)))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)
    for key, value in single.balance_losses["distill"].state_dict().items():
        torch.testing.assert_close(term0[key].float(), value.float(), rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------- the pre-training recipe
class IndexedData(pl.LightningDataModule):
    def train_dataloader(self):
        return indexed_loader()


def test_distill_encoder_is_crds_student_training_and_replaces_the_encoder(tmp_path):
    """The official student objective, CE(head(z_s)) + 0.8 · CRD(z_s, z_t) with the teacher frozen in eval mode,
    SGD, restated here; the module's student encoder ends with the distilled weights, the teacher untouched."""
    from lightning_balance import distill_encoder

    term_kwargs = dict(feat_dim=FEAT, nce_k=K, negatives="uniform", seed=SEED)
    # the reference, drawing the same initial weights in the same order as the helper
    owner = TinyAV(seed=0)
    torch.manual_seed(11)
    student = __import__("copy").deepcopy(owner.visual_encoder)
    for sub in student.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    next(iter(indexed_loader()))  # the helper's look at a first batch draws a DataLoader seed
    term = CrossModalDistillation("visual", "audio", {"visual": 8, "audio": 8}, num_samples=N, **term_kwargs)
    head = torch.nn.Linear(8, 4)
    batches = list(indexed_loader())
    teacher = owner.audio_encoder
    params = [*student.parameters(), *head.parameters(), *term.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(SEED)
    bound = 1.0 / math.sqrt(FEAT / 3)
    mem_s = torch.rand(N, FEAT, generator=g) * 2 * bound - bound
    mem_t = torch.rand(N, FEAT, generator=g) * 2 * bound - bound
    zn = None
    for step, batch in enumerate(batches * 2, start=1):
        optimizer.zero_grad()
        zs = student(batch["visual"])
        with torch.no_grad():
            zt = teacher(batch["audio"])
        s, t = embed(term.embed_student.linear, zs), embed(term.embed_teachers["audio"].linear, zt)
        neg = torch.randint(0, N, (16, K), generator=torch.Generator().manual_seed(SEED * 1_000_003 + step))
        idx = torch.cat([batch["index"][:, None], neg], 1)
        o1 = torch.exp(torch.einsum("bkd,bd->bk", mem_t[idx], s) / TEMP)
        o2 = torch.exp(torch.einsum("bkd,bd->bk", mem_s[idx], t) / TEMP)
        if zn is None:
            zn = (float(o1.detach().mean() * N), float(o2.detach().mean() * N))
        loss = F.cross_entropy(head(zs), batch["target"]) + 0.8 * (nce(o1 / zn[0]) + nce(o2 / zn[1]))
        with torch.no_grad():
            mem_s[batch["index"]] = F.normalize(mem_s[batch["index"]] * MOMENTUM + s * (1 - MOMENTUM), dim=1)
            mem_t[batch["index"]] = F.normalize(mem_t[batch["index"]] * MOMENTUM + t * (1 - MOMENTUM), dim=1)
        loss.backward()
        optimizer.step()

    module = TinyAV(seed=0)
    teacher_before = flat_params(module.audio_encoder).clone()
    torch.manual_seed(11)
    distilled = distill_encoder(module, "visual", "audio", IndexedData(), num_classes=4, max_epochs=2,
                                term_kwargs=term_kwargs, default_root_dir=str(tmp_path))
    torch.testing.assert_close(flat_params(distilled), flat_params(student), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat_params(module.visual_encoder), flat_params(student), rtol=1e-5, atol=1e-6)
    assert torch.equal(flat_params(module.audio_encoder), teacher_before)
    assert (flat_params(student) - flat_params(TinyAV(seed=0).visual_encoder)).abs().max() > 1e-2


def test_both_ways_of_scoring_against_the_memory_agree_and_survive_the_update():
    from lightning_balance.functional import crd_memory_update, crd_scores

    torch.manual_seed(0)
    anchor = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    for n, k in ((30, 20), (300, 2)):  # N <= (K+1)·d: the products with the whole memory; else the gathered rows
        memory = F.normalize(torch.randn(n, 4), dim=1)
        idx = torch.randint(0, n, (5, k + 1))
        want = torch.exp(torch.einsum("bkd,bd->bk", memory[idx], anchor) / 0.07)
        got = crd_scores(anchor, memory, idx, 0.07)
        torch.testing.assert_close(got, want)
        crd_memory_update(memory, idx[:, 0], anchor, 0.5)  # in place, before the backward
        got.sum().backward()
        assert torch.isfinite(anchor.grad).all()
        anchor.grad = None


def test_the_student_and_teachers_from_a_diagnosis(tmp_path):
    from lightning_balance import ModalityDiagnostics
    from lightning_balance.functional import distillation_order

    values = {"contribution/a": 0.30, "contribution/b": 0.05, "contribution/c": 0.12}
    assert distillation_order(values, ["a", "b", "c"]) == ("b", ["c", "a"])  # least used; teachers weakest first
    with pytest.raises(ValueError, match="no finite 'contribution' for \\['c'\\]"):
        distillation_order({"contribution/a": 0.1, "contribution/b": 0.2}, ["a", "b", "c"])
    # from a real diagnosis: DictDataset's audio is the strong modality, so visual is the student
    diag = ModalityDiagnostics(verbose=False, probe=False, vif=False, bootstrap=0, plot=False)
    model = TinyAV()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag], max_epochs=3)).fit(
        model, indexed_loader(), DataLoader(Indexed(n=N, seed=2), batch_size=16))
    last = diag.diagnostics_history[-1]
    assert last["contribution/audio"] > last["contribution/visual"]
    assert distillation_order(last, model.modalities) == ("visual", ["audio"])
