"""lightning_balance: find and fix modality imbalance in multimodal PyTorch Lightning models."""

from lightning_balance._distributed import UnsupportedStrategyError
from lightning_balance.callbacks import (
    OGMGE,
    GradientBalancingCallback,
    InfoReg,
    ModalityMonitor,
    NonFiniteStatisticsError,
    StepStatistics,
)
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__version__ = "0.1.0"

__all__ = [
    "OGMGE",
    "GradientBalancingCallback",
    "InfoReg",
    "ModalityContractError",
    "ModalityMonitor",
    "ModalityRecord",
    "MultimodalMixin",
    "NonFiniteStatisticsError",
    "StepStatistics",
    "UnsupportedStrategyError",
    "__version__",
]
