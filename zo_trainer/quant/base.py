"""Common interface of the int4 back-ends used by QZO (Quantized Zeroth-Order fine-tuning).

QZO (arXiv 2505.13430) keeps the integer weights of a 4-bit model frozen and perturbs / updates
only the continuous quantization scales (GPTQ ``scales``, bitsandbytes NF4 ``absmax``).  A back-end
exposes those scales as :class:`ScaleTensor` handles: ``get()`` returns the fp32 master tensor the
kernel reads on every forward (in-place edits show in the next forward), ``set(t)`` rebinds the
tensor the kernel reads without copying (``set(get())`` restores).
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ScaleTensor", "QuantBackend", "as_fp32_master", "copy_tokenizer_files"]


@dataclass
class ScaleTensor:
    name: str  # e.g. "model.layers.0.self_attn.q_proj.scales"
    module: torch.nn.Module  # the quantized linear whose forward reads the tensor
    get: Callable[[], torch.Tensor]  # the fp32 tensor the kernel reads on every call (master copy)
    set: Callable[[torch.Tensor], None]  # rebind the tensor the kernel reads (no copy)

    def __repr__(self) -> str:  # keep reprs short (the module repr is long)
        t = self.get()
        return f"ScaleTensor({self.name!r}, shape={tuple(t.shape)}, dtype={t.dtype})"


def as_fp32_master(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` as a plain (non-inference, no-grad) contiguous fp32 tensor; ``t`` itself when it
    already is one, so repeated calls are no-ops."""
    if t.dtype == torch.float32 and not t.is_inference() and not t.requires_grad and t.is_contiguous():
        return t
    with torch.inference_mode(False), torch.no_grad():
        out = t.detach().to(torch.float32).contiguous()
        if out.is_inference() or out.data_ptr() == t.data_ptr():
            out = out.clone()
    return out


def copy_tokenizer_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> None:
    """Copy the tokenizer (and generation config) files of the model folder ``src`` into ``dst``, if missing."""
    if not src or not os.path.isdir(src):
        return
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in (
            "special_tokens_map.json",
            "chat_template.jinja",
            "generation_config.json",
            "vocab.json",
            "merges.txt",
        ):
            s, d = os.path.join(src, name), os.path.join(dst, name)
            if os.path.isfile(s) and not os.path.exists(d):
                shutil.copy2(s, d)


class QuantBackend(ABC):
    """One int4 format: how to load it, find and prepare its scales, and save it (``zo_trainer.quant`` dispatches)."""

    name: str  # "gptq" | "nf4"
    # ``quantization=`` names (``--quantization``) that select this back-end.
    aliases: tuple[str, ...] = ()
    # The ``quant_method`` of a checkpoint's ``quantization_config`` that this back-end loads.
    checkpoint_method: str = ""

    @classmethod
    @abstractmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """True if ``model`` contains quantized linears of this back-end."""

    @classmethod
    @abstractmethod
    def load(
        cls,
        path: str,
        requested: str | None,
        checkpoint_config: dict,
        dtype: torch.dtype,
        source: Any = None,
        **kwargs: Any,
    ) -> torch.nn.Module:
        """The model at ``path`` in this format (``requested``: the ``quantization`` name asked for, or None when
        the checkpoint's ``checkpoint_config`` chose this back-end; ``source``: the name the user gave)."""

    def save(self, model: torch.nn.Module, output_dir: str | os.PathLike) -> None:
        """A checkpoint ``load`` reads back exactly (default: ``save_pretrained``), with the tokenizer files."""
        model.save_pretrained(output_dir)
        copy_tokenizer_files(getattr(model, "name_or_path", None), output_dir)

    @abstractmethod
    def prepare(self, model: torch.nn.Module) -> None:
        """Make the model QZO-ready (idempotent): fp32 master scales, fp32 dequant path."""

    @abstractmethod
    def scale_tensors(self, model: torch.nn.Module) -> list[ScaleTensor]:
        """Handles on every continuous scale tensor, in module order."""

    @abstractmethod
    def frozen_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Clones of the integer weights / zero points / codes that QZO must never change."""

    def quantized_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if self._is_quant_module(m)]

    @staticmethod
    def _is_quant_module(module: torch.nn.Module) -> bool:  # pragma: no cover - overridden
        return False
