"""MeZO (Malladi et al., 2023): dense ZO-SGD over every trainable parameter."""

from __future__ import annotations

from torch import nn

from ..engine import ZOTarget, parameter_targets
from .base import ZOMethod


class MeZO(ZOMethod):
    name = "mezo"

    def targets(self, model: nn.Module) -> list[ZOTarget]:
        # Every parameter the user left trainable, embeddings (tied lm_head) and norms included, as MeZO does.
        # With PEFT that is the adapters: PEFT leaves only them requires_grad=True.
        self.prepare_frozen_quantized_base(model)
        targets = parameter_targets(model, lambda name, owner, p: p.requires_grad and p.is_floating_point())
        for target in targets:
            if self.decays(target.name, target.get()):
                target.weight_decay = self.config.weight_decay
        return targets
