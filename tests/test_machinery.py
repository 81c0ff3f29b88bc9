"""The shared machinery: statistics container and the single-device reduction."""

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_balance import StepStatistics
from lightning_balance._distributed import all_reduce_sum


def test_step_statistics_sum_micro_batches_and_reset():
    stats = StepStatistics()
    assert not stats.pending
    stats.update({"scores": torch.tensor([1.0, 2.0]), "count": torch.tensor([4.0])})
    stats.update({"scores": torch.tensor([0.5, 0.25]), "count": torch.tensor([4.0])})
    assert stats.pending
    out = stats.reduce(SingleDeviceStrategy(torch.device("cpu")))
    assert out["scores"].tolist() == [1.5, 2.25] and out["count"].tolist() == [8.0]
    assert not stats.pending


def test_statistics_are_detached_float32_copies():
    stats = StepStatistics()
    value = torch.tensor([1.0, 2.0], dtype=torch.float16, requires_grad=True)
    stats.update({"x": value})
    stats.update({"x": value.detach()})
    out = stats.reduce(SingleDeviceStrategy(torch.device("cpu")))
    assert out["x"].dtype == torch.float32 and not out["x"].requires_grad
    assert value.tolist() == [1.0, 2.0]  # the input was not modified in place


def test_all_reduce_sum_is_identity_on_one_device():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, SingleDeviceStrategy(torch.device("cpu"))) is t


def test_a_method_missing_its_hook_fails_when_defined():
    from lightning_balance.callbacks.base import GradientBalancingCallback

    with pytest.raises(TypeError, match="reduce_at='step' and must implement edit"):
        class NoEdit(GradientBalancingCallback):  # noqa: F841
            def collect(self, pl_module, record):
                return {}

            def compute(self, stats):
                return {}

    with pytest.raises(TypeError, match="reduce_at='micro_batch' and must implement prepare_backward"):
        class NoTaps(GradientBalancingCallback):  # noqa: F841
            reduce_at = "micro_batch"

            def collect(self, pl_module, record):
                return {}

            def compute(self, stats):
                return {}
