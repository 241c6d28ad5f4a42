"""What a ZO method decides: which tensors take part, which of them are sparsified, how d is clipped."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..engine import ZOTarget

if TYPE_CHECKING:
    from ..training_args import ZOTrainingArguments


class ZOMethod:
    """A zeroth-order method over the shared engine (``zo_trainer.engine.ZOEngine``)."""

    name: ClassVar[str]
    default_sparsity: ClassVar[float] = 0.0
    default_clip: ClassVar[float | None] = None

    def __init__(self, args: "ZOTrainingArguments"):
        self.args = args
        self.sparsity = self.default_sparsity if args.zo_sparsity is None else args.zo_sparsity
        self.clip_value = self.default_clip if args.zo_clip is None else args.zo_clip

    def targets(self, model: nn.Module) -> list[ZOTarget]:
        raise NotImplementedError

    def is_sparsified(self, target: ZOTarget) -> bool:
        """Targets that Sparse-MeZO's magnitude rule applies to (the others stay dense)."""
        return True

    def clip(self, projected_gradients: torch.Tensor) -> torch.Tensor:
        if self.clip_value is None:
            return projected_gradients
        return projected_gradients.clamp(-self.clip_value, self.clip_value)

    @staticmethod
    def decays(name: str, tensor: torch.Tensor) -> bool:
        """HF's rule of thumb: no weight decay on biases and 1-D (norm) parameters."""
        return tensor.dim() >= 2 and not name.endswith("bias")
