"""Real Llama shapes for ``zo-bench scale``, built without real weights: on the meta device, then materialised one
module at a time with random values, every projection of an int4 model written directly as a 4-bit layer (see
``scale.py``'s docstring)."""

from __future__ import annotations

import math

import torch
from torch import nn

# Public Hugging Face configs (config.json of each model). vocab 32000 for all four.
SCALE_SHAPES: dict[str, dict[str, int]] = {
    # tiny: --quick only (a CI-sized model of the same family and layout).
    "tiny": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1024,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # openlm-research/open_llama_3b
    "3b": dict(
        hidden_size=3200,
        intermediate_size=8640,
        num_hidden_layers=26,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # meta-llama/Llama-2-7b-hf
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # meta-llama/Llama-2-13b-hf
    "13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
}


GPTQ_GROUP_SIZE = 64  # as zo-quantize's default in this project
NF4_BLOCKSIZE = 64


def llama_scale_config(shape: dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **shape,
    )


def param_count(shape: dict[str, int]) -> int:
    """Parameters of the Llama model of ``shape`` (untied embeddings), from the config alone."""
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


# =====================================================================================================
# building (meta device, then one module at a time)
# =====================================================================================================
def _nf4_linear(
    linear: nn.Linear, init: str, generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_4bit

    out_f, in_f = linear.out_features, linear.in_features
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=False, quant_type="nf4", device="meta"
    )
    if init == "quantize":
        weight = torch.empty(out_f, in_f, device=device).normal_(0.0, 0.02, generator=generator)
        packed, state = quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4")
        state.dtype = dtype
        del weight
    else:  # the same tensors as quantize_4bit returns, with random codes and block maxima of N(0, 0.02)
        numel = out_f * in_f
        packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=generator, device=device)
        absmax = torch.empty(math.ceil(numel / NF4_BLOCKSIZE), device=device).uniform_(0.04, 0.06, generator=generator)
        state = QuantState(
            absmax=absmax,
            shape=torch.Size([out_f, in_f]),
            code=get_4bit_type("nf4", device=device),
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=dtype,
        )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    return layer


def _gptq_linear(linear: nn.Linear, generator: torch.Generator, device: torch.device) -> nn.Module:
    from zo_trainer.quant.gptq import set_cpu_workers

    set_cpu_workers()
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_f, in_f = linear.out_features, linear.in_features
    with torch.device("cpu"):
        layer = TorchLinear(
            bits=4,
            group_size=GPTQ_GROUP_SIZE,
            sym=True,
            desc_act=False,
            in_features=in_f,
            out_features=out_f,
            bias=False,
        )
    low, high = -(2**31), 2**31 - 1
    for name in ("qweight", "qzeros"):  # random packed int4 (8 per int32)
        buffer = getattr(layer, name)
        buffer.copy_(torch.randint(low, high, buffer.shape, dtype=torch.int32, generator=generator))
    layer.scales = torch.empty(layer.scales.shape).uniform_(0.002, 0.004, generator=generator)  # fp32 master
    layer.g_idx.copy_(torch.arange(in_f, dtype=torch.int32) // GPTQ_GROUP_SIZE)
    if hasattr(layer, "post_init"):
        layer.post_init()
    return layer.to(device)  # built on the CPU (one projection at a time), then moved


DENSE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT4_DTYPES = {"nf4_fp16": torch.float16}  # Compute and rest in fp16 (a GPU's NF4); other int4 weights: fp32.
INT4_WEIGHTS = ("nf4", "nf4_fp16", "gptq")


def build_model(
    shape: dict[str, int],
    weights: str,
    seed: int = 0,
    nf4_init: str = "random",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A random Llama of ``shape`` on ``device``: ``weights`` = bf16 | fp16 | fp32 (dense; fp32 = a model loaded as
    Hugging Face loads it by default, the master weights of mixed precision) | nf4 | gptq (int4 projections, fp32 rest)
    | nf4_fp16 (NF4 projections computing in fp16, fp16 rest: how a GPU runs NF4; CUDA).

    Built on the meta device; each module is then materialised on its own directly on ``device`` (an int4
    projection straight into its 4-bit layer), so the peak while building is the model plus one projection.
    """
    from transformers import AutoModelForCausalLM

    config = llama_scale_config(shape)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DENSE_DTYPES.get(weights, INT4_DTYPES.get(weights, torch.float32))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)  # random values drawn where they live
    cpu_generator = generator if device.type == "cpu" else torch.Generator().manual_seed(seed)  # GPTQ: CPU-built
    lm_head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, nn.Linear) and module is not lm_head and weights in INT4_WEIGHTS:
            if weights != "gptq":
                layer = _nf4_linear(module, nf4_init, generator, device, dtype)
            else:
                layer = _gptq_linear(module, cpu_generator, device)
            setattr(model.get_submodule(parent_name), child, layer)
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, dtype=param.dtype, device=device)
            if "norm" in type(module).__name__.lower():
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02, generator=generator)
            setattr(module, pname, nn.Parameter(value, requires_grad=False))
    rotary = model.model.rotary_emb
    with device:  # its inv_freq buffer is computed in __init__, not a parameter to initialise
        model.model.rotary_emb = type(rotary)(config=config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors still on the meta device after building: {left[:5]}")
    if weights in INT4_WEIGHTS:
        from zo_trainer.quant import get_backend

        get_backend(model).prepare(model)  # what load_quantized does: fp32 dequant path, fp32 master scales
    model.eval()
    return model
