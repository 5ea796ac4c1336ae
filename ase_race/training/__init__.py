"""Training: the config, losses, the one-network loop with exact resume, the posterior methods,
data parallelism, and ``fit``/``train`` from data in memory or on disk."""

from .api import as_frames, fit, prepare, train
from .config import TrainConfig
from .losses import LossWeights, compute_loss
from .loop import Trainer, TrainingHooks

__all__ = ["LossWeights", "TrainConfig", "Trainer", "TrainingHooks", "as_frames", "compute_loss", "fit", "prepare", "train"]
