"""Lightning callbacks: thin shells around :mod:`lightning_balance.functional`."""

from lightning_balance.callbacks.base import GradientBalancingCallback, NonFiniteStatisticsError, StepStatistics
from lightning_balance.callbacks.monitor import ModalityMonitor
from lightning_balance.callbacks.ogm_ge import OGMGE

__all__ = ["GradientBalancingCallback", "ModalityMonitor", "NonFiniteStatisticsError", "OGMGE", "StepStatistics"]
