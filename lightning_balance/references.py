"""Trained-alone references: each modality trained alone through the user's own encoders and data.

The diagnosis asks two questions that need a reference a joint model cannot give: *is an encoder
under-learned?* (its probe after joint training against the probe of the same encoder trained alone) and *is
there anything to gain?* (the fused accuracy against the best modality alone and the unimodal ensemble).
:func:`fit_alone` trains those references from the module's declared encoders, and
:meth:`AloneReferences.evaluate` measures them on the samples the diagnosis reads, with the diagnosis's own
protocol (docs/your_model.md, "Step 1: train each modality alone").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning.pytorch.utilities import move_data_to_device

from lightning_balance._errors import ModalityContractError
from lightning_balance._presence import normalise_presence
from lightning_balance.functional.diagnostics import cross_validated_probe_accuracy, probe_standard_error

if TYPE_CHECKING:
    from lightning_balance.modality import MultimodalMixin

__all__ = ["AloneReferences", "BatchReader", "KeepBest", "datamodule_for", "fit_alone", "loader_of"]

#: ``inputs`` of :func:`fit_alone`: ``None`` (modality ``m`` is ``batch[m]``), a mapping ``{modality: batch key}``,
#: or a function ``(batch, modality) -> encoder input``.
InputsLike = Union[None, Mapping[str, str], Callable[[Any, str], Any]]


@dataclass(frozen=True)
class BatchReader:
    """Where a batch keeps each modality's encoder input, the targets and the presence mask.

    Args:
        modalities: the module's modalities, in declared order.
        inputs: ``None`` (``batch[m]``), ``{modality: key}`` or a function ``(batch, modality) -> input``.
        target_key: the targets' key (a function ``batch -> targets`` also works).
        present_key: the presence mask's key, when the batches carry one (``{m: (N,) bool}`` or ``(N, M)``).
    """

    modalities: tuple[str, ...]
    inputs: InputsLike = None
    target_key: Union[str, Callable[[Any], Tensor]] = "target"
    present_key: Optional[str] = "present"

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Mapping):
            unknown = sorted(set(self.inputs) - set(self.modalities))
            if unknown:
                raise ModalityContractError(f"inputs names modalities the module does not declare: {unknown}; "
                                            f"its modalities are {list(self.modalities)}.")
        elif self.inputs is not None and not callable(self.inputs):
            raise TypeError(f"inputs must be None, a mapping {{modality: batch key}} or a function (batch, modality) "
                            f"-> input, got {type(self.inputs).__name__}.")

    def _key(self, batch: Any, key: str, what: str, fix: str) -> Any:
        if not isinstance(batch, Mapping):
            raise ModalityContractError(
                f"the batches are {type(batch).__name__}, not mappings: say where {what} is with {fix} (a function "
                f"of the batch).")
        if key not in batch:
            raise ModalityContractError(
                f"the batch has no key {key!r} ({what}); its keys are {sorted(map(str, batch))}. Pass {fix}.")
        return batch[key]

    def input(self, batch: Any, modality: str) -> Any:
        """The encoder input of ``modality`` in ``batch``."""
        if callable(self.inputs) and not isinstance(self.inputs, Mapping):
            return self.inputs(batch, modality)
        key = modality if self.inputs is None else self.inputs.get(modality, modality)
        return self._key(batch, key, f"the input of modality {modality!r}",
                         f"inputs={{{modality!r}: '<its key>'}} (or a function inputs=lambda batch, m: ...; with diagnose(..., "
                         f"fit_references=...) inside reference_kwargs; on the command line --inputs {modality}=<its key>)")

    def targets(self, batch: Any) -> Tensor:
        """The class targets of ``batch``."""
        if callable(self.target_key):
            return self.target_key(batch)
        return self._key(batch, self.target_key, "the targets", "target_key='<its key>'")

    def present(self, batch: Any, n: int, device: torch.device) -> Optional[dict[str, Tensor]]:
        """The batch's presence mask as ``{modality: (N,) bool}``, or ``None`` (every sample complete)."""
        if self.present_key is None or not isinstance(batch, Mapping) or batch.get(self.present_key) is None:
            return None
        return normalise_presence(batch[self.present_key], self.modalities, n, device)


class KeepBest(pl.Callback):
    """Keeps, in memory, the module's state at the validation epoch with the best ``key`` (a logged metric);
    :meth:`restore` loads it back. Tensors are cloned, extra state (a loss term's schedule) deep-copied.

    Attributes:
        best: the best value of ``key`` (``-inf`` before a validation).
        best_epoch: its epoch (``-1`` before a validation).
        curve: ``key`` after each validation epoch.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.best = -math.inf
        self.best_epoch = -1
        self.state: Optional[dict[str, Any]] = None
        self.curve: list[float] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.key)
        score = float(value) if value is not None else math.nan
        self.curve.append(score)
        if score > self.best:
            self.best, self.best_epoch = score, trainer.current_epoch
            self.state = {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                          for k, v in pl_module.state_dict().items()}

    def restore(self, module: nn.Module) -> None:
        """Load the kept state into ``module`` (nothing if no validation ran)."""
        if self.state is not None:
            module.load_state_dict(self.state)


def datamodule_for(data: Any, seed: int) -> pl.LightningDataModule:
    """``data`` itself when it is a LightningDataModule, else ``data(seed=seed)`` (or ``data()`` when it takes no
    ``seed``): a datamodule, its class or a factory."""
    if isinstance(data, pl.LightningDataModule):
        return data
    if callable(data):
        import inspect

        return data(seed=seed) if "seed" in inspect.signature(data).parameters else data()
    raise TypeError(f"datamodule must be a LightningDataModule, its class or a function (seed=...) returning one, "
                    f"got {type(data).__name__}.")


def loader_of(datamodule: Any, which: str) -> Any:
    """``datamodule.<which>_dataloader()``, or ``None`` when the datamodule has none."""
    method = getattr(datamodule, f"{which}_dataloader", None)
    if method is None:
        return None
    try:
        return method()
    except (NotImplementedError, pl.utilities.exceptions.MisconfigurationException):  # Lightning's "not defined"
        return None


class _AloneModel(pl.LightningModule):
    """One modality alone: a fresh copy of the module's encoder and a linear head, cross-entropy, the optimizer
    given; logs its validation accuracy as ``val_acc`` (the selection is :class:`KeepBest`'s)."""

    def __init__(self, encoder: nn.Module, width: int, num_classes: int, modality: str, reader: BatchReader,
                 pool: Optional[Callable[[str, Tensor], Tensor]], ignore_index: int,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, num_classes)
        self.modality = modality
        self.reader = reader
        self._pool = pool
        self.ignore_index = ignore_index
        self._optimizer = optimizer
        self._hits = torch.zeros(2, dtype=torch.float64)

    def features(self, x: Any) -> Tensor:
        z = self.encoder(x)
        if self._pool is not None:  # the joint module's own pooling (overridden pool_features)
            return self._pool(self.modality, z)
        return z.mean(dim=tuple(range(1, z.ndim - 1))) if z.ndim > 2 else z  # the contract's default pooling

    def forward(self, x: Any) -> Tensor:
        return self.head(self.features(x))

    def own_targets(self, batch: Any) -> Tensor:
        """The targets, ``ignore_index`` where the sample lacks this modality."""
        targets = self.reader.targets(batch)
        present = self.reader.present(batch, len(targets), targets.device)
        if present is None:
            return targets
        return torch.where(present[self.modality], targets, torch.full_like(targets, self.ignore_index))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        targets = self.own_targets(batch)
        if not bool((targets != self.ignore_index).any()):  # no sample of this batch has the modality
            return 0.0 * sum(p.sum() for p in self.parameters())  # type: ignore[return-value]
        return F.cross_entropy(self(self.reader.input(batch, self.modality)), targets, ignore_index=self.ignore_index)

    def on_validation_epoch_start(self) -> None:
        self._hits = torch.zeros(2, dtype=torch.float64)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        targets = self.own_targets(batch)
        keep = targets != self.ignore_index
        if bool(keep.any()):
            pred = self(self.reader.input(batch, self.modality)).argmax(-1)
            self._hits += torch.tensor([float((pred[keep] == targets[keep]).sum()), float(keep.sum())],
                                       dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        hits = self.trainer.strategy.reduce(self._hits.to(self.device), reduce_op="sum").cpu()
        accuracy = float(hits[0] / hits[1]) if hits[1] > 0 else math.nan
        self.log("val_acc", accuracy, sync_dist=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer(self.parameters())


@dataclass
class AloneReferences:
    """Each modality trained alone (:func:`fit_alone`): the models, how they were selected, and
    :meth:`evaluate` to measure them on the samples a diagnosis reads.

    Attributes:
        models: modality → the trained unimodal model (``.encoder``, ``.head``; eval mode).
        val_accuracy: modality → its validation accuracy at the selected epoch (NaN without validation data).
        epochs: modality → the selected epoch (0-based; the last one without validation data).
        reader: where the batches keep each modality (:class:`BatchReader`).
    """

    models: dict[str, nn.Module]
    val_accuracy: dict[str, float]
    epochs: dict[str, int]
    reader: BatchReader
    probe_folds: int = 2
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """modality → the trained-alone encoder (e.g. the teachers of :class:`~lightning_balance.UMTLoss`)."""
        return {m: model.encoder for m, model in self.models.items()}  # type: ignore[misc]

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable[Any], num_classes: Optional[int] = None,
                 complete_only: bool = True) -> dict[str, float]:
        """Measure the references on ``dataloader`` (e.g. the validation loader the diagnosis reads).

        Per modality ``m``: ``acc/<m>`` (the model's accuracy), ``probe/<m>`` (a linear probe on the trained-alone
        encoder's features, ``probe_folds``-fold cross-validated on these samples: the protocol of
        :class:`~lightning_balance.ModalityDiagnostics`' probe, so the two are comparable), and ``ensemble`` (the
        product of the models' probabilities, the unimodal ensemble), each with its binomial standard error
        (``*_se``). Samples whose target is the models' ``ignore_index`` are left out and, with ``complete_only``
        (the diagnosis's own rule), so are samples that lack a modality. The result is also kept in
        :attr:`measured`.
        """
        names = list(self.models)
        rows: dict[str, list[Tensor]] = {m: [] for m in names}
        logits: dict[str, list[Tensor]] = {m: [] for m in names}
        targets: list[Tensor] = []
        first = next(iter(self.models.values()))
        device = next(first.parameters()).device
        ignore = getattr(first, "ignore_index", -100)
        for model in self.models.values():
            model.eval()
        for batch in dataloader:
            batch = move_data_to_device(batch, device)
            y = self.reader.targets(batch)
            keep = y != ignore
            present = self.reader.present(batch, len(y), y.device)
            if present is not None and complete_only:
                for m in names:
                    keep = keep & present[m]
            if not bool(keep.any()):
                continue
            targets.append(y[keep].cpu())
            for m, model in self.models.items():
                z = model.features(self.reader.input(batch, m))  # type: ignore[operator]
                rows[m].append(z[keep].float().cpu())
                logits[m].append(model.head(z)[keep].float().cpu())  # type: ignore[operator]
        if not targets:
            raise ValueError("AloneReferences.evaluate found no labelled (complete) samples in the data loader.")
        y = torch.cat(targets)
        n = len(y)
        c = num_classes or int(torch.cat(logits[names[0]]).shape[-1])
        out: dict[str, float] = {"samples": float(n)}
        log_p = torch.zeros(n, c, dtype=torch.float64)
        for m in names:
            o = torch.cat(logits[m])
            acc = float((o.argmax(-1) == y).double().mean())
            out[f"acc/{m}"], out[f"acc_se/{m}"] = acc, probe_standard_error(acc, n)
            probe = cross_validated_probe_accuracy(torch.cat(rows[m]), y, c, self.probe_folds)
            out[f"probe/{m}"], out[f"probe_se/{m}"] = probe, probe_standard_error(probe, n)
            log_p += torch.log_softmax(o.double(), -1)
        ens = float((log_p.argmax(-1) == y).double().mean())
        out["ensemble"], out["ensemble_se"] = ens, probe_standard_error(ens, n)
        best = max(names, key=lambda k: out[f"acc/{k}"])
        out["best_alone"] = out[f"acc/{best}"]
        self.measured = out
        return out

    def _measured(self) -> dict[str, float]:
        if not self.measured:
            raise RuntimeError("call AloneReferences.evaluate(dataloader) first: the references are measured on the "
                               "samples the diagnosis reads.")
        return self.measured

    def alone_probe(self) -> dict[str, tuple[float, float]]:
        """``{m: (probe, SE)}`` of the last :meth:`evaluate`: ``ModalityDiagnostics(alone_probe=...)``."""
        out = self._measured()
        return {m: (out[f"probe/{m}"], out[f"probe_se/{m}"]) for m in self.models}

    def alone_accuracy(self) -> dict[str, tuple[float, float]]:
        """``{m: (accuracy, SE)}`` of the last :meth:`evaluate`: ``ModalityDiagnostics(alone_accuracy=...)``."""
        out = self._measured()
        return {m: (out[f"acc/{m}"], out[f"acc_se/{m}"]) for m in self.models}

    def ensemble_accuracy(self) -> tuple[float, float]:
        """``(accuracy, SE)`` of the unimodal ensemble in the last :meth:`evaluate`."""
        out = self._measured()
        return out["ensemble"], out["ensemble_se"]

    def diagnostics_kwargs(self) -> dict[str, Any]:
        """The references as :class:`~lightning_balance.ModalityDiagnostics` arguments (after :meth:`evaluate`)."""
        return {"alone_probe": self.alone_probe(), "alone_accuracy": self.alone_accuracy(),
                "ensemble_accuracy": self.ensemble_accuracy()}


def _fresh_encoder(module: MultimodalMixin, modality: str) -> nn.Module:
    encoders = module.modality_encoders(modality)
    if len(encoders) != 1:
        raise ModalityContractError(
            f"fit_alone trains one encoder module per modality; {modality!r} is encoded by {len(encoders)} modules. "
            f"Train that modality alone with a model of your own and pass its probe accuracy to "
            f"ModalityDiagnostics(alone_probe=...).")
    encoder = copy.deepcopy(encoders[0])
    for sub in encoder.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return encoder.train()


def _optimizer_like(module: Any) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """A factory of the module's own optimizer: its class and the hyperparameters of its first parameter group
    (learning-rate schedulers are not copied). SGD(0.02, momentum 0.9), with a warning, when the module's
    ``configure_optimizers`` cannot run outside a Trainer."""
    import inspect
    import warnings

    try:
        conf: Any = module.configure_optimizers()
        while isinstance(conf, (list, tuple)) and conf:
            conf = conf[0]
        if isinstance(conf, Mapping):
            conf = conf["optimizer"]
        if not isinstance(conf, torch.optim.Optimizer):
            raise TypeError(f"configure_optimizers returned {type(conf).__name__}")
    except Exception as err:  # e.g. it reads self.trainer
        warnings.warn(f"fit_alone could not build {type(module).__name__}'s own optimizer ({err}); the references "
                      f"train with SGD(lr=0.02, momentum=0.9). Pass optimizer=lambda params: ... to choose.",
                      stacklevel=3)
        return _sgd(0.02, 0.9)
    cls = type(conf)
    accepted = set(inspect.signature(cls.__init__).parameters)
    options = {k: v for k, v in conf.param_groups[0].items() if k != "params" and k in accepted}

    def make(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return cls(params, **options)
    return make


def _sgd(lr: float, momentum: float) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    def make(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return make


def fit_alone(module: MultimodalMixin, datamodule: pl.LightningDataModule, *, inputs: InputsLike = None,
              target_key: Union[str, Callable[[Any], Tensor]] = "target", present_key: Optional[str] = "present",
              modalities: Optional[Sequence[str]] = None, num_classes: Optional[int] = None, max_epochs: int = 40,
              lr: Optional[float] = None, momentum: float = 0.9,
              optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
              select: str = "best", seed: Optional[int] = 0, probe_folds: int = 2,
              **trainer_kwargs: Any) -> AloneReferences:
    """Train each modality alone from the module's own encoders and the user's own data.

    For each modality ``m`` (declared order, or ``modalities``): a fresh copy of ``m``'s declared encoder (a deep
    copy, every submodule's ``reset_parameters()`` called, seeded by ``seed``), pooled as the module pools it
    (:meth:`~lightning_balance.MultimodalMixin.pool_features`: token sequences averaged) and a linear head, trained
    with the cross-entropy on the datamodule's training batches (samples that lack ``m`` or carry the module's
    ``ignore_index`` left out) for ``max_epochs``, with the module's own optimizer (the class and hyperparameters
    that its ``configure_optimizers`` builds, without its scheduler), or SGD when ``lr`` is given (``lr``,
    ``momentum``), or ``optimizer`` (a function of the parameters). With ``select="best"`` and validation data the weights of the epoch with the best validation
    accuracy are kept (selection never looks at test data); ``"last"`` keeps the last epoch.

    Args:
        module: the joint model (a :class:`~lightning_balance.MultimodalMixin`); only its declared encoders, its
            pooling and its ``ignore_index`` are used, it is not changed.
        datamodule: gives ``train_dataloader()`` (and ``val_dataloader()`` for the selection).
        inputs: where a batch keeps each encoder's input: ``None`` (``batch[m]``), ``{modality: key}`` (e.g.
            ``{"audio": "wav"}``) or a function ``(batch, modality) -> input``.
        target_key: the targets' key, or a function ``batch -> targets``.
        present_key: the presence mask's key (``None``: the batches carry none).
        modalities: train only these (default: all).
        num_classes: the number of classes (default: the width of the module's fused logits on one batch).
        max_epochs: epochs of each run.
        lr: train with SGD at this learning rate instead of the module's optimizer.
        momentum: the SGD momentum (with ``lr``).
        optimizer: ``params -> torch.optim.Optimizer``, e.g. ``lambda p: torch.optim.AdamW(p, lr=1e-3)``.
        select: ``"best"`` (the best validation epoch) or ``"last"``.
        seed: seeds each modality's initialisation and batch order (``None``: leave the global RNG as it is).
        probe_folds: the folds of :meth:`AloneReferences.evaluate`'s probe (as ``ModalityDiagnostics``'s).
        trainer_kwargs: more :class:`lightning.pytorch.Trainer` arguments (e.g. ``accelerator``).

    Returns:
        The :class:`AloneReferences`; call its :meth:`~AloneReferences.evaluate` on the loader you diagnose.

    Raises:
        ModalityContractError: a modality encoded by several modules, or a batch without the keys it needs (the
            message names the key and the fix).
    """
    from lightning_balance.progress import quiet

    if select not in ("best", "last"):
        raise ValueError(f"select must be 'best' or 'last', got {select!r}.")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive integer, got {max_epochs!r}.")
    names = list(module.modalities)
    chosen = list(modalities) if modalities is not None else names
    for m in chosen:
        module.check_modality(m)
    reader = BatchReader(tuple(names), inputs, target_key, present_key)
    if optimizer is not None and lr is not None:
        raise ValueError("pass optimizer= or lr= (SGD), not both.")
    make_optimizer = optimizer or (_sgd(lr, momentum) if lr is not None else _optimizer_like(module))
    datamodule.setup("fit")
    sample = next(iter(datamodule.train_dataloader()))
    device = next(iter(module.parameters())).device
    sample = move_data_to_device(sample, device)
    if num_classes is None:
        with torch.no_grad():
            features = {m: encoder(reader.input(sample, m)) for m in names
                        for encoder in [module.modality_encoders(m)[0]]}
            num_classes = int(module.fuse_features(features).shape[-1])
    from lightning_balance.modality import MultimodalMixin

    # the module's pooling when it overrides the contract's (a bound method would tie the references to the module)
    pool = module.pool_features if type(module).pool_features is not MultimodalMixin.pool_features else None
    models: dict[str, nn.Module] = {}
    accuracy: dict[str, float] = {}
    epochs: dict[str, int] = {}
    for m in chosen:
        if seed is not None:
            pl.seed_everything(seed, verbose=False)
        encoder = _fresh_encoder(module, m).to(device)
        with torch.no_grad():
            width = int(module.pool_features(m, encoder(reader.input(sample, m))).shape[-1])
        model = _AloneModel(encoder, width, num_classes, m, reader, pool,
                            module.modality_spec.ignore_index, make_optimizer)
        val = loader_of(datamodule, "val") if select == "best" else None
        kwargs = {"max_epochs": max_epochs, "logger": False, "enable_checkpointing": False,
                  "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                  **trainer_kwargs}
        if val is None:
            kwargs["limit_val_batches"] = 0
        keeper = KeepBest("val_acc")
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), keeper]
        with quiet():
            pl.Trainer(**kwargs).fit(model, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=val)
        keeper.restore(model)
        models[m] = model.eval()
        accuracy[m] = keeper.best if val is not None else math.nan
        epochs[m] = keeper.best_epoch if val is not None else max_epochs - 1
    return AloneReferences(models, accuracy, epochs, reader, probe_folds)
