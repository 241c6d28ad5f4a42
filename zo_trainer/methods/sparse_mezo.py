"""Sparse-MeZO (Liu et al., 2024): perturb and update only the small-magnitude entries of each weight matrix.

Which tensors take part: the weight matrices of the ``nn.Linear`` layers inside the decoder blocks
(attention and MLP projections). Embeddings (tied to ``lm_head`` in most small LLMs) and norm gains stay
frozen: a magnitude rule over vocabulary rows mostly selects rare-token rows, and a small norm gain
is not an unimportant one. Thresholds are fixed once before training (``ZOCallback.on_train_begin``)
at the ``1 - zo_sparsity`` quantile of |W| per matrix; the mask ``|W| <= threshold`` is rebuilt from the
current weights at every forward and update, never stored.
"""

from __future__ import annotations

from torch import nn

from ..engine import ZOTarget, parameter_targets
from .base import ZOMethod


def _is_decoder_linear_weight(name: str, owner: nn.Module) -> bool:
    return isinstance(owner, nn.Linear) and name.endswith(".weight") and "lm_head" not in name


class SparseMeZO(ZOMethod):
    name = "sparse_mezo"
    default_sparsity = 0.8

    def targets(self, model: nn.Module) -> list[ZOTarget]:
        targets = parameter_targets(
            model,
            lambda name, owner, p: p.requires_grad and _is_decoder_linear_weight(name, owner),
        )
        for target in targets:
            target.weight_decay = self.args.weight_decay
        return targets
