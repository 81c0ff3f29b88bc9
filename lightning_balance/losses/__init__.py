"""Balancing methods as loss terms mixed into the LightningModule's objective."""

from lightning_balance.losses.base import LossTerm, LossTerms, add_loss_terms, configure_loss_terms
from lightning_balance.losses.cml import CMLLoss
from lightning_balance.losses.contrastive import ContrastiveLoss
from lightning_balance.losses.reconstruction import ReconstructionLoss

__all__ = ["CMLLoss", "ContrastiveLoss", "ReconstructionLoss", "LossTerm", "LossTerms", "add_loss_terms", "configure_loss_terms"]
