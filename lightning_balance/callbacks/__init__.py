"""Lightning callbacks: thin shells around :mod:`lightning_balance.functional`."""

from lightning_balance.callbacks.agm import AGM
from lightning_balance.callbacks.amco import AMCo
from lightning_balance.callbacks.base import GradientBalancingCallback, NonFiniteStatisticsError, StepStatistics
from lightning_balance.callbacks.diagnostics import ModalityDiagnostics
from lightning_balance.callbacks.dropout import ModalityDropout
from lightning_balance.callbacks.gblend import GradientBlending
from lightning_balance.callbacks.greedy import Greedy
from lightning_balance.callbacks.inforeg import InfoReg
from lightning_balance.callbacks.mmpareto import MMPareto
from lightning_balance.callbacks.monitor import ModalityMonitor
from lightning_balance.callbacks.ogm_ge import OGMGE
from lightning_balance.callbacks.opm import OPM
from lightning_balance.callbacks.pmr import PMR
from lightning_balance.callbacks.relearning import Relearning
from lightning_balance.callbacks.valuation import SampleValuation

__all__ = ["AGM", "AMCo", "GradientBalancingCallback", "GradientBlending", "Greedy", "InfoReg", "MMPareto", "ModalityDiagnostics", "ModalityDropout", "ModalityMonitor", "NonFiniteStatisticsError", "OGMGE", "OPM", "PMR", "Relearning", "SampleValuation", "StepStatistics"]
