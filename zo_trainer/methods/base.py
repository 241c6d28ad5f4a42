"""What a ZO method decides: which tensors take part, which of them are sparsified, how d is clipped."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..engine import ZOTarget

if TYPE_CHECKING:
    from ..training_args import ZOTrainingArguments


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT ``PeftModel`` (or a transformers model with adapters from ``load_adapter``): both carry ``peft_config``.

    Its trainable tensors are the ones PEFT left ``requires_grad=True`` when it wrapped the model (the
    adapters, plus any ``modules_to_save``); methods read that marker before ``ZOTrainer`` turns it off.
    """
    return bool(getattr(model, "peft_config", None))


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

    @staticmethod
    def prepare_frozen_quantized_base(model: nn.Module) -> None:
        """Adapters over a 4-bit base (QLoRA): the base stays frozen but must be read in fp32 on CPU."""
        from ..quant.bnb import keep_fp32_cpu_path

        keep_fp32_cpu_path(model)

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
