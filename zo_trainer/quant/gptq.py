"""GPTQ back-end for QZO (gptqmodel ``TorchLinear`` kernel).

Only gptqmodel's pure-torch ``TorchLinear`` is accepted: its forward dequantizes
``scales[g_idx] * (w - zeros[g_idx])`` from ``self.scales`` on every call, so rebinding or editing
the buffer shows in the next forward.  Other kernels are rejected by :meth:`GPTQBackend.prepare`
with a message naming the fix: Marlin / Machete / ExLlama / ATen int4pack pre-pack the scales (edits
have no effect), the CPU AVX512 kernel runs bf16 activations (the ZO difference drowns in rounding
noise) and needs ``in_features % group_size == 0``.  Load with
``zo_trainer.quant.load_quantized(path, "gptq")`` or ``GPTQConfig(bits=4, backend="torch")``.

``prepare`` makes the model QZO-ready:
  * every floating parameter / buffer -> fp32 (a GPTQ model loaded in fp16/bf16 is upcast),
  * ``scales`` -> plain fp32 master tensors,
  * the ``torch.compile`` wrapper gptqmodel installs on ``dequantize_weight`` is removed (on CPU it
    costs ~20 s per shape and hits the recompile limit), streaming / Triton paths are disabled.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import torch

from .base import QuantBackend, ScaleTensor, as_fp32_master, copy_tokenizer_files

logger = logging.getLogger(__name__)

__all__ = ["GPTQBackend", "is_gptq_module", "is_torch_linear", "save_gptq", "load_fp32_scales", "set_cpu_workers"]


def set_cpu_workers() -> None:
    """gptqmodel's CPU worker pool: 2 unless GPTQMODEL_CPU_WORKERS is set. Its default takes every core, and fewer
    than 2 fails to load a model ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").

    Call before gptqmodel is imported (it reads the variable then): ``GPTQBackend.load`` and ``zo-quantize`` do.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


_FIX = (
    "reload the checkpoint with zo_trainer.quant.load_quantized(path, 'gptq') "
    "(= from_pretrained(path, quantization_config=GPTQConfig(bits=4, backend='torch'))), "
    "which uses gptqmodel's TorchLinear kernel that reads fp32 `scales` on every call"
)


def is_gptq_module(module: torch.nn.Module) -> bool:
    """A gptqmodel quantized linear (any kernel), detected without importing gptqmodel."""
    mod = type(module).__module__ or ""
    return mod.startswith("gptqmodel.") and hasattr(module, "qweight") and hasattr(module, "scales")


def is_torch_linear(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "TorchLinear" and cls.__module__ == "gptqmodel.nn_modules.qlinear.torch"


def _make_get(module):
    return lambda: module.scales


def _make_set(module):
    def _set(t: torch.Tensor) -> None:
        module.scales = t  # registered buffer: nn.Module.__setattr__ rebinds _buffers["scales"]

    return _set


class GPTQBackend(QuantBackend):
    name = "gptq"
    aliases = ("gptq",)
    checkpoint_method = "gptq"

    @classmethod
    def load(cls, path, requested, checkpoint_config, dtype, source=None, **kwargs):
        """gptqmodel's ``TorchLinear`` kernel (reads ``scales`` each call); fp32 scales from ``save`` restored."""
        if str(checkpoint_config.get("quant_method", "")).lower() != "gptq":
            raise ValueError(
                f"{path} is not a GPTQ checkpoint; quantize it first with `zo-quantize "
                f"--model_name_or_path {source} --bits 4 --group_size 64 --output_dir <dir>`"
            )
        from transformers import AutoModelForCausalLM, GPTQConfig

        set_cpu_workers()
        qconf = GPTQConfig(bits=int(checkpoint_config.get("bits", 4)), backend="torch")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconf, dtype=dtype, **kwargs)
        load_fp32_scales(model, path)
        return model

    def save(self, model, output_dir) -> None:
        """A v1 GPTQ checkpoint with the current (fp32) scales, loadable with from_pretrained."""
        save_gptq(model, output_dir)
        copy_tokenizer_files(getattr(model, "name_or_path", None), output_dir)

    @staticmethod
    def _is_quant_module(module):
        return is_gptq_module(module)

    @classmethod
    def matches(cls, model) -> bool:
        return any(is_gptq_module(m) for m in model.modules())

    def prepare(self, model) -> None:
        mods = self.quantized_modules(model)
        bad = sorted({type(m).__name__ for _, m in mods if not is_torch_linear(m)})
        if bad:
            raise ValueError(
                f"QZO cannot use the GPTQ kernel(s) {bad}: they pre-pack the scales or compute in "
                f"bf16/fp16, so perturbing `scales` has no (or only noisy) effect. Fix: {_FIX}."
            )
        for name, m in mods:
            if getattr(m, "adapter", None):
                raise ValueError(f"{name}: GPTQ layers with a LoRA/EoRA adapter are not supported by QZO")
            if m.bits != 4:
                logger.warning("%s: %d-bit GPTQ layer (QZO is meant for int4)", name, m.bits)
        # Non-quantized weights (embeddings, norms, lm_head) and bias -> fp32: fp32 dequant path.
        if any(
            t.is_floating_point() and t.dtype != torch.float32 for t in list(model.parameters()) + list(model.buffers())
        ):
            torch.nn.Module.float(model)  # model.float() is blocked for quantized HF models
        for _name, m in mods:
            m.scales = as_fp32_master(m.scales)
            # drop the torch.compile wrapper installed by TorchLinear.optimize(): eager dequant
            m.__dict__.pop("dequantize_weight", None)
            m.optimized = True
            m._streaming_enabled = False
            m._triton_dequant_enabled = False
            if hasattr(m, "clear_weight_cache"):
                m.clear_weight_cache()
        if getattr(model, "config", None) is not None:
            model.config.dtype = torch.float32

    def scale_tensors(self, model) -> list[ScaleTensor]:
        return [
            ScaleTensor(name=f"{name}.scales", module=m, get=_make_get(m), set=_make_set(m))
            for name, m in self.quantized_modules(model)
        ]

    def frozen_state(self, model) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.quantized_modules(model):
            for attr in ("qweight", "qzeros", "g_idx"):
                t = getattr(m, attr, None)
                if t is not None:
                    out[f"{name}.{attr}"] = t.detach().clone()
        return out


# --------------------------------------------------------------------------- #
# Save / load with fp32 scales
# --------------------------------------------------------------------------- #
def _v2_to_v1_qzeros(m) -> torch.Tensor:
    """gptqmodel keeps zero points in its internal v2 layout (zero+1 folded in); checkpoints with
    ``format == "gptq"`` store v1.  Returns a v1 copy without touching the module."""
    qz = m.qzeros.detach()
    fmt = m.qzero_format() if hasattr(m, "qzero_format") else 2
    if fmt == 1:
        return qz.clone()
    bits = m.bits
    if bits not in (2, 4, 8) or qz.dtype != torch.int32:
        raise ValueError(f"save_quantized: unsupported GPTQ layout bits={bits} pack={qz.dtype}")
    pattern = sum(1 << (bits * i) for i in range(32 // bits))
    return _sub_wrap_int32(qz, pattern)


def _sub_wrap_int32(a: torch.Tensor, b: int) -> torch.Tensor:
    x = a.to(torch.int64) - b
    x = torch.remainder(x, 1 << 32)
    x = torch.where(x >= (1 << 31), x - (1 << 32), x)
    return x.to(torch.int32)


def save_gptq(model, output_dir) -> None:
    """Save a GPTQ model (TorchLinear) as a v1 ``format: gptq`` checkpoint with fp32 ``scales``.

    ``from_pretrained`` loads it (scales are cast to the buffer dtype, fp16); use
    :func:`zo_trainer.quant.load_quantized` to get the fp32 scales back bit-exactly.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    mods = dict(GPTQBackend().quantized_modules(model))
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v
    for name, m in mods.items():
        sd[f"{name}.qzeros"] = _v2_to_v1_qzeros(m)
        sd[f"{name}.scales"] = m.scales.detach().to(torch.float32).contiguous()
    qcfg = getattr(model.config, "quantization_config", None)
    qd = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(qcfg or {})
    # keep the on-disk format v1; drop load-time-only fields
    qd["format"] = "gptq"
    if "checkpoint_format" in qd:
        qd["checkpoint_format"] = "gptq"
    for key in ("backend", "use_exllama", "exllama_config", "use_cuda_fp16", "tokenizer", "dataset"):
        qd.pop(key, None)
    # Write the tensors ourselves: transformers' save_pretrained re-applies its load-time weight
    # conversions in reverse and would store the internal v2 zero points under `format: gptq`.
    from safetensors.torch import save_file

    if getattr(model.config, "tie_word_embeddings", False):
        try:
            out_emb = model.get_output_embeddings()
            in_emb = model.get_input_embeddings()
            if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
                for k in [k for k in sd if k.endswith("lm_head.weight")]:
                    del sd[k]
        except Exception:  # pragma: no cover
            pass
    seen = {}
    tensors = {}
    for k, v in sd.items():
        v = v.detach().contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen[v.data_ptr()] = k
        tensors[k] = v
    for f in output_dir.glob("model*.safetensors"):
        f.unlink()
    (output_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    old = model.config.quantization_config
    try:
        model.config.quantization_config = qd
        model.config.save_pretrained(output_dir)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(output_dir)
            except Exception:  # pragma: no cover
                pass
    finally:
        model.config.quantization_config = old
    # make sure config.json carries the on-disk GPTQ config
    cfg_path = output_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {**cfg.get("quantization_config", {}), **qd}
    cfg["quantization_config"].pop("backend", None)
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, default=str))
    src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if src and os.path.isdir(src) and os.path.exists(os.path.join(src, "quantize_config.json")):
        qc = json.loads(pathlib.Path(src, "quantize_config.json").read_text())
        qc["format"] = qc.get("format", "gptq")
        (output_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2))


def load_fp32_scales(model, path) -> int:
    """After ``from_pretrained`` of a checkpoint written by :func:`save_gptq`, rebind the fp16
    ``scales`` buffers to the fp32 values stored on disk.  Returns how many were restored."""
    from safetensors import safe_open

    files = sorted(pathlib.Path(path).glob("*.safetensors")) if os.path.isdir(path) else []
    if not files:
        return 0
    mods = dict(GPTQBackend().quantized_modules(model))
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                if not key.endswith(".scales"):
                    continue
                mname = key[: -len(".scales")]
                m = mods.get(mname)
                if m is None:
                    continue
                sl = fh.get_slice(key)
                if sl.get_dtype() != "F32":
                    continue
                m.scales = fh.get_tensor(key).to(torch.float32).contiguous()
                n += 1
    return n
