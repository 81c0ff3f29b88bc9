"""Every public callback and datamodule can be configured from LightningCLI YAML."""

import pytest

from lightning_balance import (
    AGM,
    OGMGE,
    OPM,
    PMR,
    AMCo,
    MMTM,
    GradientBlending,
    Greedy,
    InfoReg,
    LFMLoss,
    MBSDLoss,
    MLAFusion,
    ReconBoostFusion,
    MMPareto,
    ModalityDiagnostics,
    ModalityDropout,
    ModalityMonitor,
    Relearning,
    SampleValuation,
)
from lightning_balance.data import AVDigitsDataModule, SyntheticCollapseDataModule

jsonargparse = pytest.importorskip("jsonargparse", reason="jsonargparse (the `cli` extra) is not installed")


def test_lightning_cli_yaml_configures_callbacks_and_data(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from tests.helpers import TinyAV

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_balance.OGMGE
      init_args: {alpha: 0.8, params: weights, modalities: [audio, visual], end_epoch: null, seed: 3}
    - class_path: lightning_balance.ModalityMonitor
      init_args: {missing: false}
    - class_path: lightning_balance.InfoReg
      init_args: {strength: {audio: 0.95, visual: 0.1}, window_from: audio, score: mean}
    - class_path: lightning_balance.AGM
      init_args: {alpha: 0.5, clip: null, accumulation: per_micro_batch}
    - class_path: lightning_balance.PMR
      init_args: {alpha: 2.0, momentum: 0.0, rule: continuous, prototypes: steps}
    - class_path: lightning_balance.ModalityDiagnostics
      init_args: {every_n_epochs: 5, alone_probe: {audio: 0.62, visual: 0.9}, max_samples: 512, plot: false}
    - class_path: lightning_balance.ModalityDropout
      init_args: {p: {audio: 0.4, visual: 0.1}, schedule: cosine, warmup_steps: 100, seed: 2}
    - class_path: lightning_balance.OPM
      init_args: {q_base: 0.85, p_exe: 0.5, start_epoch: 0, seed: 4}
    - class_path: lightning_balance.Relearning
      init_args: {strength: 2.0, every_n_epochs: 10, max_reinits: 2, max_samples: 1000}
    - class_path: lightning_balance.SampleValuation
      init_args: {level: modality, start_epoch: 3, alpha: 0.5, func: tanh}
    - class_path: lightning_balance.Greedy
      init_args: {epsilon: 0.05, window: 3, start_epoch: 1, mode: random, seed: 7}
model:
  fusion: concat
  lr: 0.05
"""
    )
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TinyAV, args=["--config", str(config)], run=False, save_config_callback=None,
                       seed_everything_default=0)
    ogm = next(cb for cb in cli.trainer.callbacks if isinstance(cb, OGMGE))
    assert (ogm.alpha, ogm.params, ogm.modalities, ogm.end_epoch, ogm.seed) == (0.8, "weights", ("audio", "visual"), None, 3)
    monitor = next(cb for cb in cli.trainer.callbacks if type(cb) is ModalityMonitor)
    assert monitor.missing is False
    assert cli.model.lr == 0.05
    inforeg = next(cb for cb in cli.trainer.callbacks if isinstance(cb, InfoReg))
    assert (inforeg.strength, inforeg.window_from, inforeg.score) == ({"audio": 0.95, "visual": 0.1}, "audio", "mean")
    agm = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AGM))
    assert (agm.alpha, agm.clip, agm.accumulation) == (0.5, None, "per_micro_batch")
    pmr = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PMR))
    assert (pmr.alpha, pmr.momentum, pmr.rule, pmr.prototypes) == (2.0, 0.0, "continuous", "steps")
    diag = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ModalityDiagnostics))
    assert (diag.every_n_epochs, diag.alone_probe, diag.max_samples, diag.plot) == (5, {"audio": 0.62, "visual": 0.9}, 512, False)
    drop = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ModalityDropout))
    assert (drop.p, drop.schedule, drop.warmup_steps, drop.seed) == ({"audio": 0.4, "visual": 0.1}, "cosine", 100, 2)
    opm = next(cb for cb in cli.trainer.callbacks if isinstance(cb, OPM))
    assert (opm.q_base, opm.p_exe, opm.start_epoch, opm.seed) == (0.85, 0.5, 0, 4)
    relearn = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Relearning))
    assert (relearn.strength, relearn.every_n_epochs, relearn.max_reinits, relearn.max_samples) == (2.0, 10, 2, 1000)
    value = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SampleValuation))
    assert (value.level, value.start_epoch, value.alpha, value.func) == ("modality", 3, 0.5, "tanh")
    greedy = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Greedy))
    assert (greedy.epsilon, greedy.window, greedy.start_epoch, greedy.mode, greedy.seed) == (0.05, 3, 1, "random", 7)


@pytest.mark.parametrize("cls", [AVDigitsDataModule, SyntheticCollapseDataModule, OGMGE, ModalityMonitor, InfoReg, AGM, PMR,
                                 MMPareto, GradientBlending, ModalityDiagnostics, ModalityDropout, OPM,
                                 AMCo, LFMLoss, MBSDLoss, Relearning, SampleValuation, MLAFusion,
                                 ReconBoostFusion, Greedy, MMTM])
def test_constructor_signatures_resolve(cls):
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(cls, "x")
    defaults = parser.get_defaults()
    assert "x" in defaults
    if cls is LFMLoss:  # a loss term: LightningCLI passes it to the model as a class_path entry
        parsed = parser.parse_object({"x": {"schedule": "learnable", "horizon": 40, "lr_alpha": 1e-3}})
        assert (parsed.x.schedule, parsed.x.horizon, parsed.x.lr_alpha) == ("learnable", 40, 1e-3)
