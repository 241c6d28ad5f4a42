"""What a ZO method decides: which tensors take part, which of them are sparsified, how d is clipped."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine import ZOTarget


def _arg(name: str, **kwargs: Any) -> Any:
    """A config field read from the training argument ``name`` (see ``MethodConfig.from_training_args``)."""
    return field(metadata={"arg": name}, **kwargs)


@dataclass
class MethodConfig:
    """The settings a ZO method reads (PEFT-style), each the value of one ``ZOTrainingArguments`` field.

    ``None`` means the method's default (``ZOMethod.default_sparsity`` / ``default_clip``). A method with more
    settings subclasses this and names it as its ``config_class`` (see ``QZOConfig``).
    """

    sparsity: float | None = _arg("zo_sparsity", default=None)
    clip: float | None = _arg("zo_clip", default=None)
    weight_decay: float = _arg("weight_decay", default=0.0)

    @classmethod
    def from_training_args(cls, args: Any) -> MethodConfig:
        """The one place training arguments become a method's settings: ``args`` is a ``ZOTrainingArguments`` or a
        mapping of its field names (a trajectory's ``method_args``); missing or ``None`` values keep the default."""
        if isinstance(args, Mapping):
            values = {f.name: args.get(f.metadata["arg"]) for f in dataclasses.fields(cls)}
        else:
            values = {f.name: getattr(args, f.metadata["arg"], None) for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    def to_training_args(self) -> dict[str, Any]:
        """The settings under their training-argument names (what a trajectory records as ``method_args``)."""
        return {f.metadata["arg"]: getattr(self, f.name) for f in dataclasses.fields(self)}


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT ``PeftModel`` (or a transformers model with adapters from ``load_adapter``): both carry ``peft_config``.

    Its trainable tensors are the ones PEFT left ``requires_grad=True`` when it wrapped the model (the
    adapters, plus any ``modules_to_save``); methods read that marker before ``ZOTrainer`` turns it off.
    """
    return bool(getattr(model, "peft_config", None))


class ZOMethod:
    """A zeroth-order method over the shared engine (``zo_trainer.engine.ZOEngine``)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    default_sparsity: ClassVar[float] = 0.0
    default_clip: ClassVar[float | None] = None

    def __init__(self, config: MethodConfig | Any):
        """``config``: this method's ``config_class``, or training arguments to build it from."""
        if not isinstance(config, self.config_class):
            config = self.config_class.from_training_args(config)
        self.config = config
        self.sparsity = self.default_sparsity if config.sparsity is None else config.sparsity
        self.clip_value = self.default_clip if config.clip is None else config.clip

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
