"""Machinery of the methods that own their training step (manual optimization): MLA's per-modality steps and
ReconBoost's stages. Written once: the DDP bypass, pooling, the optimizer step with its fp16 skip, the checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_balance._distributed import check_strategy
from lightning_balance._errors import ModalityContractError

__all__ = ["check_manual", "no_sync", "pool", "present_only", "step_optimizer", "sync_buffers"]


def present_only(z: Tensor, present: Any) -> Tensor:
    """``z`` with the rows of absent samples set to 0 (``torch.where``: whatever stood there, NaN included, reaches
    neither the loss nor its gradient); ``present`` an ``(N,)`` bool or ``None``."""
    if present is None:
        return z
    return torch.where(present.reshape(-1, *([1] * (z.ndim - 1))), z, torch.zeros((), dtype=z.dtype, device=z.device))


def pool(z: Tensor) -> Tensor:
    """``(N, D)`` as is; ``(N, ..., D)`` token features averaged over the dimensions between batch and last."""
    return z if z.ndim <= 2 else z.mean(dim=tuple(range(1, z.ndim - 1)))


@contextlib.contextmanager
def no_sync(strategy: Any) -> Iterator[None]:
    """Skip DDP's own gradient all-reduce for a backward whose gradients the method reduces itself (with its
    scalars, in one collective: ``_distributed.mean_gradients``); nothing outside DDP."""
    model = getattr(strategy, "model", None)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def explained_backward(owner: str) -> Iterator[None]:
    """Re-raise autograd's in-place error of a second backward with what it means here."""
    try:
        yield
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise ModalityContractError(
            f"{owner} steps the optimizer between backward passes of one batch, so a parameter used by several "
            f"modalities' features (a shared stem, a shared projection, a feature adapter) changes under the next "
            f"backward. Give each modality its own layers up to its features (a projection inside each encoder)."
        ) from err


def step_optimizer(trainer: Any, optimizer: Any) -> bool:
    """``optimizer.step()`` then ``zero_grad()``; returns whether the step was skipped (fp16: the GradScaler found
    an overflow and backed its scale off; identical on every rank, whose gradients are all-reduced)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    optimizer.step()
    optimizer.zero_grad()
    return before is not None and scaler is not None and scaler.get_scale() < before


def sync_buffers(strategy: Any, module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's ``broadcast_buffers`` does before each
    forward under automatic optimization (under manual optimization with several backward passes DDP skips it):
    one broadcast per buffer dtype, the buffers flattened together."""
    if strategy.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:  # through .data: the forward that just ran saved these for backward (BatchNorm)
            b.data.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def check_manual(module: Any, fusion: nn.Module, owner: str) -> Any:
    """The module's one optimizer; clear errors unless it trains manually with ``fusion`` as its declared fusion,
    under a single device or DDP (the gradients are reduced by the method)."""
    trainer = module.trainer
    if getattr(fusion, "_manual_checked", None) != id(trainer):  # once per fit
        check_strategy(trainer.strategy, owner)
        if getattr(trainer.strategy, "_ddp_kwargs", {}).get("static_graph"):
            raise ModalityContractError(f"{owner} takes several backward passes per step and reduces their gradients "
                                        f"itself: use DDP without static_graph=True.")
        if trainer.lr_scheduler_configs:
            rank_zero_warn(f"{owner}: under manual optimization Lightning does not step learning-rate schedulers; "
                           f"step them yourself, e.g. `self.lr_schedulers().step()` in on_train_epoch_end.",
                           category=UserWarning)
        fusion._manual_checked = id(trainer)  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors/modules
    if module.automatic_optimization:
        raise ModalityContractError(
            f"{owner}.training_step takes its own optimizer steps: set `self.automatic_optimization = False` in the "
            f"module's __init__ (gradient accumulation is then not available)."
        )
    spec = module.modality_spec
    if spec.fusion_path is None or module.get_submodule(spec.fusion_path) is not fusion:
        raise ModalityContractError(f"{owner}.training_step: declare this {owner} as the module's fusion, "
                                    f"configure_modalities(..., fusion=self.fusion).")
    optimizers = module.optimizers()
    if isinstance(optimizers, Sequence):
        raise ModalityContractError(f"{owner}.training_step steps one optimizer; configure_optimizers returned "
                                    f"{len(optimizers)}.")
    return optimizers
