"""zo_trainer: memory-efficient zeroth-order fine-tuning (MeZO, Sparse-MeZO, QZO) for Hugging Face Trainer."""

import logging as _logging

# bitsandbytes (imported by transformers' Trainer via peft) logs a WARNING at import on CPUs with AVX512-BF16 when
# the optional `kernels` package, which would download a faster NF4 kernel from the Hub, is absent. Its fallback is
# the path QZO uses anyway (fp32 dequantize), so this one notice is dropped; every other bitsandbytes message stays.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in str(record.msg))

from .engine import ZOEngine, ZOTarget, perturbation_seed, projected_gradient
from .methods import QZO, ZO_METHODS, MethodConfig, MeZO, SparseMeZO, ZOMethod, get_method, register_method
from .optim import ZOOptimizer
from .patch import disable, enable, is_enabled
from .step import zo_step
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
    "register_method",
    "MethodConfig",
    "zo_step",
    "perturbation_seed",
    "projected_gradient",
    "enable",
    "disable",
    "is_enabled",
]
