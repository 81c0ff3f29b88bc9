"""The new user's path: trained-alone references (fit_alone), the one-call diagnosis, the comparison harness,
balanced_loss, the A/B step-time ratio and the console command, on a model defined outside the library."""

from __future__ import annotations

import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_balance import (
    AloneReferences,
    ModalityContractError,
    compare_methods,
    diagnose,
    fit_alone,
    fit_method,
    plot_probes,
    step_time_ratio,
)
from lightning_balance.console import load_object, main
from lightning_balance.functional import cross_validated_probe_accuracy
from lightning_balance.losses import fit_unimodal_teachers
from tests.story_model import INPUTS, UserData, UserModel, plain_model

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = {"inputs": INPUTS, "target_key": "y"}


def _trained(epochs: int = 3) -> tuple[UserModel, UserData]:
    data = UserData()
    data.setup()
    return fit_method(UserModel, data, "baseline", max_epochs=epochs, seed=0).module, data


@torch.no_grad()
def _val_arrays(data: UserData) -> tuple[dict, torch.Tensor]:
    batch = {k: torch.stack([data.val_set[i][k] for i in range(len(data.val_set))]) for k in ("x_easy", "x_hard", "y")}
    return batch, batch["y"]


def test_fit_alone_reads_the_users_keys_keeps_the_best_epoch_and_measures_like_the_diagnosis():
    data = UserData()
    module = UserModel()
    refs = fit_alone(module, data, max_epochs=4, seed=0, **KEYS)
    assert isinstance(refs, AloneReferences) and set(refs.models) == {"easy", "hard"}
    batch, y = _val_arrays(data)
    out = refs.evaluate(data.val_dataloader())
    log_p = torch.zeros(len(y), 3, dtype=torch.float64)
    for m, key in INPUTS.items():
        model = refs.models[m]
        with torch.no_grad():
            z = model.encoder(batch[key])
            logits = model.head(z)
        acc = float((logits.argmax(-1) == y).double().mean())
        # the selected epoch's weights: their validation accuracy is the one recorded at selection
        assert acc == pytest.approx(refs.val_accuracy[m], abs=1e-9)
        assert 0 <= refs.epochs[m] < 4
        assert out[f"acc/{m}"] == pytest.approx(acc)
        assert out[f"acc_se/{m}"] == pytest.approx(math.sqrt(acc * (1 - acc) / len(y)))
        # the probe: 2-fold cross-validation on these samples, the protocol of ModalityDiagnostics
        assert out[f"probe/{m}"] == pytest.approx(cross_validated_probe_accuracy(z.float(), y, 3, 2))
        log_p += torch.log_softmax(logits.double(), -1)
        # a fresh copy: the joint module's encoder is not the reference's
        assert model.encoder is not module.modality_encoders(m)[0]
    assert out["ensemble"] == pytest.approx(float((log_p.argmax(-1) == y).double().mean()))
    assert refs.diagnostics_kwargs()["alone_probe"]["easy"] == (out["probe/easy"], out["probe_se/easy"])
    # the module's own optimizer (AdamW with its weight decay) trained the references
    optimizer = refs.models["easy"].configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01


def test_fit_alone_names_the_missing_key_and_the_fix():
    with pytest.raises(ModalityContractError, match=r"no key 'easy'.*inputs=\{'easy': '<its key>'\}"):
        fit_alone(UserModel(), UserData(), max_epochs=1)
    with pytest.raises(ModalityContractError, match=r"no key 'target'.*target_key="):
        fit_alone(UserModel(), UserData(), max_epochs=1, inputs=INPUTS)
    with pytest.raises(ModalityContractError, match="does not declare"):
        fit_alone(UserModel(), UserData(), max_epochs=1, inputs={"sound": "x"})


def test_fit_unimodal_teachers_takes_the_key_mapping():
    teachers, models = fit_unimodal_teachers(UserModel(), UserData(), num_classes=3, max_epochs=1, **KEYS)
    assert set(teachers) == {"easy", "hard"} and models["hard"].encoder is teachers["hard"]


def test_one_modality_alone_is_refused_with_the_supported_path():
    from torch import nn

    from lightning_balance import MultimodalMixin

    class One(MultimodalMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3)
            self.configure_modalities({"a": self.enc}, head=nn.Identity())

    with pytest.raises(ModalityContractError, match="fit_alone"):
        One()


def test_balanced_loss_adds_exactly_the_switched_on_objectives():
    module = UserModel()
    data = UserData()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    loss = module.loss(batch)
    assert module.balanced_loss(loss) is loss  # nothing attached: unchanged
    module.balance_unimodal_losses = True
    loss = module.loss(batch)
    record = module.current_record("test")
    logits = module.compute_unimodal_logits(record.features)
    expected = loss + sum(F.cross_entropy(logits[m], batch["y"]) for m in ("easy", "hard"))  # weights 1 by default
    assert torch.allclose(module.balanced_loss(loss), expected)


def test_diagnose_returns_the_report_with_references_on_the_same_samples(tmp_path):
    module, data = _trained()
    refs = fit_alone(module, data, max_epochs=3, seed=0, **KEYS)
    path = str(tmp_path / "d.png")
    report = diagnose(module, data.val_dataloader(), references=refs, plot=path, bootstrap=50)
    batch, y = _val_arrays(data)
    with torch.no_grad():
        logits = module.fuse_features({"easy": module.enc_a(batch["x_easy"]), "hard": module.enc_b(batch["x_hard"])})
    assert report.values["acc_fused"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert report.alone_accuracy["easy"][0] == pytest.approx(refs.measured["acc/easy"])
    assert any(line.startswith("Fused model vs the best modality trained alone") for line in report.verdict)
    assert report.next_step is not None and report.next_step.startswith("Next step")
    assert "Verdict:" in str(report) and "probe alone" in report.table
    assert os.path.getsize(path) > 10_000
    # the figure's axes contain every probe and every reference
    fig = plot_probes([report], None)
    low, high = fig.axes[0].get_ylim()
    for m in ("easy", "hard"):
        assert low <= report.values[f"probe/{m}"] <= high and low <= report.alone_probe[m][0] <= high
    assert module.training is False or module.training is True  # mode restored, not forced
    with pytest.raises(ValueError, match="alone_probe"):
        diagnose(module, data.val_dataloader(), references={"probes": {}})


def test_diagnose_says_when_the_validation_step_does_not_fuse():
    module, data = _trained(1)
    module.validation_step = lambda *args: None
    with pytest.raises(ModalityContractError, match=r"`validation_step` must obtain its logits with `self.fuse"):
        diagnose(module, data.val_dataloader())


def test_compare_methods_selects_on_validation_and_pairs_the_seeds(tmp_path):
    result = compare_methods(UserModel, UserData, ["baseline", "uni_losses", "cml"], seeds=[0, 1], max_epochs=2,
                             reference_kwargs=KEYS, out=str(tmp_path), progress=False)
    assert result.methods == ["baseline", "uni_losses", "cml"]
    assert {"easy alone", "hard alone", "unimodal ensemble"} <= set(result.rows)
    base = {r["seed"]: r["acc"] for r in result.rows["baseline"]}
    cml = {r["seed"]: r["acc"] for r in result.rows["cml"]}
    diff = [cml[s] - base[s] for s in (0, 1)]
    paired = result.paired("cml")
    assert paired["mean"] == pytest.approx(sum(diff) / 2)
    half = 12.706 * abs(diff[0] - diff[1]) / math.sqrt(2) / math.sqrt(2)  # t(1) · stdev / sqrt(n)
    assert paired["high"] - paired["mean"] == pytest.approx(half)
    assert all(0 <= r["epoch"] < 2 and math.isfinite(r["probe/easy"]) for r in result.rows["cml"])
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["rows"]["cml"][0]["acc"] == result.rows["cml"][0]["acc"]
    assert "Δ vs baseline" in open(tmp_path / "compare.md").read() and os.path.exists(tmp_path / "compare.png")
    # the same seed and method reproduce the run
    again = fit_method(UserModel, UserData, "cml", max_epochs=2, seed=1)
    assert again.val_accuracy == pytest.approx(result.rows["cml"][1]["val_acc"])


def test_compare_methods_refuses_an_objective_the_model_never_adds():
    with pytest.raises(ModalityContractError, match=r"return self.balanced_loss\(loss\)"):
        fit_method(plain_model, UserData(), "cml", max_epochs=1)
    # a method that needs encode_batch is refused before any run, not after the others have trained
    with pytest.raises(ModalityContractError, match=r"\['ogm_ge\+pmr'\] make their own passes.*override encode_batch"):
        compare_methods(UserModel, UserData, ["baseline", "ogm_ge+pmr"], seeds=[0], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        compare_methods(UserModel, UserData, ["baseline", "nope"], seeds=[0], progress=False)


def test_step_time_ratio_alternates_in_one_fit_and_refuses_callbacks():
    cost = step_time_ratio(UserModel, "cml", UserData(n=640), steps=20, warmup=4)
    assert cost["timed_steps"] >= 8 and cost["ratio"] > 0
    assert cost["ratio"] == pytest.approx(cost["median_ms_with"] / cost["median_ms_without"])
    with pytest.raises(ValueError, match="examples/overhead.py"):
        step_time_ratio(UserModel, "ogm_ge", UserData())


def test_console_loads_objects_by_path_and_runs_compare_and_diagnose(tmp_path, capsys):
    assert load_object(os.path.join(HERE, "story_model.py") + ":UserModel").__name__ == "UserModel"
    with pytest.raises(SystemExit, match="has no 'Nope'"):
        load_object(os.path.join(HERE, "story_model.py") + ":Nope")
    model, data = os.path.join(HERE, "story_model.py") + ":UserModel", os.path.join(HERE, "story_model.py") + ":UserData"
    keys = ["--inputs", "easy=x_easy", "hard=x_hard", "--target-key", "y"]
    main(["compare", "--model", model, "--data", data, "--methods", "baseline", "uni_losses", "--seeds", "0",
          "--epochs", "1", "--out", str(tmp_path), "--no-diagnose", *keys])
    assert "| uni_losses |" in capsys.readouterr().out
    trained, _ = _trained(2)
    ckpt = str(tmp_path / "m.pt")
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    main(["diagnose", "--model", model, "--data", data, "--checkpoint", ckpt, "--reference-epochs", "1", *keys])
    out = capsys.readouterr().out
    assert "Verdict:" in out and "Next step" in out
    # the user's mistakes end on the message and the fix, not a traceback
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--model", model, "--data", data, "--methods", "baseline", "ogmge", *keys])
    assert exit_info.value.code == 2 and "unknown method(s) ['ogmge']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["diagnose", "--model", model, "--data", data, "--reference-epochs", "1", "--inputs", "easy=nope"])
    assert "no key 'nope'" in capsys.readouterr().err


def test_the_demo_diagnoses_applies_the_recommendation_and_verifies(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(HERE), "examples"))
    sys.modules.pop("demo", None)
    import demo

    demo.main(["--epochs", "8", "--seeds", "0", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # on AV-Digits at 8 epochs the baseline's audio encoder is under-learned: the evidence says unimodal losses
    assert "audio encoder: linear probe" in out and "UNDER-LEARNED" in out.split("3. Apply")[0]
    assert "3. Apply what the diagnosis recommends: uni_losses" in out
    assert "Verified on test, 2 seeds" in out and "| uni_losses |" in out and "A/B alternating" in out
    saved = json.load(open(tmp_path / "demo_verify.json"))
    assert [r["seed"] for r in saved["rows"]["uni_losses"]] == [0, 1]
    assert os.path.getsize(tmp_path / "demo.png") > 10_000
