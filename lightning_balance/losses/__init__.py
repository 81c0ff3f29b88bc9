"""Balancing methods as loss terms mixed into the LightningModule's objective."""

from lightning_balance.losses.base import LossTerm, LossTerms, add_loss_terms, configure_loss_terms
from lightning_balance.losses.cml import CMLLoss
from lightning_balance.losses.contrastive import ContrastiveLoss
from lightning_balance.losses.distill import CrossModalDistillation, distill_encoder
from lightning_balance.losses.ebr import ExplicitBasisReallocation
from lightning_balance.losses.lfm import LFMLoss
from lightning_balance.losses.mbsd import MBSDLoss
from lightning_balance.losses.reconstruction import ReconstructionLoss
from lightning_balance.losses.umt import UMTLoss, UnimodalEnsemble, choose_ume_or_umt, fit_unimodal_teachers

__all__ = ["CMLLoss", "ContrastiveLoss", "CrossModalDistillation", "ExplicitBasisReallocation", "LFMLoss", "MBSDLoss", "ReconstructionLoss", "LossTerm", "LossTerms", "UMTLoss", "UnimodalEnsemble", "add_loss_terms", "choose_ume_or_umt", "distill_encoder",
           "configure_loss_terms", "fit_unimodal_teachers"]
