"""Int4 quantization back-ends for QZO (Quantized Zeroth-Order fine-tuning, arXiv 2505.13430).

The integer weights stay int4; only the continuous quantization scales (GPTQ ``scales``,
bitsandbytes NF4 ``quant_state.absmax``) are perturbed and updated by the ZO engine.

    model = load_quantized("smol-gptq4", "gptq")        # or (path, "nf4")
    for s in scale_tensors(model):                       # prepare() + handles
        t = s.get(); s.set(t + eps * z); ...; s.set(t)
    save_quantized(model, "out")

Install the libraries with ``scripts/install_quant.sh`` (keeps a CPU torch).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .base import QuantBackend, ScaleTensor
from .bnb import BnbNF4Backend, nf4_config
from .gptq import GPTQBackend

__all__ = [
    "ScaleTensor",
    "QuantBackend",
    "GPTQBackend",
    "BnbNF4Backend",
    "BACKENDS",
    "NO_QUANT_MESSAGE",
    "get_backend",
    "scale_tensors",
    "load_quantized",
    "save_quantized",
    "nf4_config",
]

BACKENDS: tuple[type[QuantBackend], ...] = (GPTQBackend, BnbNF4Backend)

NO_QUANT_MESSAGE = (
    "--optim qzo needs a 4-bit model: quantize with `zo-quantize --model_name_or_path <model> "
    "--bits 4 --group_size 64 --output_dir <dir>` and pass --model_name_or_path <dir>, "
    "or pass --quantization nf4"
)


def get_backend(model) -> Optional[QuantBackend]:
    """The back-end of ``model``'s int4 layers, or None if it has none."""
    for cls in BACKENDS:
        if cls.matches(model):
            return cls()
    return None


def scale_tensors(model) -> list[ScaleTensor]:
    """``prepare(model)`` + the scale handles; ValueError if the model has no quantized layer."""
    backend = get_backend(model)
    if backend is None:
        raise ValueError(NO_QUANT_MESSAGE)
    backend.prepare(model)
    out = backend.scale_tensors(model)
    if not out:
        raise ValueError(NO_QUANT_MESSAGE)
    return out


def _checkpoint_quant_config(path: str) -> dict:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
    except Exception:
        return {}
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return {}
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)


def _backend_for(requested: str | None, checkpoint_method: str) -> type[QuantBackend] | None:
    """The back-end asked for by name, else the one the checkpoint is saved in (None: not quantized)."""
    for cls in BACKENDS:
        if (cls.aliases and requested in cls.aliases) if requested else cls.checkpoint_method == checkpoint_method:
            return cls
    return None


def load_quantized(name_or_path, quantization: str | None = None, dtype=torch.float32, **kwargs):
    """Load a model ready for QZO.

    ``quantization``:
      * ``"nf4"`` / ``"fp4"``: quantize an fp model on load with bitsandbytes (no double quant, fp32
        compute), or load a checkpoint already saved in bnb 4-bit;
      * ``"gptq"`` or None on a GPTQ checkpoint: gptqmodel ``TorchLinear`` kernel (reads ``scales``
        each call), fp32 everywhere; fp32 scales saved by :func:`save_quantized` are restored exactly;
      * None on an unquantized checkpoint: plain ``from_pretrained`` (``get_backend`` -> None).
    The returned model is prepared (``get_backend(model).prepare(model)``) and in eval mode.
    """
    from transformers import AutoModelForCausalLM

    # A folder or Hub id: the embedded default model is resolved by the caller (zo_trainer.models.load_model), so the
    # back-ends never depend on the model-loading layer above them.
    path = os.fspath(name_or_path)
    requested = (quantization or "").lower() or None
    if requested in ("none", "no", "fp32"):
        requested = None
    checkpoint_config = _checkpoint_quant_config(path)
    backend_class = _backend_for(requested, str(checkpoint_config.get("quant_method", "")).lower())
    if backend_class is None:
        if requested is not None:
            raise ValueError(f"unknown quantization {quantization!r}: use 'nf4', 'fp4', 'gptq' or None")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model = backend_class.load(path, requested, checkpoint_config, dtype, source=name_or_path, **kwargs)
    backend = get_backend(model)
    if backend is None:  # pragma: no cover
        raise ValueError(f"loading {path} with quantization={requested!r} produced no quantized layer")
    backend.prepare(model)
    model.eval()
    return model


def save_quantized(model, output_dir) -> None:
    """The model's back-end saves it (``QuantBackend.save``); an unquantized model: ``save_pretrained``."""
    backend = get_backend(model)
    os.makedirs(output_dir, exist_ok=True)
    if backend is None:
        model.save_pretrained(output_dir)
    else:
        backend.save(model, output_dir)
