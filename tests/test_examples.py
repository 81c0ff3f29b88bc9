"""The benchmark runner and the diagnosis script run end to end (one short epoch) and write what the docs
say they write."""

import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_balance.data import SyntheticCollapseDataModule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    for name in ("benchmark", "diagnose", "robustness", "rank_vs_beta", "collapse_study", "overhead", "_common"):
        sys.modules.pop(name, None)


@pytest.mark.timeout(300)
def test_benchmark_runner_writes_tables_json_and_plots(tmp_path, examples_path):
    import benchmark

    out = benchmark.main(["--methods", "ogm_ge+cml", "baseline", "--datasets", "synthetic", "--epochs", "1",
                          "--seeds", "0", "1", "--no-progress", "--out", str(tmp_path)])
    rows = out["synthetic"]
    assert {"m0 alone", "m1 alone", "unimodal ensemble (product)", "baseline", "ogm_ge+cml"} <= set(rows)
    assert [r["seed"] for r in rows["ogm_ge+cml"]] == [0, 1]
    assert all(r["step_ratio"] == 1.0 for r in rows["baseline"]) and rows["ogm_ge+cml"][0]["step_ratio"] > 0
    table = (tmp_path / "benchmark_synthetic.md").read_text()
    assert "| ogm_ge+cml |" in table and "m1 probe" in table and "acc, m1 missing" in table and "step time" in table
    saved = json.loads((tmp_path / "benchmark_synthetic.json").read_text())
    assert saved["methods"] == ["baseline", "ogm_ge+cml"]  # the baseline runs first: the cost denominator
    assert saved["command"].startswith("python examples/benchmark.py --methods ogm_ge+cml")
    for png in ("benchmark_synthetic.png", "benchmark_synthetic_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_benchmark_rejects_unknown_methods(examples_path, capsys):
    import benchmark

    with pytest.raises(SystemExit):
        benchmark.main(["--methods", "ogm_ge+nope"])
    assert "unknown method part(s) ['nope']" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_diagnose_prints_a_verdict(tmp_path, examples_path, capsys):
    import diagnose

    diagnose.main(["--dataset", "synthetic", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "dominates: Shapley contribution" in printed and "trained alone ->" in printed
    rows = json.loads((tmp_path / "diagnose_synthetic_baseline.json").read_text())["rows"]
    assert rows[0]["monitor"] and "contribution/m0" in rows[0]["monitor"][-1]
    assert (tmp_path / "diagnostics_synthetic_baseline.png").exists()


@pytest.mark.timeout(300)
def test_robustness_runner_trains_with_a_missing_rate_and_sweeps(tmp_path, examples_path, monkeypatch):
    import robustness

    fits = []
    fit = robustness.fit
    monkeypatch.setattr(robustness, "fit", lambda model, *a, **k: fits.append(type(model).__name__) or fit(model, *a, **k))
    selection = tmp_path / "select_collapse_synthetic.json"  # EBR's lambda as collapse_study --stage select writes it
    selection.write_text(json.dumps({"synthetic": {"chosen": {"kd_crd": 0.8, "kd_infonce": 5.0, "ebr": 0.7}}}))
    saved = robustness.main(["--methods", "baseline", "ebr_substitution", "dropout_adaptive", "ebr", "--dataset", "synthetic",
                             "--epochs", "1", "--seeds", "0", "--train-missing", "0.3", "--no-progress", "--out",
                             str(tmp_path), "--selection", str(tmp_path)])
    assert saved["ebr_lambda"] == 0.7
    rows = saved["runs"]["0.3"]["0"]
    assert set(rows) == {"baseline", "dropout_adaptive", "ebr", "ebr_substitution"}
    # one EBR fit for both EBR rows, whichever comes first in --methods: two modalities alone, three joint models
    assert fits == ["UnimodalNet", "UnimodalNet", "AVDigitsNet", "AVDigitsNet", "AVDigitsNet"]
    assert rows["ebr"].get("fit_shared") and not rows["ebr_substitution"].get("fit_shared")
    assert rows["ebr_substitution"]["acc"] == rows["ebr"]["acc"] and rows["ebr_substitution"]["val_acc"] == rows["ebr"]["val_acc"]
    assert 0.0 <= rows["ebr_substitution"]["auc_missing/all"] <= 1.0
    for key in ("acc", "auc_missing/all", "auc_missing_mean_fill/m0", f"auc_noise/{saved['weakest']}"):
        assert 0.0 <= rows["baseline"][key] <= 1.0, key
    assert rows["baseline"]["missing/all/0"] == rows["baseline"]["acc"]  # rate 0 is the complete test set
    table = (tmp_path / "robustness_synthetic.md").read_text()
    assert "| 0.3 | dropout_adaptive |" in table and "area, all missing (mean fill)" in table
    assert (tmp_path / "robustness_synthetic.png").stat().st_size > 1000
    assert not list(tmp_path.glob("**/*.ckpt"))  # model selection's checkpoints stay out of --out

    # --render merges saved runs: the EBR rows from one file, the baseline from another
    first = json.loads((tmp_path / "robustness_synthetic.json").read_text())
    ebr_only, baseline_only = json.loads(json.dumps(first)), json.loads(json.dumps(first))
    for rows_by_seed, keep in ((ebr_only, ("ebr", "ebr_substitution")), (baseline_only, ("baseline",))):
        rows_by_seed["runs"]["0.3"]["0"] = {m: r for m, r in rows_by_seed["runs"]["0.3"]["0"].items() if m in keep}
    (tmp_path / "a.json").write_text(json.dumps(ebr_only))
    (tmp_path / "b.json").write_text(json.dumps(baseline_only))
    merged = robustness.main(["--render", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--dataset", "synthetic",
                              "--methods", "baseline", "ebr", "ebr_substitution", "--tag", "_merged", "--out",
                              str(tmp_path)])
    assert merged["runs"]["0.3"]["0"]["baseline"] == rows["baseline"] and merged["runs"]["0.3"]["0"]["ebr"] == rows["ebr"]
    text = (tmp_path / "robustness_synthetic_merged.md").read_text()
    assert "| 0.3 | baseline |" in text and "| 0.3 | ebr_substitution |" in text
    assert "from `python examples/robustness.py --methods baseline ebr_substitution" in text  # the sources' command
    baseline_only["runs"]["0.3"]["0"]["baseline"]["acc"] += 0.1  # another protocol's baseline: refused
    (tmp_path / "c.json").write_text(json.dumps(baseline_only))
    with pytest.raises(SystemExit, match="differs from an earlier file"):
        robustness.main(["--render", str(tmp_path / "b.json"), str(tmp_path / "c.json"), "--dataset", "synthetic",
                         "--methods", "baseline", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"\['umt'\] are in none of the files"):
        robustness.main(["--render", str(tmp_path / "a.json"), "--dataset", "synthetic", "--methods", "umt",
                         "--out", str(tmp_path)])


def test_robustness_refuses_two_sources_of_ebrs_lambda(tmp_path, examples_path, capsys):
    import robustness

    with pytest.raises(SystemExit):
        robustness.main(["--methods", "ebr", "--ebr-lambda", "0.1", "--selection", str(tmp_path)])
    assert "--ebr-lambda and --selection both set EBR's lambda" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_benchmark_runs_the_collapse_papers_methods(tmp_path, examples_path):
    import benchmark

    out = benchmark.main(["--methods", "kd_crd", "kd_infonce", "ebr", "--datasets", "synthetic", "--epochs", "1",
                          "--seeds", "0", "--no-progress", "--out", str(tmp_path)])
    rows = out["synthetic"]
    assert {"kd_crd", "kd_infonce", "ebr"} <= set(rows)
    assert all(0.0 <= rows[m][0]["acc"] <= 1.0 for m in ("kd_crd", "kd_infonce", "ebr"))


@pytest.mark.timeout(300)
def test_rank_against_beta_runner(tmp_path, examples_path):
    import rank_vs_beta

    saved = rank_vs_beta.main(["--methods", "baseline", "kd_infonce", "--betas", "0", "2", "--dataset", "synthetic",
                               "--epochs", "1", "--no-progress", "--out", str(tmp_path)])
    run = saved["seeds"]["0"]
    assert set(run["runs"]) == {"baseline/0", "baseline/2", "kd_infonce/0", "kd_infonce/2"}
    assert all(r["erank"] >= 1.0 and r["nrank"] >= 1 and 0.0 <= r["acc"] <= 1.0 for r in run["runs"].values())
    assert run["weak"] in ("m0", "m1") and run["alone_erank"] >= 1.0
    assert (tmp_path / "rank_vs_beta_synthetic.png").stat().st_size > 1000
    assert "| kd_infonce | 2 |" in (tmp_path / "rank_vs_beta_synthetic.md").read_text()


@pytest.mark.timeout(600)
def test_collapse_study_selects_runs_and_draws_the_semantic_loss(tmp_path, examples_path, monkeypatch):
    """The three stages end to end on one seed, three epochs and one-value grids: the selection is read by the run and
    the semantic stage; every must-show column is a number in range; EBR's substitution changes the missing curves."""
    import collapse_study

    monkeypatch.setattr(collapse_study, "GRIDS", {"kd_crd": ("weight", [0.8]), "kd_infonce": ("weight", [0.5]),
                                                  "ebr": ("adversarial_weight", [0.1])})
    common = ["--datasets", "synthetic", "--seeds", "0", "--epochs", "3", "--no-progress", "--out", str(tmp_path)]
    chosen = collapse_study.main(["--stage", "select", *common])["synthetic"]["chosen"]
    assert chosen == {"kd_crd": 0.8, "kd_infonce": 0.5, "ebr": 0.1}
    saved = collapse_study.main(["--stage", "run", *common])["synthetic"]
    rows = saved["seeds"]["0"]["methods"]
    assert set(rows) == {"baseline", "kd_crd", "kd_infonce", "ebr", "ebr + substitution"}
    for row in rows.values():
        assert 0 <= row["acc"] <= 1 and 0 <= row["probe_weak"] <= 1 and row["erank"] >= 1
        assert 0 <= row["polysemantic"] <= 1 and 0 <= row["auc_missing/all"] <= 1
    assert rows["ebr + substitution"]["acc"] == rows["ebr"]["acc"]  # nothing is absent at rate 0
    assert rows["ebr + substitution"]["missing/all/0.5"] != rows["ebr"]["missing/all/0.5"]
    table = (tmp_path / "collapse_synthetic.md").read_text()
    assert "| ebr + substitution |" in table and "weak probe − alone" in table
    semantic = collapse_study.main(["--stage", "semantic", "--every", "1", *common])
    curves = semantic["datasets"]["synthetic"]["0"]["curves"]
    assert set(curves) == set(collapse_study.SEMANTIC_RUNS) and all(len(c) == 3 and c[0][1] > 0 for c in curves.values())
    assert "semantic loss by linear evaluation" in semantic["datasets"]["synthetic"]["0"]["verdict"]
    assert (tmp_path / "semantic_loss.png").stat().st_size > 1000


def test_the_selection_of_another_dataset_is_refused_by_name(tmp_path, examples_path):
    import _common

    path = tmp_path / "select_collapse_av_digits.json"
    path.write_text(json.dumps({"command": "...", "av_digits": {"chosen": {"ebr": 0.1}}}))
    assert _common.chosen_parameters(str(path), "av_digits") == {"ebr": 0.1}
    assert _common.chosen_parameters(str(tmp_path), "av_digits") == {"ebr": 0.1}  # the folder form
    with pytest.raises(SystemExit, match=r"holds the selection for \['av_digits'\], not 'underlearned'.*--datasets "
                                         r"underlearned"):
        _common.chosen_parameters(str(path), "underlearned")


@pytest.mark.timeout(300)
def test_collapse_study_calibrates_on_validation_and_runs_with_a_hidden_fusion_layer(tmp_path, examples_path,
                                                                                     monkeypatch):
    """The calibration scores its probes on the validation split (the preset is chosen there, the test split is the
    runs'); ``--fusion-hidden`` puts a hidden ReLU layer into the fusion and scores the polysemanticity of its
    neurons, not of the logits."""
    import collapse_study

    setting = {"snr": [4.0, 2.5], "classes_seen": [10, 10], "noise_dims": [16, 240]}
    monkeypatch.setattr(collapse_study, "CALIBRATION", [setting])
    scored = []  # the targets every probe of the calibration is scored against

    def probe(train_z, train_y, test_z, test_y, classes, *a):
        scored.append(test_y.clone())
        return linear_probe_accuracy(train_z, train_y, test_z, test_y, classes, *a)
    import _common
    from lightning_balance.functional import linear_probe_accuracy

    monkeypatch.setattr(collapse_study, "linear_probe_accuracy", probe)
    monkeypatch.setattr(_common, "linear_probe_accuracy", probe)
    common = ["--seeds", "0", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]
    saved = collapse_study.main(["--stage", "calibrate", *common])
    assert saved["rows"][0]["setting"] == setting
    data = SyntheticCollapseDataModule(num_samples=3000, seed=0, **setting)
    data.setup()
    val, test = data.splits["val"]["target"], data.splits["test"]["target"]
    assert len(scored) == 3 and not torch.equal(val, test)  # m0 and m1 alone, m1 after joint training
    assert all(torch.equal(y, val) for y in scored)
    monkeypatch.setattr(collapse_study, "linear_probe_accuracy", linear_probe_accuracy)
    monkeypatch.setattr(_common, "linear_probe_accuracy", linear_probe_accuracy)
    assert "validation split" in (tmp_path / "calibrate_underlearned.md").read_text()

    selection = tmp_path / "select_collapse_synthetic.json"
    selection.write_text(json.dumps({"synthetic": {"chosen": {"kd_crd": 0.8, "kd_infonce": 5.0, "ebr": 0.1}}}))
    layers = []
    poly = collapse_study.fusion_polysemanticity
    monkeypatch.setattr(collapse_study, "fusion_polysemanticity",
                        lambda model, feats, layer, **k: layers.append(layer) or poly(model, feats, layer, **k))
    run = collapse_study.main(["--stage", "run", "--datasets", "synthetic", "--fusion-hidden", "16", *common])
    rows = run["synthetic"]["seeds"]["0"]["methods"]
    assert all(isinstance(layer, torch.nn.ReLU) for layer in layers) and len(layers) == len(rows)
    assert all(0 <= r["polysemantic_fraction"] <= 1 and 0 <= r["polysemantic"] <= 1 for r in rows.values())
    assert "polysemantic neurons" in (tmp_path / "collapse_synthetic_hidden16.md").read_text()


def test_overhead_probe_runs_the_methods_on_the_b_steps_only(examples_path):
    """The A/B probe must let the library's pipeline find the wrapped callbacks (it looks for them in
    trainer.callbacks): OGM-GE edits every B step and no A step, Greedy re-balances on its MMTM model."""
    import overhead
    from _common import AVDigitsNet

    from lightning_balance import OGMGE, Greedy

    dims = {"audio": 40, "visual": 64}
    cb = OGMGE(alpha=0.3, seed=0, log_metrics=False)
    res = overhead.measure(AVDigitsNet(input_dims=dims), overhead.fixed_batches(dims, 16, 12), lambda: [cb], warmup=2)
    assert cb.num_edits == 6 and res["timed_steps"] == 5 and res["ratio"] > 0
    greedy = Greedy(start_epoch=0, log_metrics=False, branch_heads="unimodal_heads")
    overhead.measure(AVDigitsNet(input_dims=dims, mmtm=True), overhead.fixed_batches(dims, 16, 12), lambda: [greedy],
                     warmup=2)
    assert torch.isfinite(greedy._state.bdr).all() and (greedy._state.bypass > 0).all()
