"""The monitor's and the diagnostics' history across a resume from a checkpoint taken inside an epoch."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_balance import ModalityDiagnostics, ModalityMonitor
from tests.helpers import TinyAV, loader, resumable_loader, states_equal, trainer_kwargs


@pytest.mark.parametrize("make", [lambda: ModalityMonitor(),
                                  lambda: ModalityDiagnostics(every_n_epochs=1, probe_folds=2, plot=False, verbose=False)])
def test_history_after_a_resume_inside_an_epoch_equals_the_uninterrupted_run(tmp_path, make):
    def fit(callbacks, root, ckpt_path=None, **kw):
        trainer = pl.Trainer(**trainer_kwargs(root, callbacks=callbacks, max_epochs=3, **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(TinyAV(seed=4), resumable_loader(), loader(n=32, seed=9), ckpt_path=ckpt_path)

    straight = make()
    fit([straight], tmp_path / "a")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    fit([make(), ckpt], tmp_path / "b", enable_checkpointing=True)
    resumed = make()
    fit([resumed], tmp_path / "c", ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))  # inside epoch 1
    assert len(straight.history) == 3
    assert states_equal(_measured(resumed.state_dict()), _measured(straight.state_dict()))


def _measured(state):
    """The state without the wall-clock timings (``seconds/...``); NaN (a measurement left out) as None."""
    if isinstance(state, dict):
        return {k: _measured(v) for k, v in state.items() if not str(k).startswith("seconds/")}
    if isinstance(state, list):
        return [_measured(v) for v in state]
    if isinstance(state, float) and math.isnan(state):
        return None
    return state
