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
    # conv kernels only: an MLP model gets told what to do instead
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params="conv")], max_epochs=1))
    with pytest.raises(ModalityContractError, match="params='auto' \\(the default\\), 'weights' or 'all'"):
        trainer.fit(TinyAV(), loader())
    with pytest.raises(ValueError, match="params must map modality names"):
        OGMGE(params={"audio": "kernels"})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(params={"depth": "conv"})], max_epochs=1))
    with pytest.raises(ModalityContractError, match="unknown modalities \\['depth'\\]"):
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


# ---------------------------------------------------------------------------------------------- issue 11, contract


def test_parameter_shared_by_an_encoder_and_the_fusion_is_refused():
    m = _Base()
    m.fusion = nn.Sequential(m.a, nn.Linear(4, 2))  # the fusion reuses the audio encoder's layer
    with pytest.raises(ModalityContractError, match="Parameter 'a.weight' of the encoder of modality 'audio'.*also parameter "
                                                      "'0.weight' of the fusion.*Untie it"):
        m.configure_modalities({"audio": m.a, "visual": m.v}, fusion=m.fusion)
    m2 = _Base()
    m2.aux = nn.ModuleDict({"audio": nn.Linear(4, 2), "visual": m2.v})  # a unimodal head that is an encoder
    with pytest.raises(ModalityContractError, match="'weight' of the unimodal head 'v'"):
        m2.configure_modalities({"audio": m2.a, "visual": m2.v}, head=m2.head, unimodal="heads",
                                unimodal_heads={"audio": m2.aux["audio"], "visual": m2.aux["visual"]})


def test_targets_are_range_checked_and_ignore_index_samples_pass_through():
    model = TinyAV()
    b = batch(6)
    feats = model.forward_features(b)
    with pytest.raises(ModalityContractError, match=r"class indices in \[0, 4\).*ignore_index=-100.*got \[-3, 7\]"):
        model.fuse(feats, torch.tensor([0, 1, 7, 2, -3, 1]))
    targets = torch.tensor([0, -100, 3, 1, -100, 2])
    model.fuse(feats, targets)
    record = model.balance_record
    assert record.valid.tolist() == [True, False, True, True, False, True]
    assert record.valid_targets().tolist() == [0, 0, 3, 1, 0, 2]
    # the unimodal losses leave the unlabelled samples out, like F.cross_entropy(ignore_index=-100)
    total = model.add_unimodal_losses(torch.zeros(()))
    uni = model.compute_unimodal_logits(record.features)
    expected = sum(F.cross_entropy(uni[m], targets) for m in ("audio", "visual"))
    torch.testing.assert_close(total, expected)
    other = _Base()
    other.configure_modalities({"audio": other.a, "visual": other.v}, head=other.head, ignore_index=255)
    out = other.fuse({"audio": torch.randn(3, 4), "visual": torch.randn(3, 4)}, torch.tensor([0, 255, 1]))
    assert out.shape == (3, 2) and other.balance_record.valid.tolist() == [True, False, True]
    with pytest.raises(ModalityContractError, match="got \\[-100\\]"):
        other.fuse({"audio": torch.randn(1, 4), "visual": torch.randn(1, 4)}, torch.tensor([-100]))


class _TokenHead(MultimodalMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.v = nn.Linear(3, 4)
        self.head = nn.Linear(8, 2)
        self.configure_modalities({"audio": self.a, "visual": self.v}, head=self.head)


def test_per_token_logits_are_refused_with_the_fix():
    model = _TokenHead()
    tokens = {"audio": torch.randn(2, 5, 4), "visual": torch.randn(2, 5, 4)}
    with pytest.raises(ModalityContractError, match=r"shape \(N, C\).*\(2, 5, 2\).*per-token logits.*pool the tokens"):
        model.fuse(tokens, torch.tensor([0, 1]))


def test_pool_features_averages_tokens_and_keeps_vectors():
    model = TinyAV()
    z = torch.randn(3, 7, 8)
    torch.testing.assert_close(model.pool_features("audio", z), z.mean(1))
    v = torch.randn(3, 8)
    assert model.pool_features("audio", v) is v


def test_mixed_precision_features_give_split_logits_like_the_fused_head():
    model = TinyAV()
    b = batch()
    feats = model.forward_features(b)
    feats = {"audio": feats["audio"].half(), "visual": feats["visual"]}  # fp16 audio, fp32 visual
    logits = model.fuse(feats, b["target"])  # the concat promotes to fp32
    uni = model.balance_record.unimodal_logits()
    assert uni["audio"].dtype == torch.float32
    torch.testing.assert_close(uni["audio"] + uni["visual"], logits.detach())


class _TwoViews(TinyAV):
    def training_step(self, batch, batch_idx):
        first = self.fuse(self.forward_features(batch), batch["target"])
        flipped = {k: (v.flip(0) if k != "target" else v.flip(0)) for k, v in batch.items()}
        second = self.fuse(self.forward_features(flipped), flipped["target"])
        self.seen.append(len(self.records_since(self.count_at_start, "test")))
        return F.cross_entropy(first, batch["target"]) + F.cross_entropy(second, flipped["target"])

    def on_train_batch_start(self, batch, batch_idx):
        self.count_at_start = self.record_count


def test_records_of_one_batch_are_kept_together_and_released_after(tmp_path):
    model = _TwoViews()
    model.seen = []
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, loader())
    assert model.seen == [2, 2, 2, 2]
    assert len(model._lb_batch_records) <= 2  # only the last batch's records are held


class _StaleRecord(TinyAV):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            logits = self.fuse(self.forward_features(batch), batch["target"])
        else:  # forgets to fuse: the record left from batch 0 must not be used
            feats = self.forward_features(batch)
            logits = self.head(torch.cat([feats["audio"], feats["visual"]], -1))
        return self.add_unimodal_losses(F.cross_entropy(logits, batch["target"]))


def test_a_record_from_an_earlier_batch_is_never_used(tmp_path):
    with pytest.raises(ModalityContractError, match="add_unimodal_losses\\(\\) needs this step's record"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(_StaleRecord(), loader())


def test_loss_weights_travel_in_the_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = TinyAV(aux_losses=True)
    model.loss_weights = {"fused": 1.0, "audio": 0.25, "visual": 0.5}
    restored = TinyAV(aux_losses=True)
    restored.load_state_dict(model.state_dict())
    assert restored.loss_weights == {"fused": 1.0, "audio": 0.25, "visual": 0.5}
    plain = TinyAV()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("_balance")})
    assert plain.loss_weights == {"fused": 1.0, "audio": 1.0, "visual": 1.0}  # checkpoints without weights load
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ckpt], max_epochs=1, enable_checkpointing=True))
    trainer.fit(model, loader())
    resumed = TinyAV(aux_losses=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.loss_weights == {"fused": 1.0, "audio": 0.25, "visual": 0.5}


def test_a_concat_head_of_the_wrong_width_is_named_with_the_widths():
    model = TinyAV()  # encoders give 8 + 8 features
    model.head = nn.Linear(15, 3)
    model.configure_modalities({"audio": model.audio_encoder, "visual": model.visual_encoder}, head=model.head)
    b = batch()
    with pytest.raises(ModalityContractError, match=r"head `head` takes 15 input features.*\{'audio': 8, 'visual': 8\} "
                                                    r"\(sum 16\).*nn.Linear\(16, num_classes\)"):
        model.fuse(model.forward_features(b), b["target"])


def test_a_misspelt_modality_in_a_callback_is_named_with_a_suggestion(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[OGMGE(modalities=["adio", "visual"])], max_epochs=1))
    with pytest.raises(ModalityContractError, match=r"names unknown modalities \['adio'\].*did you mean 'adio' -> "
                                                    r"'audio'\?.*checked against the module's configure_modalities"):
        trainer.fit(TinyAV(), loader())
