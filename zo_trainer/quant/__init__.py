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

import json
import os
from typing import Optional

import torch

from .base import QuantBackend, ScaleTensor
from .bnb import BnbNF4Backend
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

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))


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


def nf4_config(quant_type: str = "nf4"):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
    )


def _resolve(name_or_path) -> str:
    try:
        from ..models import resolve_model_path
    except ImportError:  # pragma: no cover - models.py not there yet
        return os.fspath(name_or_path)
    return resolve_model_path(name_or_path)


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

    path = _resolve(name_or_path)
    q = (quantization or "").lower() or None
    ckpt_qc = _checkpoint_quant_config(path)
    method = str(ckpt_qc.get("quant_method", "")).lower()
    if q in ("none", "no", "fp32"):
        q = None
    if q is None and method:
        q = "gptq" if method == "gptq" else ("nf4" if method == "bitsandbytes" else q)

    if q in ("nf4", "fp4", "bnb", "bitsandbytes"):
        if method and method != "bitsandbytes":
            raise ValueError(
                f"{path} is already a {method.upper()} checkpoint: load it as it is (drop --quantization "
                f"{quantization}); --quantization nf4 quantizes an fp16/fp32 model on load")
        if method == "bitsandbytes":
            if ckpt_qc.get("bnb_4bit_use_double_quant"):
                raise ValueError(
                    f"{path} was saved with bnb double quantization; QZO needs "
                    "bnb_4bit_use_double_quant=False: re-quantize from the fp model with --quantization nf4")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
        else:
            qt = "fp4" if q == "fp4" else "nf4"
            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=nf4_config(qt), dtype=dtype, device_map="cpu", **kwargs)
    elif q == "gptq":
        if method != "gptq":
            raise ValueError(
                f"{path} is not a GPTQ checkpoint; quantize it first with `zo-quantize "
                f"--model_name_or_path {name_or_path} --bits 4 --group_size 64 --output_dir <dir>`")
        from transformers import GPTQConfig

        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        qconf = GPTQConfig(bits=int(ckpt_qc.get("bits", 4)), backend="torch")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconf, dtype=dtype, **kwargs)
        from .gptq import load_fp32_scales

        load_fp32_scales(model, path)
    elif q is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    else:
        raise ValueError(f"unknown quantization {quantization!r}: use 'nf4', 'fp4', 'gptq' or None")

    backend = get_backend(model)
    if backend is None:  # pragma: no cover
        raise ValueError(f"loading {path} with quantization={q!r} produced no quantized layer")
    backend.prepare(model)
    model.eval()
    return model


def save_quantized(model, output_dir) -> None:
    """GPTQ: a v1 GPTQ checkpoint with the current (fp32) scales, loadable with from_pretrained
    (exactly with :func:`load_quantized`); NF4: ``save_pretrained`` (bnb serializes the fp32 absmax)."""
    backend = get_backend(model)
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(backend, GPTQBackend):
        from .gptq import copy_tokenizer_files, save_gptq

        save_gptq(model, output_dir)
        copy_tokenizer_files(getattr(model, "name_or_path", None), output_dir)
    else:
        model.save_pretrained(output_dir)
        if backend is not None:
            from .gptq import copy_tokenizer_files

            copy_tokenizer_files(getattr(model, "name_or_path", None), output_dir)
