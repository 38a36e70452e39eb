"""The training engine: one loop, its config and metrics."""
from .config import TrainConfig
from .loop import Trainer, default_loss, evaluate_classification
from .metrics import classification_metrics

__all__ = ["Trainer", "TrainConfig", "default_loss", "evaluate_classification", "classification_metrics"]
