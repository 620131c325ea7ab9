"""Training SAN with the official recipe (``ovss train-san``): data and augmentation, Hungarian
matching, losses, optimizer, the loop with checkpoints, resume and torchrun, logs and plots."""
from __future__ import annotations

from .loop import TrainOptions, TrainResult, train_san

__all__ = ["TrainOptions", "TrainResult", "train_san"]
