"""quiet() silences Lightning's per-fit noise (and only that) and restores everything; RunProgress counts runs and
estimates the time left from the finished runs' mean duration."""

from __future__ import annotations

import io
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, TensorDataset

from lightning_balance.progress import QUIET_LOGGERS, RunProgress, _clock_text, _rank_zero_loggers, quiet

NOISE = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK", "💡", "Tip:", "`Trainer.fit` stopped",
         "max_epochs=", "Seed set to", "Trainable params", "Total params", "does not have many workers",
         "smaller than the logging interval")


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(logging.Handler):
    """Every record that reaches the loggers quiet() works on (after their levels and filters)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def recorder():
    handler = Recorder()
    loggers = {id(lg): lg for lg in [*_rank_zero_loggers(), *(logging.getLogger(n) for n in QUIET_LOGGERS),
                                     logging.getLogger("lightning.pytorch.loops.fit_loop")]}
    for logger in loggers.values():
        logger.addHandler(handler)
    yield handler
    for logger in loggers.values():
        logger.removeHandler(handler)


def _tiny_fit(root, monkeypatch) -> None:
    # force the "does not have many workers" check to fire on any machine (it needs more CPUs than 2)
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.data_connector.suggested_max_num_workers", lambda n: 4)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    pl.seed_everything(0)  # "Seed set to 0"
    # a logger and 4 batches against log_every_n_steps=50: "smaller than the logging interval"; the default
    # checkpoint: the litmodels tip; the default summary: the model summary
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=CSVLogger(str(root)),
                         default_root_dir=str(root), enable_progress_bar=False, log_every_n_steps=50)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))


def _noise_in(texts) -> list[str]:
    return [t for t in texts if any(n in t for n in NOISE)]


def test_a_fit_prints_the_noise_without_quiet(tmp_path, monkeypatch, recorder, capsys):
    """The control: the capture below sees the banner, the tips, the summary and the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tiny_fit(tmp_path, monkeypatch)
    capsys.readouterr()
    seen = "\n".join(recorder.messages)
    for line in ("GPU available", "TPU available", "💡 Tip", "`Trainer.fit` stopped: `max_epochs=1` reached.",
                 "Seed set to 0", "Total params"):
        assert line in seen, line
    texts = [str(w.message) for w in caught]
    assert any("does not have many workers" in t for t in texts)
    assert any("smaller than the logging interval" in t for t in texts)


def test_quiet_silences_a_fit_and_restores_everything(tmp_path, monkeypatch, recorder, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    watched = [*_rank_zero_loggers(), *(logging.getLogger(n) for n in QUIET_LOGGERS)]
    levels = [lg.level for lg in watched]
    filters = [list(lg.filters) for lg in watched]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with quiet():
            assert logging.getLogger("lightning.fabric.utilities.seed").getEffectiveLevel() >= logging.WARNING
            _tiny_fit(tmp_path, monkeypatch)
            rank_zero_info("lightning_balance report: kept")  # the library's own INFO lines go through this logger
            rank_zero_warn("ModalityMonitor: non-finite values (NaN/inf) in val epoch 0")  # a real problem
            warnings.warn("another PossibleUserWarning", PossibleUserWarning, stacklevel=1)  # only the listed ones go
        after = list(warnings.filters)
    out, err = capsys.readouterr()
    printed = [*recorder.messages, *(r.getMessage() for r in caplog.records), *out.splitlines(), *err.splitlines()]
    assert _noise_in(printed) == []
    assert "lightning_balance report: kept" in recorder.messages
    texts = [str(w.message) for w in caught]
    assert _noise_in(texts) == []
    assert "ModalityMonitor: non-finite values (NaN/inf) in val epoch 0" in texts
    assert "another PossibleUserWarning" in texts
    # restored: the levels, the loggers' filters, the warnings filters
    assert [lg.level for lg in watched] == levels
    assert [list(lg.filters) for lg in watched] == filters
    assert after == before
    recorder.messages.clear()
    pl.seed_everything(1)
    assert "Seed set to 1" in recorder.messages


def test_quiet_keeps_a_higher_level_nests_and_decorates():
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    old = seed_logger.level
    seed_logger.setLevel(logging.ERROR)
    try:
        with quiet():
            assert seed_logger.level == logging.ERROR  # never lowered
            with quiet():
                assert summary.getEffectiveLevel() == logging.WARNING
            assert summary.getEffectiveLevel() == logging.WARNING  # the outer block still holds
            assert all(len(lg.filters) >= 1 for lg in _rank_zero_loggers())
        assert seed_logger.level == logging.ERROR
        assert summary.getEffectiveLevel() < logging.WARNING
    finally:
        seed_logger.setLevel(old)

    @quiet()
    def seeded() -> int:
        assert summary.getEffectiveLevel() == logging.WARNING
        return 3

    assert seeded() == 3 and seeded() == 3  # a fresh block per call
    assert summary.getEffectiveLevel() < logging.WARNING


def test_quiet_restores_after_an_exception():
    summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    level, filters = summary.level, list(warnings.filters)
    with pytest.raises(RuntimeError):
        with quiet():
            raise RuntimeError("boom")
    assert summary.level == level and list(warnings.filters) == filters
    assert all(not any(type(f).__name__ == "_DropMessages" for f in lg.filters) for lg in _rank_zero_loggers())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_run_progress_counts_and_estimates_from_the_mean_duration():
    clock, stream = Clock(), io.StringIO()
    with RunProgress(4, stream=stream, clock=clock) as progress:
        assert progress.eta() is None and progress.remaining == 4
        progress.start("baseline seed 0")  # at 0
        clock.now = 10.0
        assert progress.done(result_text="0.912") == "[1/4] baseline seed 0 · 0.912 · elapsed 0:10 · ~0:30 left"
        assert progress.eta() == 30.0 and progress.remaining == 3  # 10 s per run × 3 left
        clock.now = 12.0  # 2 s between the runs (evaluation): not a run's time
        progress.start("ogm_ge seed 0")
        clock.now = 32.0
        progress.done()  # (10 + 20) / 2 × 2 = 30
        clock.now = 50.0
        progress.done("no start")  # counts from the previous done: 18 s; (10 + 20 + 18) / 3 × 1 = 16
        assert progress.durations == [10.0, 20.0, 18.0]
        clock.now = 60.0
        progress.start("ogm_ge seed 1")
        clock.now = 125.0
        progress.done("renamed", "val acc 0.5")
        assert progress.completed == 4 and progress.remaining == 0 and progress.eta() == 0.0
        clock.now = 130.0
    assert stream.getvalue().splitlines() == [
        "[0/4] starting baseline seed 0 · elapsed 0:00 · ~? left",
        "[1/4] baseline seed 0 · 0.912 · elapsed 0:10 · ~0:30 left",
        "[2/4] ogm_ge seed 0 · elapsed 0:32 · ~0:30 left",
        "[3/4] no start · elapsed 0:50 · ~0:16 left",
        "[4/4] renamed · val acc 0.5 · elapsed 2:05 · ~0:00 left",
        "4/4 runs done in 2:10 (0:32 per run)",
    ]
    assert progress.finish() == "4/4 runs done in 2:10 (0:32 per run)"  # once: nothing printed again
    assert stream.getvalue().count("runs done") == 1


def test_run_progress_throttles_stops_early_and_can_be_silent(capsys):
    clock, stream = Clock(), io.StringIO()
    progress = RunProgress(5, stream=stream, every_s=30.0, clock=clock)
    for t in (10.0, 20.0, 45.0, 50.0):  # printed: 10 (first), 45 (35 s later); skipped: 20, 50
        progress.start(f"run at {t:g}")
        clock.now = t
        progress.done()
    clock.now = 61.0
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines == ["[0/5] starting run at 10 · elapsed 0:00 · ~? left",
                     "[1/5] run at 10 · elapsed 0:10 · ~0:40 left",
                     "[3/5] run at 45 · elapsed 0:45 · ~0:30 left",  # 45 s / 3 runs × 2 left
                     "4/5 runs done in 1:01 (0:15 per run), 1 not run"]

    silent = RunProgress(2, enabled=False, clock=clock)
    silent.start("a")
    silent.done(result_text="x")
    silent.finish()
    assert silent.completed == 1 and capsys.readouterr().err == ""

    default = RunProgress(1, clock=clock)  # sys.stderr at the time of the line (works when it is not a TTY)
    default.done("only")
    assert capsys.readouterr().err == "[1/1] only · elapsed 0:00 · ~0:00 left\n"
    unused = RunProgress(3, stream=stream, clock=clock)  # stopped before its first run: no summary
    assert unused.finish() == "0/3 runs done in 0:00, 3 not run" and stream.getvalue().splitlines() == lines
    with pytest.raises(ValueError):
        RunProgress(-1)


def test_clock_text():
    assert [_clock_text(s) for s in (0, 5.9, 65, 600, 3599, 3725, -3)] == [
        "0:00", "0:05", "1:05", "10:00", "59:59", "1:02:05", "0:00"]
