"""Training, evaluation, ablation and post-hoc prediction."""

from . import distributed
from .ablation import run_ablation
from .config import TrainConfig
from .predict import predict_file
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "distributed", "predict_file", "run_ablation", "train"]
