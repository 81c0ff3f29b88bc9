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


# The gradient callbacks take GradientBalancingCallback's common arguments (window, epoch_length, nonfinite, ...)
# through ``**kwargs``: jsonargparse follows ``super().__init__(**kwargs)`` to the base class, so LightningCLI YAML
# sets them, types them and rejects a misspelt one. Per callback: (common argument, own argument, defaults of
# common arguments that the callback sets itself).
_GRADIENT_CALLBACKS = {
    OGMGE: ({"start_step": 5}, {"alpha": 0.3}, {"end_epoch": 50}),
    InfoReg: ({"epoch_length": 20}, {"threshold": 0.1}, {}),
    AGM: ({"nonfinite": "skip"}, {"clamp": 5.0}, {}),
    PMR: ({"end_step": 100}, {"fraction": 0.2}, {}),
    MMPareto: ({"modalities": ["audio", "visual"]}, {"gamma": 1.2}, {}),
    Greedy: ({"allow_untested_strategy": True}, {"window": 3}, {"start_epoch": 1}),
    AMCo: ({"start_epoch": 2}, {"sigma": 0.4}, {}),
    ModalityDropout: ({"end_epoch": 9}, {"p": 0.2}, {}),
    OPM: ({"log_metrics": False}, {"lam": 0.3}, {"start_epoch": 6}),
}


def _callbacks_config(tmp_path, entries):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "callbacks": [{"class_path": f"lightning_balance.{cls.__name__}", "init_args": args}
                                  for cls, args in entries]},
        "model": {"fusion": "concat"},
    }))
    return config


def test_lightning_cli_sets_common_arguments_of_gradient_callbacks(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from tests.helpers import TinyAV

    config = _callbacks_config(tmp_path, [(cls, {**common, **own}) for cls, (common, own, _) in _GRADIENT_CALLBACKS.items()])
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TinyAV, args=["--config", str(config)], run=False, save_config_callback=None,
                       seed_everything_default=0)
    for cls, (common, own, defaults) in _GRADIENT_CALLBACKS.items():
        cb = next(c for c in cli.trainer.callbacks if type(c) is cls)
        expected = {**common, **own, **defaults}
        if "modalities" in expected:
            expected["modalities"] = tuple(expected["modalities"])
        assert {k: getattr(cb, k) for k in expected} == expected, cls.__name__


@pytest.mark.parametrize("cls", list(_GRADIENT_CALLBACKS), ids=lambda c: c.__name__)
def test_lightning_cli_rejects_misspelt_common_argument(cls, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from tests.helpers import TinyAV

    config = _callbacks_config(tmp_path, [(cls, {"start_epok": 1})])
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(jsonargparse.ArgumentError, match="start_epok"):
        LightningCLI(TinyAV, args=["--config", str(config)], run=False, save_config_callback=None,
                     seed_everything_default=0, parser_kwargs={"exit_on_error": False})
    parser = jsonargparse.ArgumentParser(exit_on_error=False)  # a common argument keeps the base class's type
    parser.add_class_arguments(cls, "x")
    with pytest.raises(jsonargparse.ArgumentError, match="end_step"):
        parser.parse_object({"x": {"end_step": "soon"}})
