"""imbalance_verdict against training alone (alone_accuracy, ensemble_accuracy), its degenerate cases (a model at
chance, all-zero or NaN contributions, one modality) and its last line, "Next step: ...". Every expected interval is
worked out by hand in the comments (z = 1.96); none is read back from the code under test."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_balance import ModalityDiagnostics
from lightning_balance.functional import diagnostics_table, imbalance_verdict
from tests.helpers import DictDataset, TinyAV, trainer_kwargs


def trained(**overrides):
    """A trained two-modality model: v dominates, a contributes clearly, fused 0.900 ± 0.0196 (SE 0.01), majority
    class 0.10. Probes: a 0.45 (SE 0.02), v 0.88 (SE 0.01)."""
    values = {"acc_fused": 0.90, "acc_fused_se": 0.01, "acc_majority": 0.10,
              "contribution/a": 0.20, "contribution/v": 0.60, "contribution_se/a": 0.01, "contribution_se/v": 0.01,
              "contribution_lead": 0.40, "contribution_lead_se": 0.015, "contribution_ratio": 3.0,
              "acc_without/a": 0.85, "acc_without/v": 0.30, "drop/a": 0.05, "drop/v": 0.60,
              "drop_se/a": 0.01, "drop_se/v": 0.02,
              "probe/a": 0.45, "probe_se/a": 0.02, "probe/v": 0.88, "probe_se/v": 0.01}
    values.update(overrides)
    return values


def next_step(lines):
    steps = [line for line in lines if line.startswith("Next step:")]
    assert len(steps) == 1 and lines[-1] == steps[0], lines  # one, and last
    return steps[0]


def dominance_lines(lines, names):
    return [line for line in lines if any(line.startswith(f"{m} dominates") for m in names)
            or line.startswith("No modality clearly dominates")]


# ---------------------------------------------------------------------------- untrained, degenerate contributions
def test_untrained_model_gets_no_dominance_lines_and_is_told_to_train():
    # 0.12 - 1.96 * 0.02 = 0.081 <= 0.10: not clearly above always predicting the majority class
    values = trained(acc_fused=0.12, acc_fused_se=0.02)
    lines = imbalance_verdict(values, ["a", "v"], alone_probe={"a": 0.62}, alone_accuracy={"v": 0.85},
                              ensemble_accuracy=0.95)
    assert lines[0].startswith("The fused model is not clearly above chance yet (accuracy 0.120 ± 0.039 vs 0.100")
    assert not dominance_lines(lines, ["a", "v"])
    assert not any("IGNORED" in line or "Shapley" in line or "not distinguishable" in line for line in lines)
    step = next_step(lines)
    assert step.startswith("Next step: train further") and "learning rate" in step and "above chance" in step
    # the encoders' probes are still reported: they describe the encoders, not the fusion's noise
    assert any(line.startswith("a encoder: linear probe") for line in lines)


def test_the_new_users_untrained_model_no_longer_dominates_at_zero():
    """The report a new user got: "mean dominates: 0.000 vs 0.000" (a lead of floating-point residue, no SE)."""
    values = {"acc_fused": 0.10, "acc_majority": 0.10, "contribution/mean": 0.0, "contribution/x": 1e-17,
              "contribution_lead": 1e-17, "contribution_lead_se": 0.0, "contribution_se/mean": 0.0,
              "contribution_se/x": 0.0, "acc_without/mean": 0.10, "acc_without/x": 0.10}
    lines = imbalance_verdict(values, ["mean", "x"])
    assert not any("dominates:" in line for line in lines)
    assert lines[0].startswith("The fused model is not clearly above chance yet")
    assert next_step(lines).startswith("Next step: train further")
    # without acc_majority, the same values: every contribution and its SE are 0
    del values["acc_majority"]
    lines = imbalance_verdict(values, ["mean", "x"])
    assert not dominance_lines(lines, ["mean", "x"]) and not any("IGNORED" in line for line in lines)
    assert any(line.startswith("Every Shapley contribution is 0 (mean 0.000, x 0.000)") for line in lines)
    assert next_step(lines).startswith("Next step: train further")


def test_all_zero_contributions_without_standard_errors():
    values = {"acc_fused": 0.5, "contribution/a": 0.0, "contribution/v": 0.0, "acc_without/a": 0.5,
              "acc_without/v": 0.5}
    lines = imbalance_verdict(values, ["a", "v"])
    assert any(line.startswith("Every Shapley contribution is 0") for line in lines)
    assert not dominance_lines(lines, ["a", "v"]) and not any("IGNORED" in line for line in lines)
    assert next_step(lines).startswith("Next step: train further")


@pytest.mark.parametrize("nan", [["a"], ["a", "v"]])
def test_nan_contributions_neither_crash_nor_dominate(nan):
    values = trained(contribution_lead=math.nan, contribution_ratio=math.nan,
                     **{f"contribution/{m}": math.nan for m in nan})
    lines = imbalance_verdict(values, ["a", "v"], alone_probe={"a": 0.62})
    text = "\n".join(lines)
    assert "nan dominates" not in text and not dominance_lines(lines, ["a", "v"])
    of = "contribution of a is" if nan == ["a"] else "contributions of a and v are"
    assert f"The Shapley {of} undefined (not finite)" in text
    assert not any(line.startswith(tuple(f"{m} is IGNORED" for m in nan)) for line in lines)
    # the rest of the verdict still reads: a is under-learned (0.62 - 0.45 = 0.17 ± 1.96 * 0.02 = 0.039)
    assert next_step(lines).startswith("Next step: give the a encoder its own learning signal (a probe 0.170 ± 0.039")


def test_a_single_modality():
    # contribution 0.70 ± 0.039; fused 0.80 ± 0.0196 vs alone and ensemble 0.80 ± 0.0196: gap 0 ± 1.96 * sqrt(2) *
    # 0.01 = 0.028, level; probe 0.78 vs 0.79 alone: gap 0.01 ± 0.039, no clear gap
    values = {"acc_fused": 0.80, "acc_fused_se": 0.01, "acc_majority": 0.10, "contribution/a": 0.70,
              "contribution_se/a": 0.02, "drop/a": 0.70, "drop_se/a": 0.02, "acc_without/a": 0.10,
              "probe/a": 0.78, "probe_se/a": 0.02}
    lines = imbalance_verdict(values, ["a"], alone_probe={"a": 0.79}, alone_accuracy={"a": (0.80, 0.01)},
                              ensemble_accuracy=(0.80, 0.01))
    assert not dominance_lines(lines, ["a"]) and not any("IGNORED" in line for line in lines)
    assert ("Fused model vs the best modality trained alone (a): accuracy 0.800 ± 0.020 vs 0.800 ± 0.020, gap "
            "+0.000 ± 0.028 -> level with (no clear difference: its 95% interval includes 0).") in lines
    assert next_step(lines).startswith("Next step: probably nothing to gain from balancing: no encoder is clearly "
                                       "under-learned and the fused model is level with the unimodal ensemble")
    # a single modality with every contribution 0 and no SE
    zero = {"acc_fused": 0.3, "contribution/a": 0.0, "acc_without/a": 0.3}
    lines = imbalance_verdict(zero, ["a"])
    assert any(line.startswith("Every Shapley contribution is 0 (a 0.000)") for line in lines)
    assert next_step(lines).startswith("Next step: train further")


# ---------------------------------------------------------------------------- against the best modality alone
@pytest.mark.parametrize("alone, expected", [
    # 0.90 - 0.95 = -0.05, SE sqrt(0.01² + 0.01²) = 0.01414, 1.96 SE = 0.028: [-0.078, -0.022] below 0, |gap| > 0.02
    ({"a": 0.6, "v": (0.95, 0.01)}, "accuracy 0.900 ± 0.020 vs 0.950 ± 0.020, gap -0.050 ± 0.028 -> clearly below."),
    # 0.90 - 0.89 = +0.01 ± 0.028: the interval includes 0
    ({"a": 0.6, "v": (0.89, 0.01)}, "accuracy 0.900 ± 0.020 vs 0.890 ± 0.020, gap +0.010 ± 0.028 -> level with "
                                    "(no clear difference: its 95% interval includes 0)."),
    # a bare reference is exact: 0.90 - 0.85 = +0.05 ± 1.96 * 0.01 = 0.0196: [0.030, 0.070]
    ({"a": 0.6, "v": 0.85}, "accuracy 0.900 ± 0.020 vs 0.850, gap +0.050 ± 0.020 -> clearly above."),
])
def test_fused_against_the_best_modality_alone(alone, expected):
    lines = imbalance_verdict(trained(), ["a", "v"], alone_accuracy=alone)
    assert f"Fused model vs the best modality trained alone (v): {expected}" in lines


def test_a_clear_but_negligible_gap_is_level():
    # fused SE 0.005: 0.90 - 0.882 = 0.018 ± 0.0098, [0.008, 0.028] excludes 0 but 0.018 <= tolerance 0.02
    lines = imbalance_verdict(trained(acc_fused_se=0.005), ["a", "v"], alone_accuracy={"v": 0.882})
    assert ("Fused model vs the best modality trained alone (v, of those given): accuracy 0.900 ± 0.010 vs 0.882, "
            "gap +0.018 ± 0.010 -> level with (no clear difference: within the tolerance 0.02).") in lines
    # with tolerance 0.01 the same gap counts
    lines = imbalance_verdict(trained(acc_fused_se=0.005), ["a", "v"], alone_accuracy={"v": 0.882}, tolerance=0.01)
    assert any(line.endswith("gap +0.018 ± 0.010 -> clearly above.") for line in lines)


def test_fused_clearly_below_a_modality_alone_points_to_the_ensemble_or_umt():
    from lightning_balance.losses import choose_ume_or_umt  # the helper the next step names exists

    assert callable(choose_ume_or_umt)
    # below v alone (-0.050 ± 0.028), even with an under-learned encoder: joint training loses to one modality
    lines = imbalance_verdict(trained(), ["a", "v"], alone_probe={"a": 0.62},
                              alone_accuracy={"a": 0.6, "v": (0.95, 0.01)})
    step = next_step(lines)
    assert step.startswith("Next step: joint training loses to v alone (gap -0.050 ± 0.028)")
    assert "UMTLoss" in step and "lightning_balance.losses.choose_ume_or_umt" in step and "ensemble" in step


# ---------------------------------------------------------------------------- against the unimodal ensemble
def test_fused_against_the_unimodal_ensemble():
    below = imbalance_verdict(trained(), ["a", "v"], ensemble_accuracy=(0.95, 0.01))
    assert ("Fused model vs the unimodal ensemble (product of the alone models' probabilities): accuracy "
            "0.900 ± 0.020 vs 0.950 ± 0.020, gap -0.050 ± 0.028 -> clearly below.") in below
    # no encoder under-learned (v's probe 0.88 vs 0.89 alone: 0.01 ± 1.96 * 0.01, upper end 0.0296: no clear gap;
    # a has no probe reference): UMT or unimodal losses, on weaker evidence
    step = next_step(below)
    assert step.startswith("Next step: the unimodal ensemble beats the fused model (gap -0.050 ± 0.028) though no "
                           "encoder is clearly under-learned")
    assert "UMTLoss" in step and "add_unimodal_losses" in step and "weaker evidence" in step
    level = imbalance_verdict(trained(), ["a", "v"], ensemble_accuracy=(0.89, 0.01))
    assert any(line.endswith("gap +0.010 ± 0.028 -> level with (no clear difference: its 95% interval includes 0).")
               for line in level)
    step = next_step(level)
    assert step.startswith("Next step: probably nothing to gain from balancing: no encoder is shown under-learned "
                           "(no alone_probe for a and v: pass it to check) and the fused model is level with")
    assert "synthetic setting" in step and "no method" in step
    above = imbalance_verdict(trained(), ["a", "v"], alone_probe={"a": 0.45, "v": 0.88}, ensemble_accuracy=0.85)
    assert any(line.endswith("gap +0.050 ± 0.020 -> clearly above.") for line in above)
    assert next_step(above).startswith("Next step: probably nothing to gain from balancing: no encoder is clearly "
                                       "under-learned and the fused model is clearly above the unimodal ensemble")


# ---------------------------------------------------------------------------- under-learned, ignored
def test_an_under_learned_encoder_gets_its_own_learning_signal():
    # a: 0.62 - 0.45 = 0.17 ± 1.96 * 0.02 = 0.039, clearly under-learned; the ensemble is level (+0.010 ± 0.028),
    # which would otherwise read "nothing to gain"
    lines = imbalance_verdict(trained(), ["a", "v"], alone_probe={"a": 0.62, "v": 0.89},
                              ensemble_accuracy=(0.89, 0.01))
    step = next_step(lines)
    assert step.startswith("Next step: give the a encoder its own learning signal (a probe 0.170 ± 0.039 below "
                           "trained alone)")
    assert "`return self.add_unimodal_losses(loss)`" in step and "CMLLoss" in step and "missing at test" in step
    # docs/which_method.md: baseline 0.924 -> unimodal losses through the split head 0.946, CML 0.951, LFM 0.962
    assert "On AV-Digits (5 seeds)" in step
    assert all(number in step for number in ("0.924", "0.946", "0.951", "0.962"))
    two = imbalance_verdict(trained(), ["a", "v"], alone_probe={"a": 0.62, "v": 0.95})  # v: 0.07 ± 0.020
    assert next_step(two).startswith("Next step: give each of the a and v encoders its own learning signal (a probe "
                                     "0.170 ± 0.039 below trained alone; v probe 0.070 ± 0.020 below trained alone)")


def test_an_ignored_modality_that_is_informative_alone():
    # v: contribution 0 ± 0.0098, drop 0.005 ± 0.0098: both upper ends <= 0.02, ignored; alone 0.55 ± 0.039,
    # lower end 0.511 > 0.10 for the majority class
    values = trained(**{"contribution/a": 0.80, "contribution/v": 0.0, "contribution_se/v": 0.005,
                        "contribution_lead": 0.80, "drop/v": 0.005, "drop_se/v": 0.005, "drop/a": 0.6})
    lines = imbalance_verdict(values, ["a", "v"], alone_accuracy={"a": 0.85, "v": (0.55, 0.02)},
                              ensemble_accuracy=(0.89, 0.01))
    assert any(line.startswith("v is IGNORED") for line in lines)
    step = next_step(lines)
    assert step.startswith("Next step: give the v encoder its own learning signal (v is ignored, yet alone scores "
                           "0.550 ± 0.039 vs 0.100 for the most frequent class)")
    assert "fusion capacity" in step
    # alone at 0.12 ± 0.039 (lower end 0.081 <= 0.10) v is not shown informative: nothing to gain
    lines = imbalance_verdict(values, ["a", "v"], alone_accuracy={"a": 0.85, "v": (0.12, 0.02)},
                              ensemble_accuracy=(0.89, 0.01))
    assert next_step(lines).startswith("Next step: probably nothing to gain from balancing")


# ---------------------------------------------------------------------------- without references
def test_without_references_the_verdict_says_it_cannot_tell():
    step = next_step(imbalance_verdict(trained(), ["a", "v"]))
    assert step.startswith("Next step: without trained-alone references the verdict cannot tell whether there is "
                           "anything to gain")
    assert "lightning_balance.fit_alone" in step and "alone_accuracy" in step and "ensemble_accuracy" in step
    # probes given but no under-learned encoder: still no accuracy references
    step = next_step(imbalance_verdict(trained(), ["a", "v"], alone_probe={"a": 0.46, "v": 0.88}))
    assert "cannot tell" in step and "alone_probe" not in step
    # alone accuracies without the ensemble: the ensemble is what is missing
    step = next_step(imbalance_verdict(trained(), ["a", "v"], alone_accuracy={"a": 0.6, "v": 0.85}))
    assert step.startswith("Next step: the fused model is clearly above v alone (gap +0.050 ± 0.020)")
    assert "pass ensemble_accuracy" in step


def test_table_shows_the_alone_accuracies():
    table = diagnostics_table(trained(), ["a", "v"], alone_accuracy={"a": (0.6, 0.01)})
    assert "| alone acc |" in table and "0.600 ± 0.020" in table
    assert "alone acc" not in diagnostics_table(trained(), ["a", "v"])


# ---------------------------------------------------------------------------- the callback
def test_callback_accepts_and_passes_the_references():
    diag = ModalityDiagnostics(alone_accuracy={"a": 0.6, "v": [0.95, 0.01]}, ensemble_accuracy=[0.95, 0.01],
                               plot=False)
    assert diag.alone_accuracy == {"a": 0.6, "v": (0.95, 0.01)} and diag.ensemble_accuracy == (0.95, 0.01)
    assert ModalityDiagnostics(ensemble_accuracy=0.9).ensemble_accuracy == 0.9
    report = diag.format_report(trained(samples=100, **{"seconds/total": 0.1}), ["a", "v"], 3)
    assert "Fused model vs the best modality trained alone (v): accuracy 0.900 ± 0.020 vs 0.950 ± 0.020" in report
    assert "Fused model vs the unimodal ensemble" in report and "| alone acc |" in report
    assert report.splitlines()[-1].startswith("  Next step: joint training loses to v alone")


@pytest.mark.parametrize("kwargs, match", [
    ({"alone_accuracy": {"a": 62}}, "alone_accuracy"),
    ({"alone_accuracy": {"a": [0.6, 0.01, 0.2]}}, "alone_accuracy"),
    ({"alone_accuracy": {"a": [0.6, 1.5]}}, "alone_accuracy"),
    ({"alone_accuracy": {"a": math.nan}}, "alone_accuracy"),
    ({"alone_accuracy": [0.6, 0.9]}, "alone_accuracy"),
    ({"ensemble_accuracy": 1.5}, "ensemble_accuracy"),
    ({"ensemble_accuracy": [0.9, -0.1]}, "ensemble_accuracy"),
    ({"ensemble_accuracy": [0.9, 0.01, 0.1]}, "ensemble_accuracy"),
    ({"ensemble_accuracy": "high"}, "ensemble_accuracy"),
    ({"ensemble_accuracy": True}, "ensemble_accuracy"),
    ({"ensemble_accuracy": math.inf}, "ensemble_accuracy"),
    ({"ensemble_accuracy": {"a": 0.9}}, "ensemble_accuracy"),
])
def test_callback_rejects_bad_references(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModalityDiagnostics(**kwargs)


def test_callback_report_ends_with_a_next_step_and_names_unknown_modalities(tmp_path):
    torch.manual_seed(0)
    diag = ModalityDiagnostics(alone_accuracy={"audio": 0.6, "visual": 0.7}, ensemble_accuracy=0.8, plot=False,
                               verbose=False, bootstrap=20, vif=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[diag]))
    trainer.validate(TinyAV(), DataLoader(DictDataset(n=16), batch_size=8), verbose=False)
    last = diag.report().splitlines()[-1]
    assert last.startswith("  Next step: ")
    unknown = ModalityDiagnostics(alone_accuracy={"sound": 0.6}, plot=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "unknown", callbacks=[unknown]))
    with pytest.raises(Exception, match="sound"):
        trainer.validate(TinyAV(), DataLoader(DictDataset(n=16), batch_size=8), verbose=False)


def test_lightning_cli_yaml_sets_the_references(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse", reason="jsonargparse (the `cli` extra) is not installed")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text("""
trainer:
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_balance.ModalityDiagnostics
      init_args: {alone_accuracy: {audio: [0.61, 0.02], visual: 0.89}, ensemble_accuracy: [0.938, 0.007], plot: false}
""")
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = LightningCLI(TinyAV, args=["--config", str(config)], run=False, save_config_callback=None,
                       seed_everything_default=0)
    diag = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ModalityDiagnostics))
    assert diag.alone_accuracy == {"audio": (0.61, 0.02), "visual": 0.89}
    assert diag.ensemble_accuracy == (0.938, 0.007)
