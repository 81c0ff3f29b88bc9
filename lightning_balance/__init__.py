"""lightning_balance: find and fix modality imbalance in multimodal PyTorch Lightning models."""

from lightning_balance._distributed import UnsupportedStrategyError
from lightning_balance.callbacks import (
    AGM,
    AMCo,
    OGMGE,
    OPM,
    GradientBalancingCallback,
    GradientBlending,
    Greedy,
    InfoReg,
    MMPareto,
    ModalityDiagnostics,
    ModalityDropout,
    ModalityMonitor,
    NonFiniteStatisticsError,
    PMR,
    Relearning,
    SampleValuation,
    StepStatistics,
)
from lightning_balance.heads import CosineHead
from lightning_balance.mla import MLAFusion
from lightning_balance.mmtm import MMTM, cross_modal_off, recording_statistics
from lightning_balance.reconboost import ReconBoostFusion
from lightning_balance.losses import (
    CMLLoss,
    LFMLoss,
    MBSDLoss,
    ContrastiveLoss,
    CrossModalDistillation,
    ExplicitBasisReallocation,
    LossTerm,
    LossTerms,
    ReconstructionLoss,
    UMTLoss,
    UnimodalEnsemble,
    distill_encoder,
)
from lightning_balance.modality import ModalityContractError, ModalityRecord, MultimodalMixin

__version__ = "0.1.0"

__all__ = [
    "CMLLoss",
    "LFMLoss",
    "MBSDLoss",
    "ContrastiveLoss",
    "CosineHead",
    "MLAFusion",
    "ReconBoostFusion",
    "CrossModalDistillation",
    "ExplicitBasisReallocation",
    "LossTerm",
    "LossTerms",
    "AGM",
    "AMCo",
    "OGMGE",
    "OPM",
    "ReconstructionLoss",
    "GradientBalancingCallback",
    "GradientBlending",
    "Greedy",
    "MMTM",
    "cross_modal_off",
    "recording_statistics",
    "InfoReg",
    "MMPareto",
    "ModalityContractError",
    "ModalityDiagnostics",
    "ModalityDropout",
    "ModalityMonitor",
    "ModalityRecord",
    "MultimodalMixin",
    "NonFiniteStatisticsError",
    "PMR",
    "Relearning",
    "SampleValuation",
    "StepStatistics",
    "UMTLoss",
    "UnimodalEnsemble",
    "distill_encoder",
    "UnsupportedStrategyError",
    "__version__",
]
