"""Balanced batching: every batch holds the classes and the modality-presence patterns in equal shares."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["BalancedBatchSampler"]


class _EpochSetter:
    """What Lightning finds at ``batch_sampler.sampler``: it calls ``set_epoch`` there before every epoch
    (never on the batch sampler itself), and this forwards it."""

    def __init__(self, owner: "BalancedBatchSampler") -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self._owner.num_samples


class BalancedBatchSampler(Sampler[list[int]]):
    """A batch sampler that gives each stratum (class × presence pattern) an equal share of every batch.

    The seed survey names "balanced batching that ensures equal representation of modalities in each
    update": with absent modalities, a batch drawn at random may hold few samples that have the rare
    modality (or few of a class), and every statistic a method computes from it is then noisy. Here the
    samples are grouped into strata by ``by``: the class, the presence pattern (which modalities a sample
    has), or both; each batch takes its slots from the strata in turn (a shuffled order of the strata,
    round-robin), so every stratum has ``batch_size / S`` slots (±1). Each stratum is a shuffled stream
    that cycles: small strata are repeated within an epoch, large ones are partly left for the next.

    **Deterministic and DDP-ready.** The plan of an epoch is a function of ``(seed, epoch)`` only (Lightning
    calls :meth:`set_epoch` before each epoch; outside Lightning call it yourself, as for
    ``DistributedSampler``: iterating twice without it gives the same plan). Under DDP every rank computes
    the same plan and takes its
    own batches: rank ``r`` of ``W`` gets the ``r``-th batch of each group of ``W`` consecutive batches,
    drawn from the strata's streams one after another, so the ranks' batches are disjoint until a stratum
    cycles, and each is balanced by itself. Use it in place of the distributed sampler:
    ``Trainer(use_distributed_sampler=False)`` and ``DataLoader(dataset, batch_sampler=sampler)``.

    An epoch has ``len(labels) // (batch_size · W)`` batches per rank (each sample about once per epoch
    on average). A stratum smaller than its share of a batch appears several times in it (a stratum of one
    sample fills all its slots). Resuming inside an epoch: Lightning restores only a DataLoader that has
    ``state_dict``/``load_state_dict`` (not its batch sampler): use
    :class:`~lightning_balance.data.ResumableDataLoader` (it calls :meth:`skip_batches`, so the batches
    already trained on are not loaded again), or the resumed epoch replays its first batches.

    Args:
        labels: ``(N,)`` class of each sample.
        present: ``(N, M)`` bool presence of each modality (``None``: complete data, one pattern).
        batch_size: samples per batch on each rank.
        by: ``"class"``, ``"presence"`` or ``"both"`` (the cross product of the two).
        seed: of the plan.
        num_replicas, rank: the DDP world; ``None`` reads ``torch.distributed`` when iterated (1, 0 outside it).
    """

    def __init__(self, labels: Sequence[int] | torch.Tensor | np.ndarray, present: Optional[torch.Tensor | np.ndarray] = None,
                 batch_size: int = 64, by: str = "both", seed: int = 0, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None) -> None:
        raw = torch.as_tensor(np.asarray(labels))
        if raw.is_floating_point() or raw.dtype == torch.bool:
            raise ValueError(f"labels must be integer classes, got {raw.dtype}.")
        labels = raw.long().reshape(-1)
        if labels.numel() == 0:
            raise ValueError("BalancedBatchSampler needs at least one sample.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if by not in ("class", "presence", "both"):
            raise ValueError(f"by must be 'class', 'presence' or 'both', got {by!r}.")
        if present is not None:
            raw_present = torch.as_tensor(np.asarray(present))
            if raw_present.is_floating_point() or raw_present.is_complex():
                raise ValueError(f"present must be an (N, M) bool array (True: the sample has the modality), got "
                                 f"{raw_present.dtype}: a presence mask is not a weight.")
            if raw_present.dtype != torch.bool and not bool(((raw_present == 0) | (raw_present == 1)).all()):
                raise ValueError("present must be an (N, M) bool array; an integer one may hold only 0 and 1.")
            present = raw_present.bool()
            if present.ndim != 2 or present.shape[0] != labels.numel():
                raise ValueError(f"present must be an (N, M) bool array with N = {labels.numel()}, got "
                                 f"{tuple(present.shape)}.")
            empty = torch.nonzero(~present.any(1)).reshape(-1)
            if empty.numel():
                raise ValueError(f"{empty.numel()} sample(s) have no modality at all (rows {empty[:8].tolist()}): a "
                                 f"sample needs one modality to be predicted; drop them from the dataset.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
        keys = []
        if by in ("class", "both"):
            keys.append(labels)
        if by in ("presence", "both") and present is not None:
            weights = 2 ** torch.arange(present.shape[1])
            keys.append((present.long() * weights).sum(1))
        if not keys:
            keys.append(torch.zeros_like(labels))
        combined = keys[0] if len(keys) == 1 else keys[0] * (int(keys[1].max()) + 1) + keys[1]
        values = torch.unique(combined)
        self.strata = [torch.nonzero(combined == v).reshape(-1) for v in values]
        self.num_samples = labels.numel()
        self.batch_size = batch_size
        self.by = by
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._start = 0
        self.sampler = _EpochSetter(self)  # Lightning sets the epoch through batch_sampler.sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _world(self) -> tuple[int, int]:
        world, rank = self.num_replicas, self.rank
        if world is None or rank is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            world = world if world is not None else (torch.distributed.get_world_size() if initialised else 1)
            rank = rank if rank is not None else (torch.distributed.get_rank() if initialised else 0)
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {world}.")
        return world, rank

    def __len__(self) -> int:
        world, _ = self._world()
        return max(1, self.num_samples // (self.batch_size * world))

    def plan(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order (batch ``k`` of rank ``r`` is ``plan[k * W + r]``)."""
        world, _ = self._world()
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0] >> 1))
        streams = [s[torch.randperm(len(s), generator=g)] for s in self.strata]
        cursor = [0] * len(streams)
        batches = []
        for _ in range(len(self) * world):
            order = torch.randperm(len(streams), generator=g).tolist()
            batch = []
            for slot in range(self.batch_size):
                k = order[slot % len(order)]
                stream = streams[k]
                if cursor[k] == len(stream):  # the stratum cycles: a fresh shuffle of it
                    streams[k] = stream = stream[torch.randperm(len(stream), generator=g)]
                    cursor[k] = 0
                batch.append(int(stream[cursor[k]]))
                cursor[k] += 1
            batches.append(batch)
        return batches

    def skip_batches(self, n: int) -> None:
        """Start the next pass after its first ``n`` batches (this rank's), once; then whole epochs again."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"skip_batches takes an int >= 0, got {n!r}.")
        self._start = n

    def __iter__(self) -> Iterator[list[int]]:
        # the epoch changes only through set_epoch (as DistributedSampler's): a callback's own pass over the
        # training loader (PMR's prototypes) then sees the plan the training epoch trains on. Not a generator:
        # the skip is taken when the pass begins, not at its first batch
        world, rank = self._world()
        start, self._start = self._start, 0
        return iter(self.plan()[rank::world][start:])
