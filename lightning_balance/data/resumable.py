"""A DataLoader that Lightning resumes inside an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["ResumableDataLoader"]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that a run resumed from a checkpoint taken inside an epoch continues where it stopped.

    Lightning saves and restores a training loader's position only when the ``DataLoader`` object itself has
    ``state_dict``/``load_state_dict`` (a resumable sampler alone is not consulted); a plain loader restarts
    the epoch from its first batch, so the resumed run trains on other batches than the uninterrupted one.
    This loader reports how many batches of the current pass it has yielded and, after
    ``load_state_dict``, starts its next pass after them:

    * when its batch sampler has ``skip_batches(n)`` (:class:`BalancedBatchSampler`, whose plan is a function
      of the seed and the epoch), the skipped batches are never loaded;
    * otherwise the skipped batches are loaded and dropped, which reproduces the uninterrupted run whenever
      the order of the batches is a function of the epoch (``DistributedSampler``, a seeded generator, a
      fixed order).

    Use it exactly like a ``DataLoader``::

        loader = ResumableDataLoader(dataset, batch_sampler=BalancedBatchSampler(labels, present, 64))

    A checkpoint taken at the last batch of an epoch resumes with a fresh pass.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # torch types it as its private _BaseDataLoaderIter
        skip, self._skip = self._skip, 0
        self._yielded = skip
        drop = skip
        skipper = getattr(self.batch_sampler, "skip_batches", None)
        if skip and callable(skipper):
            skipper(skip)  # the batch sampler starts its next pass after them: nothing is loaded
            drop = 0
        for i, batch in enumerate(super().__iter__()):
            if i < drop:
                continue
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"yielded": batches of the current pass}`` (0 once a pass has ended)."""
        try:
            finished = self._yielded >= len(self)
        except TypeError:  # an iterable dataset without a length
            finished = False
        return {"yielded": 0 if finished else self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        yielded = state_dict.get("yielded", 0)
        if isinstance(yielded, bool) or not isinstance(yielded, int) or yielded < 0:
            raise ValueError(f"ResumableDataLoader.load_state_dict: 'yielded' must be an int >= 0, got {yielded!r}.")
        self._skip = yielded
