"""zo_trainer: memory-efficient zeroth-order fine-tuning (MeZO, Sparse-MeZO, QZO) for Hugging Face Trainer."""

from .engine import ZOEngine, ZOTarget, perturbation_seed, projected_gradient
from .methods import ZO_METHODS, MeZO, QZO, SparseMeZO, ZOMethod, get_method
from .optim import ZOOptimizer
from .trainer import ZOCallback, ZOTrainer
from .training_args import ZO_OPTIMIZERS, ZOTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "ZOEngine",
    "ZOTarget",
    "ZOMethod",
    "MeZO",
    "SparseMeZO",
    "QZO",
    "ZO_METHODS",
    "ZO_OPTIMIZERS",
    "ZOOptimizer",
    "ZOTrainer",
    "ZOCallback",
    "ZOTrainingArguments",
    "get_method",
    "perturbation_seed",
    "projected_gradient",
]
