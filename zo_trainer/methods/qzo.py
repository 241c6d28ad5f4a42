"""QZO (Shang et al., 2025): ZO fine-tuning of int4 models through their continuous quantization scales.

The integer weights never change; only the scales (GPTQ ``scales``, bitsandbytes NF4 ``absmax``) are
perturbed and updated, in an fp32 master copy, and kept strictly positive. The directional derivative
is clipped to [-zo_clip, zo_clip] (default 100, the paper's value). With ``zo_sparsity > 0`` the
smallest-magnitude scales of each layer are the only ones perturbed (Sparse QZO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import ZOTarget, parameter_targets
from .base import MethodConfig, ZOMethod, _arg, is_peft_model

PEFT_QZO_MESSAGE = (
    "optim='qzo' trains the quantization scales of the 4-bit base model, which a PEFT adapter cannot save or "
    "reload; to train LoRA adapters (also on a 4-bit base, the QLoRA layout) use optim='mezo' or 'sparse_mezo', "
    "or run qzo on the quantized model without adapters."
)


@dataclass
class QZOConfig(MethodConfig):
    train_unquantized: bool = _arg("zo_train_unquantized", default=False)


class QZO(ZOMethod):
    name = "qzo"
    config_class = QZOConfig
    config: QZOConfig
    default_clip = 100.0

    def targets(self, model: nn.Module) -> list[ZOTarget]:
        from ..quant import scale_tensors

        if is_peft_model(model):
            # The trained scales live in the base model, which a PEFT adapter neither saves nor reloads:
            # PeftModel.from_pretrained(base, dir) would silently give back the untrained scales.
            raise ValueError(PEFT_QZO_MESSAGE)
        scales = scale_tensors(model)
        tiny = torch.finfo(torch.float32).tiny
        targets = [ZOTarget(name=s.name, modules=(s.module,), get=s.get, set=s.set, min_value=tiny) for s in scales]
        if self.config.train_unquantized:
            # Norms, embeddings and lm_head are ordinary tensors: the dense MeZO update, as the paper does for AQLM.
            targets += parameter_targets(model, lambda name, owner, p: p.is_floating_point() and p.dim() >= 1)
        return targets

    def is_sparsified(self, target: ZOTarget) -> bool:
        return target.min_value is not None  # Only the scales.
