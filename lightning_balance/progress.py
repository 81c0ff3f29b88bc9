"""Quiet training output and one progress display for a job of many runs.

Lightning prints a device banner, a "💡 Tip" advertisement and a "`Trainer.fit` stopped" line for every fit, and
a model summary unless told otherwise; a study of dozens of fits buries its results under them. :func:`quiet`
silences exactly that per-fit noise for the duration of a block, and :class:`RunProgress` prints one line per
finished run (runs done of total, elapsed time, the estimated time left) and a summary at the end::

    from lightning_balance.progress import RunProgress, quiet

    jobs = [(method, seed) for method in ("baseline", "ogm_ge") for seed in (0, 1, 2)]
    with quiet(), RunProgress(total=len(jobs)) as progress:
        for method, seed in jobs:
            progress.start(f"{method} seed {seed}")
            trainer = pl.Trainer(max_epochs=40, enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(make_model(method), datamodule=data)
            progress.done(result_text=f"{trainer.callback_metrics['val_acc']:.3f}")

prints (on ``sys.stderr``) lines such as::

    [0/6] starting baseline seed 0 · elapsed 0:00 · ~? left
    [1/6] baseline seed 0 · 0.912 · elapsed 0:21 · ~1:45 left
    ...
    6/6 runs done in 2:09 (0:21 per run)
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Optional, TextIO

from lightning.fabric.utilities.warnings import PossibleUserWarning

__all__ = ["QUIET_LOGGERS", "QUIET_MESSAGES", "QUIET_WARNINGS", "RunProgress", "quiet"]

#: Loggers that carry only Lightning's per-fit chatter at INFO level; :func:`quiet` raises them to WARNING:
#: ``Seed set to N`` (``seed_everything``), the model summary table, ``LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [...]``,
#: and DDP's ``Initializing distributed: GLOBAL_RANK: ...``.
QUIET_LOGGERS: tuple[str, ...] = (
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.callbacks.model_summary",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.distributed",
)

#: The loggers of Lightning's ``rank_zero_info``. They also carry lightning_balance's own reports (e.g. the verbose
#: report of ``ModalityDiagnostics``), so :func:`quiet` does not raise their level: it drops the INFO records
#: that match :data:`QUIET_MESSAGES`.
_RANK_ZERO_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)

#: Patterns (matched at the start of the message) of the INFO lines of Lightning's ``rank_zero_info`` that
#: :func:`quiet` drops.
QUIET_MESSAGES: tuple[str, ...] = (
    r"GPU available: ",  # GPU available: False, used: False
    r"TPU available: ",  # TPU available: False, using: 0 TPU cores
    r"HPU available: ",  # older Lightning / lightning-habana
    r"IPU available: ",  # older Lightning
    r"LOCAL_RANK: \d+ - ",  # LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]
    r"(💡 )?Tip: ",  # 💡 Tip: For seamless cloud logging ... / ... cloud uploads and versioning ...
    r"`Trainer\.fit` stopped: `max_(epochs|steps)=\S+` reached\.",
    r"Using (16bit|bfloat16) Automatic Mixed Precision \(AMP\)",
    r"`Trainer\(\w+=1(\.0)?\)` was configured so ",  # `Trainer(limit_val_batches=1)` was configured so 1 batch ...
    r"-*\s*distributed_backend=\w+\nAll distributed processes registered",  # DDP's start-up box
)

#: ``(message pattern, category)`` of the warnings that :func:`quiet` ignores: those of tiny CPU runs, which say
#: nothing about the model.
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"The '\w+' does not have many workers", PossibleUserWarning),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning),
    (r"GPU available but not used", PossibleUserWarning),
    (r"TPU available but not used", UserWarning),
    # recent torch deprecates LeafSpec (a FutureWarning), which Lightning's pytree helper still builds at every fit
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)


class _DropMessages(logging.Filter):
    """Drops the INFO (and lower) records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return self._pattern.match(message.lstrip()) is None


@contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's per-fit noise inside the block; everything is restored when it ends.

    Silenced: the device banners (``GPU available: ...``, ``TPU available: ...``, ``HPU available: ...``,
    ``LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: ...``), the ``💡 Tip: ...`` lines, the line that a fit stopped at
    ``max_epochs`` (or ``max_steps``), the model summary, ``seed_everything``'s ``Seed set to N``, the AMP banner,
    DDP's start-up lines (in this process), and the warnings of tiny CPU runs in :data:`QUIET_WARNINGS` (``does not have many
    workers``, ``The number of training batches (N) is smaller than the logging interval``, ``GPU available but
    not used``, torch's ``LeafSpec`` deprecation). Nothing else: every other warning (lightning_balance's own,
    non-finite values, Lightning's other possible-user warnings) and every log record at WARNING or above still
    shows, and so do lightning_balance's INFO reports (``ModalityDiagnostics(verbose=True)``, InfoReg's roles).

    How: the loggers in :data:`QUIET_LOGGERS` are raised to WARNING (a logger already set higher is left alone);
    the loggers of Lightning's ``rank_zero_info`` get a filter that drops the INFO lines of
    :data:`QUIET_MESSAGES`; the warnings filters of :data:`QUIET_WARNINGS` are added inside
    :class:`warnings.catch_warnings`. On exit the loggers' levels and filters and the warnings filters are
    restored (filters added inside the block are undone with them). Blocks nest.

    Build the ``Trainer`` inside the block too: the banners and tips are printed by its constructor.
    Lightning's progress bar is not touched (``enable_progress_bar`` is the caller's choice). Usable as a
    decorator: ``@quiet()``.

    Example::

        with quiet():
            trainer = pl.Trainer(max_epochs=3, enable_progress_bar=False)
            trainer.fit(model, datamodule=data)
    """
    levels: list[tuple[logging.Logger, int]] = []
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        levels.append((logger, logger.level))
        target = max(logging.WARNING, logger.getEffectiveLevel())  # never lower a level set above WARNING
        if logger.level < target:
            logger.setLevel(target)
    drop = _DropMessages(QUIET_MESSAGES)  # one instance per block: nested blocks remove only their own
    filtered = _rank_zero_loggers()
    for logger in filtered:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message, category in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger in filtered:
            logger.removeFilter(drop)
        for logger, level in levels:
            logger.setLevel(level)


def _rank_zero_loggers() -> list[logging.Logger]:
    """The loggers ``rank_zero_info`` may write to: Lightning's two, and the one it uses now."""
    loggers = {id(lg): lg for lg in (logging.getLogger(name) for name in _RANK_ZERO_LOGGERS)}
    try:
        from lightning_utilities.core import rank_zero

        current = getattr(rank_zero, "log", None)
        if isinstance(current, logging.Logger):
            loggers.setdefault(id(current), current)
    except ImportError:  # pragma: no cover - lightning depends on lightning_utilities
        pass
    return list(loggers.values())


def _clock_text(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` from an hour on (seconds rounded down)."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgress:
    """One progress display for a job of ``total`` runs (fits): a plain line per finished run, a summary at the end.

    The API: ``start(label)`` when a run begins, ``done(result_text=...)`` when it ends; the object is a context
    manager whose exit prints the summary (or call :meth:`finish`). Lines are plain text, flushed, one per event:
    they work in logs and when ``stream`` is not a terminal, and they are printed only between runs, so
    Lightning's own per-fit progress bar (``enable_progress_bar=True``) can stay on inside a fit::

        [0/12] starting baseline seed 0 · elapsed 0:00 · ~? left
        [3/12] ogm_ge seed 1 · 0.912 · elapsed 1:05 · ~2:10 left
        12/12 runs done in 4:20 (0:21 per run)

    The first :meth:`start` prints the ``starting`` line (the job's size at once). Each :meth:`done` counts a run
    and prints ``[done/total] label · result · elapsed · ~left``: elapsed is the wall time since the
    ``RunProgress`` was made; left is the mean duration of the finished runs times the runs still to do (``~?``
    before a run has finished, as on the ``starting`` line). A run's duration is from its :meth:`start` to its
    :meth:`done` (so time spent between runs, on evaluation or data, is not a run's); a :meth:`done` without a
    :meth:`start` counts from the previous :meth:`done` (or from the making of the ``RunProgress``).

    Args:
        total: The number of runs of the job (at least 0). More :meth:`done` calls than ``total`` are counted;
            the estimate is then ``~0:00``.
        stream: Where the lines go; ``None``: ``sys.stderr`` at the time of each line.
        every_s: The least number of seconds between two printed run lines (0: every run). A run line that comes
            sooner is skipped; the last run's line and the summary always print. For jobs of many short runs.
        clock: The time in seconds (``time.monotonic`` by default; inject a fake clock in tests).
        enabled: ``False`` prints nothing (``--no-progress``); the counts are still kept.

    Attributes:
        completed: The runs done so far.
        durations: The duration in seconds of each finished run.
    """

    def __init__(self, total: int, stream: Optional[TextIO] = None, every_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, enabled: bool = True) -> None:
        if total < 0:
            raise ValueError(f"RunProgress: total must be >= 0, got {total}.")
        if every_s < 0 or math.isnan(every_s):
            raise ValueError(f"RunProgress: every_s must be >= 0, got {every_s}.")
        self.total = int(total)
        self.stream = stream
        self.every_s = float(every_s)
        self.enabled = enabled
        self._clock = clock
        self._t0 = clock()
        self._mark = self._t0  # when the running run began (its start(), else the previous done())
        self._label: Optional[str] = None
        self._started = False
        self._last_line: Optional[float] = None
        self._finished = False
        self.completed = 0
        self.durations: list[float] = []

    # ------------------------------------------------------------------------------------------- the counts
    @property
    def remaining(self) -> int:
        """The runs still to do (never below 0)."""
        return max(0, self.total - self.completed)

    def elapsed(self) -> float:
        """Seconds since the ``RunProgress`` was made."""
        return self._clock() - self._t0

    def eta(self) -> Optional[float]:
        """Seconds left: the mean duration of the finished runs times :attr:`remaining`; ``None`` before a run ends."""
        if not self.durations:
            return None
        return sum(self.durations) / len(self.durations) * self.remaining

    # ------------------------------------------------------------------------------------------- the events
    def start(self, label: str) -> None:
        """A run begins: its duration counts from now; ``label`` names it in its :meth:`done` line."""
        self._label = label
        self._mark = self._clock()
        if not self._started:
            self._started = True
            eta = self.eta()
            self._print(f"[{self.completed}/{self.total}] starting {label} · elapsed "
                        f"{_clock_text(self._mark - self._t0)} · ~{'?' if eta is None else _clock_text(eta)} left")

    def done(self, label: Optional[str] = None, result_text: Optional[str] = None) -> str:
        """A run ended: count it and print its line (``label``: the run's name, by default that of :meth:`start`;
        ``result_text``: e.g. its score). Returns the line (also when it is not printed)."""
        now = self._clock()
        self.durations.append(now - self._mark)
        self.completed += 1
        self._mark = now
        name = label if label is not None else (self._label or f"run {self.completed}")
        self._label = None
        eta = self.eta()
        parts = [f"[{self.completed}/{self.total}] {name}"]
        if result_text:
            parts.append(result_text)
        parts += [f"elapsed {_clock_text(now - self._t0)}", f"~{'?' if eta is None else _clock_text(eta)} left"]
        line = " · ".join(parts)
        last = self.completed >= self.total
        if last or self._last_line is None or now - self._last_line >= self.every_s:
            self._last_line = now
            self._print(line)
        return line

    def finish(self) -> str:
        """Print the summary line once (later calls print nothing) and return it:
        ``12/12 runs done in 4:20 (0:21 per run)``; nothing is printed if no run was started or done (a job that
        stopped before its first run, e.g. on a bad argument)."""
        wall = self.elapsed()
        per_run = f" ({_clock_text(wall / self.completed)} per run)" if self.completed else ""
        line = f"{self.completed}/{self.total} runs done in {_clock_text(wall)}{per_run}"
        if self.completed < self.total:
            line += f", {self.remaining} not run"
        if not self._finished and (self._started or self.completed):
            self._finished = True
            self._print(line)
        return line

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.finish()

    def _print(self, line: str) -> None:
        if not self.enabled:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()
