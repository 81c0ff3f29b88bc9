"""Balancing methods as loss terms mixed into the LightningModule's objective."""

from lightning_balance.losses.base import LossTerm, LossTerms, add_loss_terms, configure_loss_terms
from lightning_balance.losses.cml import CMLLoss

__all__ = ["CMLLoss", "LossTerm", "LossTerms", "add_loss_terms", "configure_loss_terms"]
