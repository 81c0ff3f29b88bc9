"""The modality contract: declaration, per-step records, unimodal logits, and bad input."""


import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_balance import OGMGE, ModalityContractError, MultimodalMixin
from lightning_balance._distributed import UnsupportedStrategyError, check_strategy
from tests.helpers import DictDataset, TinyAV, loader, trainer_kwargs


def batch(n=4):
    ds = DictDataset(n=n)
    return {"audio": ds.a, "visual": ds.v, "target": ds.y}


def test_split_head_unimodal_logits_sum_to_fused_and_match_weight_slices():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    logits = model.fuse(feats, b["target"])
    uni = model.balance_record.unimodal_logits()
    torch.testing.assert_close(uni["audio"] + uni["visual"], logits.detach())
    w, bias = model.head.weight, model.head.bias
    expected_audio = feats["audio"] @ w[:, :8].T + bias / 2
    torch.testing.assert_close(uni["audio"], expected_audio.detach())
    assert not uni["audio"].requires_grad


def test_parameter_groups_are_explicit_modules():
    model = TinyAV()
    assert model.modalities == ("audio", "visual")
    assert {id(p) for p in model.modality_parameters("audio")} == {id(p) for p in model.audio_encoder.parameters()}
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.head.parameters()}
    with pytest.raises(ModalityContractError, match="Unknown modality 'depth'.*audio"):
        model.modality_parameters("depth")


def test_gated_fusion_uses_masking():
    model = TinyAV(fusion="gated")
    assert model.modality_spec.unimodal == "mask"
    b = batch()
    feats = model.forward_features(b)
    model.fuse(feats, b["target"])
    uni = model.balance_record.unimodal_logits()
    expected = model.fusion(feats["audio"], torch.zeros_like(feats["visual"]))
    torch.testing.assert_close(uni["audio"], expected.detach())


def test_auxiliary_heads_train_only_heads():
    model = TinyAV(fusion="gated", unimodal="heads")
    b = batch()
    model.fuse(model.forward_features(b), b["target"])
    loss = model.unimodal_loss()
    loss.backward()
    assert model.aux["audio"].weight.grad is not None
    assert all(p.grad is None for p in model.audio_encoder.parameters())
    uni = model.balance_record.unimodal_logits()
    torch.testing.assert_close(uni["visual"], model.aux["visual"](model.balance_record.features["visual"]).detach())


def test_contract_with_gated_fusion_trains_with_ogm(tmp_path):
    model = TinyAV(fusion="gated")
    cb = OGMGE(alpha=0.5, params="weights", seed=0)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(model, loader())
    assert cb.num_edits == 4


class _Base(MultimodalMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.v = nn.Linear(3, 4)
        self.head = nn.Linear(8, 2)


def test_bad_declarations_name_problem_and_fix():
    m = _Base()
    with pytest.raises(ModalityContractError, match="Duplicate modality name 'audio'.*list"):
        m.configure_modalities([("audio", m.a), ("audio", m.v)], head=m.head)
    with pytest.raises(ModalityContractError, match="Invalid modality name"):
        m.configure_modalities({"": m.a, "v": m.v}, head=m.head)
    with pytest.raises(ModalityContractError, match="not a submodule.*Assign it as an attribute"):
        m.configure_modalities({"audio": m.a, "visual": nn.Linear(3, 4)}, head=m.head)
    with pytest.raises(ModalityContractError, match="no submodule 'nope'.*a, v, head"):
        m.configure_modalities({"audio": "nope", "visual": m.v}, head=m.head)
    with pytest.raises(ModalityContractError, match="claimed by modality 'visual' and by modality 'audio'"):
        m.configure_modalities({"audio": m.a, "visual": [m.v, m.a]}, head=m.head)
    with pytest.raises(ModalityContractError, match="at least two modalities"):
        m.configure_modalities({"audio": m.a}, head=m.head)
    with pytest.raises(ModalityContractError, match="Declare how features are fused"):
        m.configure_modalities({"audio": m.a, "visual": m.v})
    with pytest.raises(ModalityContractError, match="unimodal='split'.*head="):
        m.configure_modalities({"audio": m.a, "visual": m.v}, fusion=m.head, unimodal="split")
    with pytest.raises(ModalityContractError, match="unimodal_heads"):
        m.configure_modalities({"audio": m.a, "visual": m.v}, head=m.head, unimodal="heads")
    with pytest.raises(ModalityContractError, match="has not declared its modalities.*configure_modalities"):
        _ = m.modalities


def test_bad_step_inputs():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    with pytest.raises(ModalityContractError, match="unknown: \\['depth'\\]"):
        model.fuse({**feats, "depth": feats["audio"]}, b["target"])
    with pytest.raises(ModalityContractError, match="missing: \\['visual'\\]"):
        model.fuse({"audio": feats["audio"]}, b["target"])
    with pytest.raises(ModalityContractError, match="one batch size"):
        model.fuse({"audio": feats["audio"], "visual": feats["visual"][:2]}, b["target"])
    with pytest.raises(ModalityContractError, match="targets must be class indices of shape \\(4,\\)"):
        model.fuse(feats, b["target"][:3])
    with pytest.raises(ModalityContractError, match="widths"):
        model.compute_unimodal_logits({"audio": feats["audio"][:, :3], "visual": feats["visual"]})


class _NoFuse(TinyAV):
    def training_step(self, batch, batch_idx):
        feats = self.forward_features(batch)
        logits = self.head(torch.cat([feats["audio"], feats["visual"]], dim=-1))
        return F.cross_entropy(logits, batch["target"])


def test_step_without_record_is_a_clear_error(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params="weights")], max_epochs=1))
    with pytest.raises(ModalityContractError, match="no modality record.*self.fuse\\(features, targets\\)"):
        trainer.fit(_NoFuse(), loader())


class _NaN(TinyAV):
    def forward_features(self, batch):
        feats = super().forward_features(batch)
        return {"audio": feats["audio"] * float("nan"), "visual": feats["visual"]}


def test_nonfinite_scores_raise_or_skip(tmp_path):
    from lightning_balance import NonFiniteStatisticsError

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params="weights")], max_epochs=1))
    with pytest.raises(NonFiniteStatisticsError, match="non-finite statistics \\['scores'\\].*nonfinite='skip'"):
        trainer.fit(_NaN(), loader())
    cb = OGMGE(params="weights", nonfinite="skip")
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_epochs=1)).fit(_NaN(), loader())
    assert cb.num_edits == 0


def test_callback_on_a_module_without_the_mixin(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="inherit `lightning_balance.MultimodalMixin`"):
        trainer.fit(BoringModel())


def test_callback_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        OGMGE(alpha=-0.1)
    with pytest.raises(ValueError, match="params must be one of"):
        OGMGE(params="conv2d")
    with pytest.raises(ValueError, match="end_epoch"):
        OGMGE(start_epoch=5, end_epoch=2)
    with pytest.raises(ValueError, match="duplicates"):
        OGMGE(modalities=["audio", "audio"])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(modalities=["audio", "depth"])], max_epochs=1))
    with pytest.raises(ModalityContractError, match="unknown modalities \\['depth'\\].*declares \\['audio', 'visual'\\]"):
        trainer.fit(TinyAV(), loader())
    # official default edits conv kernels only: an MLP model gets told what to do instead
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE()], max_epochs=1))
    with pytest.raises(ModalityContractError, match="params='weights'"):
        trainer.fit(TinyAV(), loader())


def test_strategy_allow_list():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy

    check_strategy(SingleDeviceStrategy(torch.device("cpu")), "OGMGE")
    check_strategy(DDPStrategy(), "OGMGE")
    deepspeed = object.__new__(DeepSpeedStrategy)
    with pytest.raises(UnsupportedStrategyError, match="DeepSpeed.*strategy='ddp'"):
        check_strategy(deepspeed, "OGMGE", allow_untested=True)
    with pytest.raises(UnsupportedStrategyError, match="use_orig_params=True"):
        check_strategy(FSDPStrategy(use_orig_params=False), "OGMGE", allow_untested=True)
    with pytest.raises(UnsupportedStrategyError, match="shard.*allow_untested_strategy=True"):
        check_strategy(FSDPStrategy(), "OGMGE")
    with pytest.warns(UserWarning, match="shard-local"):
        check_strategy(FSDPStrategy(), "OGMGE", allow_untested=True)
    check_strategy(FSDPStrategy(), "OGMGE", fsdp_ok=True)

    class Custom(Strategy):  # a strategy that is not on the allow-list
        pass

    Custom.__abstractmethods__ = frozenset()
    custom = object.__new__(Custom)
    with pytest.raises(UnsupportedStrategyError, match="does not support strategy Custom.*allow_untested_strategy=True"):
        check_strategy(custom, "OGMGE")
    with pytest.warns(UserWarning, match="not been tested"):
        check_strategy(custom, "OGMGE", allow_untested=True)
    assert issubclass(Custom, Strategy)


def test_fuse_hooks_run_in_training_only_and_can_be_removed():
    import pickle

    from tests.helpers import TinyAV

    calls = []

    class Hook:
        def tap_features(self, module, features, targets, extras):
            calls.append("features")
            extras["seen"] = True
            return {k: v * 1.0 for k, v in features.items()}

        def tap_logits(self, module, features, targets, logits, extras):
            calls.append("logits")
            return logits + 0.0

    model = TinyAV()
    handle = model.register_fuse_hook(Hook())
    batch = {"audio": torch.randn(3, 6), "visual": torch.randn(3, 5)}
    model.train()
    model.fuse(model.forward_features(batch))
    assert calls == ["features", "logits"] and model.balance_record.extras == {"seen": True}
    model.eval()
    model.fuse(model.forward_features(batch))
    with torch.no_grad():
        model.train()
        model.fuse(model.forward_features(batch))
    assert calls == ["features", "logits"]  # eval mode and no_grad: hooks skipped
    assert pickle.loads(pickle.dumps(model))._lb_hooks is None  # hooks never travel with the module
    handle.remove()
    model.fuse(model.forward_features(batch))
    assert calls == ["features", "logits"]
