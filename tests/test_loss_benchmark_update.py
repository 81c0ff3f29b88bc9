"""The benchmark runner's --update: re-run rows replace those of the saved file, every other row (the
baseline included) is kept, the replaced rows stay in the JSON, and the table is regenerated. Training is
replaced by a stub that returns fixed rows (the runner's training is covered by tests/test_examples.py)."""

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import benchmark as module

    calls = []

    def fake_run_seed(dataset, seed, methods, epochs, root, progress, references):
        calls.append((list(methods), references))
        value = 0.5 + 0.1 * len(calls)  # every run gives other numbers
        row = {"acc": value, "probe_m0": value, "probe_m1": value, "acc_without_m0": value, "acc_without_m1": value,
               "val_acc": value, "step_ms": 1.0, "fit_s": 1.0, "step_ratio": 1.0, "fit_ratio": 1.0}
        history = [{"epoch": 0, "val_acc/m0": value, "val_acc/m1": value, "val_acc_fused": value}]
        return {m: dict(row) for m in methods}, {m: history for m in methods}

    monkeypatch.setattr(module, "run_seed", fake_run_seed)
    module.calls = calls
    yield module
    for name in ("benchmark", "_common"):
        sys.modules.pop(name, None)


def test_update_replaces_only_the_re_run_rows(tmp_path, benchmark):
    common = ["--datasets", "synthetic", "--epochs", "1", "--seeds", "0", "--no-progress", "--out", str(tmp_path)]
    benchmark.main(["--methods", "baseline", "cml", "ogm", *common])
    path = tmp_path / "benchmark_synthetic.json"
    before = json.loads(path.read_text())
    benchmark.main(["--update", "--methods", "cml", *common])
    # the re-run trains the baseline (the cost ratios' denominator) and cml, without the references
    assert benchmark.calls[-1] == (["baseline", "cml"], False)
    after = json.loads(path.read_text())
    assert after["results"]["cml"][0]["acc"] == pytest.approx(0.7)
    assert after["replaced"]["cml"] == [before["results"]["cml"]]
    assert after["results"]["baseline"] == before["results"]["baseline"]  # the saved baseline is kept
    assert after["results"]["ogm"] == before["results"]["ogm"]
    assert after["methods"] == ["baseline", "cml", "ogm"] and after["command"] == before["command"]
    assert after["updates"][0]["methods"] == ["cml"] and after["updates"][0]["command"].startswith(
        "python examples/benchmark.py --update --methods cml")
    assert after["curves"][0]["cml"][0]["val_acc_fused"] == pytest.approx(0.7)
    assert after["curves"][0]["ogm"] == before["curves"][0]["ogm"]
    table = (tmp_path / "benchmark_synthetic.md").read_text()
    assert "Rows cml re-run and merged" in table and "| ogm | 0.600 |" in table and "| cml | **0.700** |" in table
    runs = len(benchmark.calls)
    other_seeds = ["--datasets", "synthetic", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        benchmark.main(["--update", "--methods", "cml", *other_seeds])  # refused before any training
    assert len(benchmark.calls) == runs and json.loads(path.read_text()) == after


def test_update_can_drop_a_row_that_no_longer_exists(tmp_path, benchmark):
    common = ["--datasets", "synthetic", "--epochs", "1", "--seeds", "0", "--no-progress", "--out", str(tmp_path)]
    benchmark.main(["--methods", "baseline", "cml", "ogm", *common])
    path = tmp_path / "benchmark_synthetic.json"
    before = json.loads(path.read_text())
    benchmark.main(["--update", "--methods", "cml", "--drop", "ogm", *common])
    after = json.loads(path.read_text())
    assert "ogm" not in after["results"] and "ogm" not in after["methods"] and "ogm" not in after["curves"][0]
    assert after["replaced"]["ogm"] == [before["results"]["ogm"]]
    assert after["updates"][-1]["dropped"] == ["ogm"]
    assert "| ogm |" not in (tmp_path / "benchmark_synthetic.md").read_text()
