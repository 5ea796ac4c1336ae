"""Training: losses, the training loop with exact resume, data parallelism, ``train()``."""

from .api import prepare, train
from .losses import LossWeights, compute_loss
from .loop import Trainer

__all__ = ["LossWeights", "Trainer", "compute_loss", "prepare", "train"]
