"""Cross-rank machinery shared by every balancing callback: strategy checks, one reduction per step,
random streams that are identical on every rank."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from torch import Tensor

__all__ = ["UnsupportedStrategyError", "all_gather_rows", "all_reduce_sum", "check_strategy", "gather_samples",
           "shared_generator"]


class UnsupportedStrategyError(RuntimeError):
    """Raised in ``setup`` when a callback cannot run correctly under the Trainer's strategy."""


def check_strategy(strategy: Strategy, owner: str, *, allow_untested: bool = False, fsdp_ok: bool = False) -> None:
    """Allow-list of strategies for gradient-editing callbacks.

    Single device and every DDP variant (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) are
    supported. DeepSpeed is always refused: its gradients live in partitioned buffers (``param.grad`` is
    ``None``) and ``on_before_optimizer_step`` fires on every micro-batch. FSDP is refused with
    ``use_orig_params=False`` (flat parameters span modules, so no per-modality group exists), and
    otherwise accepted only by callbacks whose edits are valid on gradient shards (``fsdp_ok``).
    Anything else is refused unless ``allow_untested=True``.
    """
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        raise UnsupportedStrategyError(
            f"{owner} does not support DeepSpeed: DeepSpeed keeps gradients in partitioned buffers "
            f"(`param.grad` is None) and handles accumulation itself. Use strategy='ddp' (or 'fsdp')."
        )
    if isinstance(strategy, FSDPStrategy):
        if not strategy.kwargs.get("use_orig_params", True):
            raise UnsupportedStrategyError(
                f"{owner} needs FSDP with use_orig_params=True: with False, flat parameters span several "
                f"modules and no per-modality parameter group exists. Use FSDPStrategy(use_orig_params=True)."
            )
        if fsdp_ok:
            return
        if allow_untested:
            warnings.warn(f"{owner} runs under FSDP untested: gradient statistics are shard-local.", stacklevel=3)
            return
        raise UnsupportedStrategyError(
            f"{owner} is not verified under FSDP: its per-tensor gradient statistics would be computed on "
            f"each rank's shard only. Use strategy='ddp', or pass allow_untested_strategy=True to run anyway."
        )
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    if allow_untested:
        warnings.warn(f"{owner} has not been tested with strategy {name}; proceeding (allow_untested).", stacklevel=3)
        return
    raise UnsupportedStrategyError(
        f"{owner} does not support strategy {name}. Supported: single device and DDP variants "
        f"('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'). Pass allow_untested_strategy=True to try anyway."
    )


def all_reduce_sum(tensor: Tensor, strategy: Strategy) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, with exactly one collective (none on one device).

    Lightning's ``strategy.reduce`` adds a barrier before the all-reduce; a plain all-reduce already
    synchronises, so the barrier is skipped here.
    """
    if strategy.world_size > 1 and dist.is_available() and dist.is_initialized():  # type: ignore[attr-defined]
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    if strategy.world_size > 1:  # type: ignore[attr-defined]
        return strategy.reduce(tensor, reduce_op="sum")
    return tensor


def gather_samples(local: Tensor, strategy: Strategy, interleave: bool = False, total: int | None = None) -> Tensor:
    """Every rank's ``(n_r, d)`` rows, on every rank: one all-gather of the row counts, one of the rows.

    ``interleave=True`` puts the rows back into the order of one process reading the dataset when rank ``r``
    of ``W`` read samples ``r, r+W, r+2W, ...`` (``DistributedSampler`` without shuffle), and ``total``
    drops the samples that such a sampler repeats to give every rank the same count. Otherwise the ranks'
    rows are concatenated in rank order.
    """
    world = strategy.world_size  # type: ignore[attr-defined]
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return local if total is None else local[:total]
    parts, sizes = _gather_padded(local)
    width = max(sizes)
    if interleave:
        if len(set(sizes)) != 1 and max(sizes) - min(sizes) > 1:
            raise RuntimeError(f"Cannot interleave rank row counts {sizes}: an interleaving sampler gives every "
                               f"rank the same count up to one.")
        # row i of rank r is sample i*W + r; ranks with one row fewer leave a hole at the end
        out = rearrange(parts, "rank row ... -> (row rank) ...")
        valid = rearrange(torch.arange(width)[None, :] < torch.tensor(sizes)[:, None], "rank row -> (row rank)")
        out = out[valid.to(local.device)]
    else:
        out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return out if total is None else out[:total]


def shared_generator(seed: int, counter: int, device: torch.device) -> torch.Generator:
    """A generator whose stream is a function of ``(seed, counter)`` only.

    Seeded the same way on every rank, it yields identical noise everywhere without any collective,
    and checkpointing ``(seed, counter)`` is enough to resume the stream exactly.
    """
    generator = torch.Generator(device=device)
    # splitmix-style mixing so that nearby (seed, counter) pairs give unrelated streams
    x = (seed * 0x9E3779B97F4A7C15 + counter * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    generator.manual_seed(x & 0x7FFFFFFFFFFFFFFF)
    return generator


def broadcast_seed(strategy: Strategy) -> int:
    """Draw a seed on rank 0 from torch's global RNG and share it with every rank."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return int(strategy.broadcast(seed, src=0))


def all_gather_rows(local: Tensor) -> tuple[list[Tensor], list[int]]:
    """Every rank's ``(n_r, ...)`` rows (without gradient) and the counts ``n_r``, on every rank, for any
    per-rank counts: one all-gather of the counts, then one of the rows padded to the largest count.

    Needs an initialised process group (``torch.distributed``); with a world of one it returns ``[local]``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local.detach()], [local.shape[0]]
    parts, sizes = _gather_padded(local.detach())
    return [p[:n] for p, n in zip(parts, sizes)], sizes


def global_batch_rows(local: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order, with gradient through this rank's own rows only, **scaled by
    the world size**: a loss of the whole global batch computed identically on every rank then gives, after DDP
    averages the gradients, the gradient of one process on the global batch, with no collective inside the
    backward pass (a gather with gradient would communicate there, concurrently with DDP's own reduction). The
    value of the own rows is unchanged (``e + (W − 1)(e − e)``). One process: ``local`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts, _ = all_gather_rows(local)
    world = dist.get_world_size()
    parts[dist.get_rank()] = local + (world - 1) * (local - local.detach())
    return torch.cat(parts, dim=0)


def _gather_padded(local: Tensor) -> tuple[list[Tensor], list[int]]:
    """One all-gather of every rank's row count, then one of its rows padded to the largest count."""
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], device=local.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return parts, sizes


def mean_gradients(params: list[torch.nn.Parameter], scalars: Tensor, strategy: Any) -> Tensor:
    """Turn each parameter's gradient **sum** into the mean over the labelled samples of all ranks.

    ``scalars`` is ``(loss sum, labelled count, ...)`` of this rank (any further numbers ride along, e.g. an
    "active" flag or feature sums), returned summed over ranks; the gradients are divided by the summed count. Under DDP the gradients, a mask of the parameters that have one, and the scalars travel in one
    flattened all-reduce (one per gradient dtype if the model mixes float types): every rank then holds
    the gradient of the global batch, so the branch copies take identical steps.
    """
    n = scalars.numel()
    if strategy.world_size > 1:
        device = strategy.root_device
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64, device=device)
        extra = torch.cat([scalars.to(device=device, dtype=torch.float64), present])
        dtypes = list(dict.fromkeys(p.dtype for p in params))
        host = next((d for d in dtypes if d in (torch.float32, torch.float64)), None)
        for dtype in dtypes:
            members = [p for p in params if p.dtype == dtype]
            parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in members]
            if dtype == host:
                parts.append(extra.to(dtype))
            flat = all_reduce_sum(torch.cat(parts), strategy)
            offset = 0
            for p in members:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            if dtype == host:
                extra = flat[offset:].double()
        if host is None:
            extra = all_reduce_sum(extra, strategy)
        scalars = extra[:n]
        for p, has in zip(params, extra[n:].tolist()):
            if not has:  # no rank has a gradient for it: left out of the step, as on one process
                p.grad = None
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, max(float(scalars[1]), 1.0))
    return scalars
