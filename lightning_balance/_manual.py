"""Machinery of the methods that own their training step (manual optimization): MLA's per-modality steps and
ReconBoost's stages. Written once: the DDP bypass, pooling, the optimizer step with its fp16 skip, the checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_balance._errors import ModalityContractError

__all__ = ["check_manual", "no_sync", "pool", "step_optimizer"]


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


def step_optimizer(trainer: Any, optimizer: Any) -> bool:
    """``optimizer.step()`` then ``zero_grad()``; returns whether the step was skipped (fp16: the GradScaler found
    an overflow and backed its scale off; identical on every rank, whose gradients are all-reduced)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    before = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    optimizer.step()
    optimizer.zero_grad()
    return before is not None and scaler.get_scale() < before


def check_manual(module: Any, fusion: nn.Module, owner: str) -> Any:
    """The module's one optimizer; clear errors unless it trains manually with ``fusion`` as its declared fusion."""
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
