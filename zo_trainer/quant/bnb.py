"""bitsandbytes 4-bit (NF4 / FP4) back-end for QZO.

The continuous scale of a bnb 4-bit weight is ``weight.quant_state.absmax`` (one fp32 per block of
64 values, without double quantization).  ``matmul_4bit`` dequantizes from it on every call in the
fp32 path.  ``prepare`` forces that path:

  * ``support_avx512bf16_for_cpu = False`` on every ``Linear4bit``: otherwise the first eval-mode
    forward on a CPU with avx512_bf16 repacks the weight, turns ``absmax`` into bf16 and runs a fused
    bf16 kernel (ZO differences drown in rounding noise);
  * ``compute_dtype = float32``;
  * ``absmax`` -> a plain fp32 master tensor (not an inference tensor);
  * a layer already repacked for the CPU kernel is unpacked back (its absmax was rounded to bf16).

On CUDA a model whose 4-bit layers all compute in fp16 keeps fp16 (compute, norms, embeddings, head): the path
Hugging Face loads for GPU inference, about half the memory of its fp32 rest, GPU kernels that round alike on every
call, and fp16's 11-bit significand (bf16 has 8: it is upcast like on the CPU). ``absmax`` still becomes the fp32
master the kernels read.

Double-quantized absmax (``bnb_4bit_use_double_quant=True``: uint8 codes + a second-level state) is
rejected with a ValueError: reload with ``bnb_4bit_use_double_quant=False``.
"""

from __future__ import annotations

import logging

import torch

from .base import QuantBackend, ScaleTensor, as_fp32_master

logger = logging.getLogger(__name__)

__all__ = ["BnbNF4Backend", "fp16_on_cuda", "is_bnb_4bit_module", "keep_fp32_cpu_path", "nf4_config"]


def is_bnb_4bit_module(module: torch.nn.Module) -> bool:
    mod = type(module).__module__ or ""
    if not mod.startswith("bitsandbytes."):
        return False
    w = getattr(module, "weight", None)
    return type(w).__name__ == "Params4bit" or (type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"))


def fp16_on_cuda(module: torch.nn.Module) -> bool:
    """Whether a 4-bit layer computes in fp16 on a GPU (``prepare`` keeps such a model in fp16)."""
    return module.weight.device.type == "cuda" and getattr(module, "compute_dtype", None) == torch.float16


def _qs(module):
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        qs = getattr(module, "quant_state", None)
    if qs is None:
        raise ValueError(f"{type(module).__name__} has no quant_state (not quantized yet?)")
    return qs


def _make_get(module):
    return lambda: _qs(module).absmax


def _make_set(module):
    def _set(t: torch.Tensor) -> None:
        _qs(module).absmax = t

    return _set


def keep_fp32_cpu_path(model: torch.nn.Module) -> None:
    """A frozen 4-bit base under trainable adapters (the QLoRA layout): keep bnb's fp32 dequantize path on CPU.

    bnb repacks a ``Linear4bit`` for its fused bf16 CPU kernel at the first eval-mode no-grad forward, which
    is every ZO forward: its rounding is as large as the ZO signal (see the module docstring). Only layers
    with an fp32 (or unset) compute dtype are kept on the fp32 path; a bf16 compute dtype is the user's
    choice. Nothing else changes: the base stays frozen, so double quantization is fine here.
    """
    for module in model.modules():
        if is_bnb_4bit_module(module) and getattr(module, "compute_dtype", None) in (None, torch.float32):
            module.support_avx512bf16_for_cpu = False


def nf4_config(quant_type: str = "nf4"):
    """bitsandbytes 4-bit on load as QZO needs it: no double quantization (fp32 absmax), fp32 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
    )


class BnbNF4Backend(QuantBackend):
    name = "nf4"
    aliases = ("nf4", "fp4", "bnb", "bitsandbytes")
    checkpoint_method = "bitsandbytes"

    @classmethod
    def load(cls, path, requested, checkpoint_config, dtype, source=None, **kwargs):
        """Quantize an fp model on load (NF4, or FP4 when ``requested``), or load a saved bnb 4-bit checkpoint."""
        from transformers import AutoModelForCausalLM

        method = str(checkpoint_config.get("quant_method", "")).lower()
        if method and method != "bitsandbytes":
            raise ValueError(
                f"{path} is already a {method.upper()} checkpoint: load it as it is (drop --quantization "
                f"{requested}); --quantization nf4 quantizes an fp16/fp32 model on load"
            )
        if method == "bitsandbytes":
            if checkpoint_config.get("bnb_4bit_use_double_quant"):
                raise ValueError(
                    f"{path} was saved with bnb double quantization; QZO needs "
                    "bnb_4bit_use_double_quant=False: re-quantize from the fp model with --quantization nf4"
                )
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
        quant_type = "fp4" if requested == "fp4" else "nf4"
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=nf4_config(quant_type), dtype=dtype, device_map="cpu", **kwargs
        )

    @staticmethod
    def _is_quant_module(module):
        return is_bnb_4bit_module(module)

    @classmethod
    def matches(cls, model) -> bool:
        return any(is_bnb_4bit_module(m) for m in model.modules())

    def prepare(self, model) -> None:
        mods = self.quantized_modules(model)
        for name, m in mods:
            qs = _qs(m)
            if getattr(qs, "nested", False) or getattr(qs, "state2", None) is not None:
                raise ValueError(
                    f"{name}: bitsandbytes double quantization (bnb_4bit_use_double_quant=True) stores "
                    "absmax as uint8 codes, which QZO cannot perturb. Reload the model with "
                    "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                    "bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32) "
                    "(= zo_trainer.quant.load_quantized(path, 'nf4') / --quantization nf4)."
                )
        keep_fp16 = bool(mods) and all(fp16_on_cuda(m) for _, m in mods)
        for name, m in mods:
            qs = _qs(m)
            if getattr(qs, "packing_format_for_cpu", False):
                # An eval forward already repacked it for the fused bf16 CPU kernel: unpack.
                try:
                    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
                except ImportError:  # pragma: no cover - older/newer bnb layout
                    from bitsandbytes.utils import _convert_weight_packed_for_cpu_inverse  # type: ignore
                try:
                    with torch.inference_mode(False), torch.no_grad():
                        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
                except Exception as e:  # pragma: no cover
                    raise ValueError(
                        f"{name}: weight was repacked for bnb's fused bf16 CPU kernel and cannot be "
                        f"unpacked ({e}); reload the model and call prepare() before any eval forward"
                    ) from e
                logger.warning("%s: unpacked a CPU-repacked NF4 weight (absmax had been rounded to bf16)", name)
                qs = _qs(m)
            m.support_avx512bf16_for_cpu = False
            qs.absmax = as_fp32_master(qs.absmax)
            if keep_fp16:
                continue
            m.compute_dtype = torch.float32
            m.compute_type_is_set = True
            if qs.dtype is not None and qs.dtype != torch.float32:
                qs.dtype = torch.float32  # dtype of the dequantized weight
            if m.bias is not None and m.bias.dtype != torch.float32:
                m.bias.data = m.bias.data.float()
        if keep_fp16:
            return
        # Non-quantized floating params (embeddings, norms, lm_head) -> fp32.
        for mod in model.modules():
            if is_bnb_4bit_module(mod):
                continue
            for _pname, p in list(mod.named_parameters(recurse=False)):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
            for bname, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                    setattr(mod, bname, b.float())

    def scale_tensors(self, model) -> list[ScaleTensor]:
        return [
            ScaleTensor(name=f"{name}.weight.absmax", module=m, get=_make_get(m), set=_make_set(m))
            for name, m in self.quantized_modules(model)
        ]

    def frozen_state(self, model) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.quantized_modules(model):
            out[f"{name}.weight"] = m.weight.data.detach().clone()
            qs = _qs(m)
            if getattr(qs, "code", None) is not None:
                out[f"{name}.weight.quant_map"] = qs.code.detach().clone()
        return out
