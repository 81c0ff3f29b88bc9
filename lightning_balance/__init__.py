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
from lightning_balance.compare import METHODS, Comparison, Method, compare_methods, fit_method, step_time_ratio
from lightning_balance.diagnosis import DiagnosisReport, diagnose, plot_probes
from lightning_balance.heads import CosineHead
from lightning_balance.mla import MLAFusion
from lightning_balance.mmtm import MMTM, cross_modal_off, recording_statistics
from lightning_balance.reconboost import ReconBoostFusion
from lightning_balance.transformer import TokenFusionTransformer
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
from lightning_balance.progress import RunProgress, quiet
from lightning_balance.references import AloneReferences, fit_alone

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AloneReferences",
    "Comparison",
    "DiagnosisReport",
    "Method",
    "RunProgress",
    "compare_methods",
    "diagnose",
    "fit_alone",
    "fit_method",
    "plot_probes",
    "quiet",
    "step_time_ratio",
    "CMLLoss",
    "LFMLoss",
    "MBSDLoss",
    "ContrastiveLoss",
    "CosineHead",
    "MLAFusion",
    "ReconBoostFusion",
    "TokenFusionTransformer",
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
