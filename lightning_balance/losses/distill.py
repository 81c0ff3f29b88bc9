"""Cross-modal knowledge distillation into the collapsing modality's encoder, as a loss term."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_balance._distributed import global_batch_rows
from lightning_balance.functional.contrastive import symmetric_info_nce
from lightning_balance.functional.distill import (
    crd_memory_init,
    crd_memory_update,
    crd_nce_loss,
    crd_scores,
    draw_negatives,
)
from lightning_balance.losses.base import LossTerm
from lightning_balance.losses.umt import _UnimodalModel
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__all__ = ["CrossModalDistillation", "distill_encoder"]


class _Embed(nn.Module):
    """CRD's embedding: a linear map, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


class CrossModalDistillation(LossTerm):
    r"""Distil the modality that survives fusion (the teacher) into the encoder of the one that collapses (the
    student): Chaudhuri et al., "A Closer Look at Multimodal Representation Collapse" (ICML 2025, §3.3), with
    Contrastive Representation Distillation (Tian et al., ICLR 2020) as the distillation loss, as the paper uses it.
    The paper pre-trains the student encoder by distillation and then replaces the original
    (:func:`distill_encoder`); this term is our variant that distils **during** the joint training, where the
    teacher is the other modality's encoder as it trains (detached here, in the model's train mode: its
    dropout and batch norm run as in training), not a frozen network in eval mode.

    The teacher's features are **detached**: only the student's encoder (and the two embeddings) learn from
    this term. Two estimators of the contrastive objective:

    * ``method="crd"`` (the official CRD): embeddings ``s = normalise(W_s z_student)``,
      ``t = normalise(W_t z_teacher)`` of ``feat_dim``; a memory bank of student and of teacher embeddings over
      the ``num_samples`` training samples; per sample its own index as the positive and ``nce_k`` negative
      indices; the NCE loss of the student anchored on the teacher memory plus that of the teacher anchored on
      the student memory (see :mod:`lightning_balance.functional.distill` for the formulas); then the memories
      move toward the batch with momentum ``nce_m``. Needs each sample's **dataset index**:
      ``self.fuse(features, y, inputs={"index": batch["index"]})`` (the key is ``index_key``).
    * ``method="infonce"``: the symmetric in-batch InfoNCE between ``s`` and ``t`` at temperature ``nce_t``
      (no memory, no index): the negatives are the other samples of the global batch, gathered from every rank.

    **Negatives** (``crd``): ``"other_class"`` (default; the official data loader's ``mode='exact'``: negatives
    from the other classes, whose labels the term learns from the targets it sees, an index not seen yet counting
    as another class) or ``"uniform"`` (the official memory's own sampler, any index). They are drawn on the CPU
    from a generator seeded by ``(seed, step)``, identical on every rank, for the batch's samples in the order of
    their dataset indices.

    **DDP** (both): every rank gathers the embeddings, indices, targets and presence of the global batch,
    computes the loss of the whole global batch with gradient through its own rows (multiplied by the number of
    ranks, as DDP averages), and updates its memories with the global batch, so memories, normalisers and
    losses are identical on every rank and equal one process on the global batch.

    **Several teachers** (the paper's §3.3: "distilling in a sequence starting from the weakest and finishing with
    the strongest"): ``teacher=[weakest, ..., strongest]`` with ``epochs_per_teacher=E`` distils from each in turn
    for ``E`` epochs (the last one until ``end_epoch``); each teacher has its own embedding and memory.

    **Absent modalities**: a sample counts (as an anchor, a positive and a memory update) only if it has both
    the student and the teacher modality; a step where none does adds 0 (attached to the graph).

    **Accumulation**: the memories are updated after each ``fuse`` call (each micro-batch), as the official code
    does after each iteration; with accumulation the later micro-batches of a step see the updated memories.

    Args:
        student: the modality that collapses (its encoder learns).
        teacher: the modality that survives, or a sequence of them, weakest first.
        feature_dims: modality → feature width (after pooling tokens), for the student and every teacher.
        method: ``"crd"`` or ``"infonce"``.
        num_samples: the training set's size ``N`` (``crd``; the memories' length). Indices must be in ``[0, N)``.
        feat_dim: embedding width (official 128).
        nce_k: negatives per sample (official 16384).
        nce_t: temperature (official 0.07).
        nce_m: memory momentum (official 0.5).
        negatives: ``"other_class"`` or ``"uniform"`` (``crd``).
        index_key: the key of the dataset indices in ``fuse(..., inputs=...)`` (``crd``).
        labels: the class of every training sample (``(N,)``, ``crd`` with ``"other_class"``), as the official data
            loader knows them; ``None``: learned from the targets as the samples are seen (an index not seen yet
            counts as another class, so the first epoch's negatives are close to uniform).
        epochs_per_teacher: epochs per teacher when ``teacher`` is a sequence.
        seed: of the memories' initialisation and the negatives.
        weight: the term's weight (official ``-b 0.8``), ``start_epoch``, ``end_epoch``: see :class:`LossTerm`.
    """

    name = "distill"
    steps: Tensor  # buffers (registered in __init__; the memories, normalisers and labels with method="crd")
    memory_student: Tensor
    normalisers: Tensor
    labels: Tensor

    def __init__(self, student: str, teacher: Union[str, Sequence[str]], feature_dims: dict[str, int],
                 method: Literal["crd", "infonce"] = "crd", num_samples: Optional[int] = None, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 negatives: Literal["other_class", "uniform"] = "other_class", index_key: str = "index",
                 epochs_per_teacher: Optional[int] = None, seed: int = 0, weight: float = 0.8,
                 start_epoch: int = 0, end_epoch: Optional[int] = None,
                 labels: Optional[Union[Sequence[int], Tensor]] = None) -> None:
        super().__init__(weight=weight, start_epoch=start_epoch, end_epoch=end_epoch)
        teachers = [teacher] if isinstance(teacher, str) else list(teacher)
        if not teachers or not all(isinstance(t, str) for t in teachers) or len(set(teachers)) != len(teachers):
            raise ValueError(f"teacher must be a modality name or a sequence of distinct names, got {teacher!r}.")
        if student in teachers:
            raise ValueError(f"the student {student!r} cannot be its own teacher ({teachers}).")
        if len(teachers) > 1 and (isinstance(epochs_per_teacher, bool) or not isinstance(epochs_per_teacher, int)
                                  or epochs_per_teacher < 1):
            raise ValueError(f"several teachers {teachers} are distilled in turn: give epochs_per_teacher >= 1, got "
                             f"{epochs_per_teacher!r}.")
        unknown = [m for m in (student, *teachers) if m not in (feature_dims or {})]
        if unknown:
            raise ValueError(f"feature_dims must give the width of {unknown} (the features' last dimension), got "
                             f"{feature_dims!r}.")
        if method not in ("crd", "infonce"):
            raise ValueError(f"method must be 'crd' or 'infonce', got {method!r}.")
        if negatives not in ("other_class", "uniform"):
            raise ValueError(f"negatives must be 'other_class' or 'uniform', got {negatives!r}.")
        for label, value in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}.")
        if not 0 < nce_t < 10 or not 0 <= nce_m < 1:
            raise ValueError(f"nce_t must be in (0, 10) and nce_m in [0, 1), got {nce_t!r} and {nce_m!r}.")
        if method == "crd" and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2):
            raise ValueError(f"method='crd' keeps a memory of every training sample: give num_samples (the training "
                             f"set's size, >= 2), got {num_samples!r}; or use method='infonce' (no memory).")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
        self.student, self.teachers = student, teachers
        self.method, self.negatives, self.index_key = method, negatives, index_key
        self.num_samples = num_samples
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, float(nce_t), float(nce_m)
        self.epochs_per_teacher, self.seed = epochs_per_teacher, seed
        self.embed_student = _Embed(feature_dims[student], feat_dim)
        self.embed_teachers = nn.ModuleDict({t: _Embed(feature_dims[t], feat_dim) for t in teachers})
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._index_checks = 0  # fuse calls distilled: the negatives' stream
        if method == "crd":
            assert num_samples is not None  # checked above
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("memory_student", crd_memory_init(num_samples, feat_dim, g))
            for t in teachers:
                self.register_buffer(f"memory_{t}", crd_memory_init(num_samples, feat_dim, g))
            self.register_buffer("normalisers", torch.full((2 * len(teachers),), -1.0))  # Z_s, Z_t per teacher
            known = torch.full((num_samples,), -1, dtype=torch.long)
            if labels is not None:
                known = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
                if known.shape[0] != num_samples:
                    raise ValueError(f"labels must give the class of each of the num_samples={num_samples} training "
                                     f"samples, got {known.shape[0]}.")
            self.register_buffer("labels", known)

    def teacher_at(self, epoch: int) -> str:
        """The teacher of ``epoch`` (the weakest first, ``epochs_per_teacher`` epochs each, the last one after)."""
        if len(self.teachers) == 1:
            return self.teachers[0]
        stage = max(0, epoch - self.start_epoch) // self.epochs_per_teacher  # type: ignore[operator]
        return self.teachers[min(stage, len(self.teachers) - 1)]

    # ------------------------------------------------------------------ the loss
    def forward(self, student: Tensor, teacher: Tensor, teacher_name: Optional[str] = None,
                index: Optional[Tensor] = None, targets: Optional[Tensor] = None,
                keep: Optional[Tensor] = None, update: bool = True) -> Tensor:
        """The loss of one batch: ``student``, ``teacher`` ``(B, D)`` vectors (the teacher is detached here);
        ``index`` ``(B,)`` dataset indices (``crd``); ``targets`` (``negatives="other_class"``); ``keep`` ``(B,)``
        the samples that count; ``update``: move the memories (training)."""
        name = teacher_name or self.teachers[0]
        if name not in self.embed_teachers:
            raise ModalityContractError(f"CrossModalDistillation has no teacher {name!r}; its teachers are {self.teachers}.")
        for what, x, embed in (("student " + repr(self.student), student, self.embed_student),
                               ("teacher " + repr(name), teacher, cast(_Embed, self.embed_teachers[name]))):
            width = embed.linear.in_features
            if x.ndim != 2 or x.shape[1] != width:
                raise ModalityContractError(
                    f"CrossModalDistillation: the {what} vectors have shape {tuple(x.shape)}, expected (N, {width}) from "
                    f"feature_dims (the width after pooling tokens).")
        s = self.embed_student(student)
        t = self.embed_teachers[name](teacher.detach())
        n = s.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=s.device) if keep is None else keep.to(s.device)
        crd = self.method == "crd"
        if crd:
            if index is None:
                raise ModalityContractError(
                    f"CrossModalDistillation(method='crd') needs each sample's dataset index: call "
                    f"self.fuse(features, y, inputs={{{self.index_key!r}: batch[{self.index_key!r}]}}) (a dataset that "
                    f"returns its index), or use method='infonce'.")
            index = index.reshape(-1).to(device=s.device, dtype=torch.long)
            if index.shape[0] != n:
                raise ModalityContractError(f"CrossModalDistillation: {index.shape[0]} indices for {n} samples.")
            assert self.num_samples is not None  # method="crd" requires it
            checked = index.device.type == "cpu" or self._index_checks < 16  # a host sync: the first 16 on accelerators
            self._index_checks += index.device.type != "cpu"
            if checked and bool(((index < 0) | (index >= self.num_samples)).any()):
                raise ModalityContractError(
                    f"CrossModalDistillation: dataset indices must be in [0, num_samples={self.num_samples}), got "
                    f"{sorted({int(i) for i in index.tolist()})[:3]}...{int(index.max())}: num_samples is the training "
                    f"set's size.")
        if crd and self.negatives == "other_class" and (targets is None or targets.ndim != 1
                                                          or targets.is_floating_point() or targets.shape[0] != n):
            raise ModalityContractError(
                f"CrossModalDistillation(negatives='other_class') draws negatives from the other classes: it needs "
                f"(N,) integer class targets, got {None if targets is None else (tuple(targets.shape), targets.dtype)}; "
                f"use negatives='uniform' for other targets.")
        if targets is None:
            targets = torch.full((n,), -1, dtype=torch.long, device=s.device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:  # the global batch on every rank, with gradient through this rank's rows (x W: DDP averages)
            # one float64 gather: the embeddings, which samples count, their targets and dataset indices (exact)
            extra = torch.stack([keep.double(), targets.double(),
                                 (index if crd else torch.zeros_like(targets)).double()], 1)  # type: ignore[union-attr]
            local = torch.cat([s.double(), t.double(), extra], 1)
            full = global_batch_rows(local)
            s, t, extra = full.split([self.feat_dim, self.feat_dim, 3], 1)
            s, t = s.float(), t.float()
            keep, targets = extra[:, 0].detach() > 0.5, extra[:, 1].detach().round().long()
            if crd:
                index = extra[:, 2].detach().round().long()
        attached = 0.0 * (s.sum() + t.sum())  # every embedding stays in the graph (DDP's used-parameter check)
        if not update:  # validation, sanity checks: the official code never scores them, and no state moves
            return attached
        self.steps += 1
        if not bool(keep.any()):
            return attached
        s, t, targets = s[keep], t[keep], targets[keep]
        if not crd:
            return symmetric_info_nce(s, t, 1.0 / self.nce_t) + attached
        index = index[keep]  # type: ignore[index]
        return self._crd(s, t, name, index, targets, update) + attached

    def _crd(self, s: Tensor, t: Tensor, name: str, index: Tensor, targets: Tensor, update: bool) -> Tensor:
        n_data = self.num_samples
        assert n_data is not None  # method="crd" requires it
        k = self.teachers.index(name)
        # the rows in dataset-index order: the negatives drawn for a sample do not depend on where it sits in the
        # batch, so the rank-by-rank global batch of DDP draws what one process draws (the loss is a sum over rows)
        order = torch.argsort(index, stable=True)
        s, t, index, targets = s[order], t[order], index[order], targets[order]
        if self.negatives == "other_class":
            self.labels.index_copy_(0, index, torch.where(targets >= 0, targets, self.labels[index]))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        labels = self.labels if self.negatives == "other_class" else None
        idx = draw_negatives(index, n_data, self.nce_k, g, labels, targets)
        memory_s, memory_t = self.memory_student, getattr(self, f"memory_{name}")
        with torch.autocast(s.device.type, enabled=False):
            s, t = s.float(), t.float()
            out_s = crd_scores(s, memory_t, idx, self.nce_t)  # the student anchored on the teacher's memory
            out_t = crd_scores(t, memory_s, idx, self.nce_t)  # the teacher anchored on the student's memory
            for j, out in ((2 * k, out_s), (2 * k + 1, out_t)):  # set once, on the first batch, as the official code
                rows = torch.isfinite(out.detach()).all(1)  # a non-finite first batch must not fix Z at NaN
                mean = torch.where(rows[:, None], out.detach(), 0.0).sum() / (rows.sum() * out.shape[1]).clamp_min(1)
                first = (self.normalisers[j] < 0) & rows.any() & torch.isfinite(mean) & (mean > 0)
                self.normalisers[j] = torch.where(first, mean * n_data, self.normalisers[j])  # no host sync
            loss = (crd_nce_loss(out_s / self.normalisers[2 * k], n_data)
                    + crd_nce_loss(out_t / self.normalisers[2 * k + 1], n_data))
        if update:
            crd_memory_update(memory_s, index, s, self.nce_m)
            crd_memory_update(memory_t, index, t, self.nce_m)
        return loss

    def from_record(self, module: MultimodalMixin, record: ModalityRecord) -> tuple[Tensor, dict[str, Tensor]]:
        for m in (self.student, *self.teachers):
            module.check_modality(m)
        trainer = module._trainer
        name = self.teacher_at(trainer.current_epoch if trainer is not None else 0)
        vectors = record.vectors(detach=False)
        keep = (record.valid if record.present is None
                else cast(Tensor, record.valid) & record.present[self.student] & record.present[name])
        index = None if record.inputs is None else record.inputs.get(self.index_key)
        targets = record.targets if record.targets is not None else None
        update = bool(record.training and torch.is_grad_enabled())
        loss = self.forward(vectors[self.student], vectors[name], name, index, targets, keep, update)
        return loss, {"teacher": torch.tensor(float(self.teachers.index(name)))}

    def extra_repr(self) -> str:
        return (f"student={self.student!r}, teachers={self.teachers}, method={self.method!r}, "
                f"nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}")



class _DistillStudent(_UnimodalModel):
    """The student encoder with a linear head, trained on ``γ · CE + term`` against a frozen teacher encoder."""

    pool: Callable[[str, Tensor], Tensor]  # always given here: the module's pool_features

    def __init__(self, student: nn.Module, teacher: nn.Module, width: int, num_classes: int, names: tuple[str, str],
                 term: CrossModalDistillation, classification_weight: float, lr: float, momentum: float,
                 ignore_index: int, order: Sequence[str], pool: Any) -> None:
        super().__init__(student, width, num_classes, names[0], lr, momentum, ignore_index,
                         list(order).index(names[0]), pool)
        self.term, self.teacher_name, self.order = term, names[1], list(order)
        self.teacher = [teacher]  # not a submodule: neither trained nor checkpointed here
        self.classification_weight = classification_weight

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        teacher = self.teacher_name
        targets = batch["target"]
        zs = self.features(batch[self.modality])
        teacher_net = self.teacher[0].to(zs.device).eval()
        with torch.no_grad():  # the official teacher: frozen, in eval mode
            zt = self.pool(teacher, teacher_net(batch[teacher]))
        own = self.own_targets(batch)  # ignore_index where the student's modality is absent
        keep = (own != self.ignore_index) & self.has(batch, teacher, self.order.index(teacher), len(targets), zs.device)
        loss = self.term.weight * self.term(zs, zt, teacher, batch.get(self.term.index_key), targets, keep)
        if self.classification_weight:
            loss = loss + self.classification_weight * F.cross_entropy(self.head(zs), own, ignore_index=self.ignore_index)
        return loss


def distill_encoder(module: MultimodalMixin, student: str, teacher: str, datamodule: pl.LightningDataModule,
                    num_classes: int, max_epochs: int = 40, method: Literal["crd", "infonce"] = "crd",
                    classification_weight: float = 1.0, lr: float = 0.05, momentum: float = 0.9,
                    replace: bool = True, reinitialise: bool = True, term_kwargs: Optional[dict[str, Any]] = None,
                    **trainer_kwargs: Any) -> nn.Module:
    r"""The paper's recipe (Chaudhuri et al., ICML 2025, §3.3): "replace the modality-specific encoder of the
    modality that gets eliminated under collapse, with one that is pretrained via cross-modal knowledge
    distillation" from the modality that survives.

    A copy of ``module``'s ``student`` encoder (re-initialised by default) with a linear head is trained on the
    datamodule's training batches ``{modality: x, "target": y, "index": i}`` with CRD's student objective,
    ``γ · CE(head(z_s), y) + 0.8 · CRD(z_s, z_t)`` (the official ``train_student.py`` with ``-r 1 -a 0 -b 0.8``),
    against the module's ``teacher`` encoder, frozen and in eval mode (train the module, or its teacher encoder,
    first: the teacher should be the trained encoder of the modality that survives). With ``replace=True`` the
    distilled weights are loaded into the module's student encoder; either way the distilled encoder is returned.

    Args:
        module: the multimodal module (its declared encoders; one module per modality).
        student, teacher: the collapsing and the surviving modality.
        datamodule: gives ``train_dataloader()`` (with ``"index"`` for ``method="crd"``; the data modules have it).
        num_classes: classes of the head.
        max_epochs, lr, momentum: the distillation's training (SGD).
        method: ``"crd"`` or ``"infonce"``.
        classification_weight: γ, the weight of the student's own cross-entropy (official 1; 0: distillation only).
        replace: load the distilled weights into the module's student encoder.
        reinitialise: start the student from fresh parameters (``reset_parameters``), as a pre-training does.
        term_kwargs: more :class:`CrossModalDistillation` arguments (``nce_k``, ``feat_dim``, ``weight``, ...).
        trainer_kwargs: more ``pl.Trainer`` arguments.
    """
    for m in (student, teacher):
        module.check_modality(m)
        if len(module.modality_encoders(m)) != 1:
            raise ModalityContractError(f"distill_encoder needs one encoder module for {m!r}, got "
                                        f"{len(module.modality_encoders(m))}.")
    encoder = copy.deepcopy(module.modality_encoders(student)[0])
    if reinitialise:
        for sub in encoder.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()  # type: ignore[operator]
    teacher_net = copy.deepcopy(module.modality_encoders(teacher)[0]).requires_grad_(False)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    sample = next(iter(loader))
    with torch.no_grad():
        widths = {student: module.pool_features(student, encoder(sample[student])).shape[-1],
                  teacher: module.pool_features(teacher, teacher_net(sample[teacher])).shape[-1]}
    options = dict(term_kwargs or {})
    if method == "crd":
        options.setdefault("num_samples", len(loader.dataset))
        known = getattr(loader.dataset, "tensors", None)  # the data modules' datasets know every label up front
        if isinstance(known, Mapping) and "target" in known and options.get("negatives", "other_class") == "other_class":
            options.setdefault("labels", known["target"])
    term = CrossModalDistillation(student, teacher, widths, method=method, **options)
    model = _DistillStudent(encoder, teacher_net, widths[student], num_classes, (student, teacher), term,
                            classification_weight, lr, momentum, module.modality_spec.ignore_index, module.modalities,
                            module.pool_features)
    kwargs = {"max_epochs": max_epochs, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, **trainer_kwargs}
    pl.Trainer(**kwargs).fit(model, train_dataloaders=loader)
    if replace:
        module.modality_encoders(student)[0].load_state_dict(model.encoder.state_dict())
    return model.encoder
