"""Sparse-MeZO (Liu et al., 2024): perturb and update only the small-magnitude entries of each weight matrix.

Which tensors take part: the projection matrices, i.e. the weights of ``nn.Linear`` layers and of GPT-2's
``Conv1D`` (a linear layer stored transposed: the magnitude rule is per matrix, so the layout does not
matter). In a decoder-only LM these are the attention and MLP projections of the decoder blocks (plus a
task head such as ``score`` when the model has one). The output embedding (``lm_head``, whatever its name,
and anything tied to the input embedding), embeddings, positions, norm gains and biases stay frozen: a
magnitude rule over vocabulary rows mostly selects rare-token rows, and a small norm gain is not an
unimportant one.

With PEFT adapters (a ``PeftModel``), every tensor PEFT marked trainable takes part, as with ``mezo``: the
user chose them. The adapter matrices (``lora_A`` / ``lora_B``) are masked by magnitude; other adapter
tensors (1-D vectors, embedding adapters) are trained densely.

Thresholds are fixed once before training (``ZOCallback.on_train_begin``) at the ``1 - zo_sparsity``
quantile of |W| per matrix; the mask ``|W| <= threshold`` is rebuilt from the current weights at every
forward and update, never stored. A matrix whose |W| is constant at that point (LoRA's zero-initialised
``lora_B``) is trained densely (see ``ZOEngine.set_thresholds``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..engine import ZOTarget, parameter_targets
from .base import MethodConfig, ZOMethod, is_peft_model

PROJECTION_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def embedding_weight_ids(model: nn.Module) -> set[int]:
    """ids of the input and output embedding weights, found by identity whatever their name (GPT-NeoX: embed_out)."""
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            ids.add(id(weight))
    return ids


def is_projection_weight(name: str, owner: nn.Module) -> bool:
    return isinstance(owner, PROJECTION_MODULES) and name.endswith(".weight") and "lm_head" not in name


class SparseMeZO(ZOMethod):
    name = "sparse_mezo"
    default_sparsity = 0.8

    def __init__(self, config: MethodConfig | Any) -> None:
        super().__init__(config)
        self._masked_names: set[str] | None = None  # None: every target is a projection matrix.

    def targets(self, model: nn.Module) -> list[ZOTarget]:
        self.prepare_frozen_quantized_base(model)
        embeddings = embedding_weight_ids(model)
        if is_peft_model(model):
            targets = parameter_targets(model, lambda name, owner, p: p.requires_grad and p.is_floating_point())
            masked = parameter_targets(
                model,
                lambda name, owner, p: p.requires_grad and p.is_floating_point() and is_projection_weight(name, owner),
            )
            self._masked_names = {t.name for t in masked}
        else:
            targets = parameter_targets(
                model,
                lambda name, owner, p: (
                    p.requires_grad
                    and p.is_floating_point()
                    and is_projection_weight(name, owner)
                    and id(p) not in embeddings
                ),
            )
        for target in targets:
            if self._masked_names is None or self.decays(target.name, target.get()):
                target.weight_decay = self.config.weight_decay
        return targets

    def is_sparsified(self, target: ZOTarget) -> bool:
        return self._masked_names is None or target.name in self._masked_names
