"""Models and batches the suites measure: random Llama shapes, the tiny --quick model, SmolLM2 in fp32 / GPTQ /
NF4, and collated batches of real RTE prompts."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .common import default_rte_dir, log_line

# SmolLM2-family Llama shapes (vocab 49152, tied embeddings). 135M and 360M are the real SmolLM2 shapes.
GROWTH_CONFIGS: dict[str, dict[str, int]] = {
    "10M": dict(
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
    ),
    "35M": dict(
        hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024
    ),
    "135M": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
    "360M": dict(
        hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560
    ),
}


TINY_CONFIG = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)


def bench_tokenizer():
    from transformers import AutoTokenizer

    from zo_trainer.models import ensure_default_model, ensure_pad_token

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    ensure_pad_token(tok)
    tok.padding_side = "left"
    return tok


def llama_config(shape: dict[str, int], vocab_size: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **shape,
    )


def random_model(shape: dict[str, int], seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.float32)
    model.eval()
    return model


def tiny_model_dir(root: Path) -> Path:
    """A tiny random SmolLM2-shaped Llama (with the real tokenizer) saved to ``root``: for --quick runs."""
    path = root / "tiny-llama"
    if (path / "config.json").exists():
        return path
    model = random_model(TINY_CONFIG)
    model.save_pretrained(path)
    bench_tokenizer().save_pretrained(path)
    return path


def rte_batch(tokenizer, batch_size: int, max_length: int, data_dir: str | None, seed: int = 0):
    """A collated batch of real RTE train prompts (candidate scoring), as the trainer sees it."""
    from zo_trainer.data import CandidateCollator, tokenize_example
    from zo_trainer.tasks import get_task

    task = get_task("rte")
    data_dir = data_dir or default_rte_dir()
    lines = Path(data_dir, "train.jsonl").read_text().splitlines()
    rng = random.Random(seed)
    rows = [json.loads(lines[i]) for i in rng.sample(range(len(lines)), batch_size)]
    features = [tokenize_example(tokenizer, task, row, max_length) for row in rows]
    for f in features:
        f["labels"] = f.pop("label")
    return CandidateCollator(tokenizer)(features)


def load_bench_model(kind: str, quick: bool, work: Path):
    """kind: fp32 | nf4 | gptq -> model (eval mode). quick: a tiny random model (GPTQ quantized on the fly)."""
    from zo_trainer.models import ensure_default_model
    from zo_trainer.quant import load_quantized

    src = tiny_model_dir(work) if quick else ensure_default_model()
    if kind == "fp32":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        model.eval()
        return model
    if kind == "nf4":
        return load_quantized(str(src), "nf4")
    if kind == "gptq":
        return load_quantized(str(gptq_dir(quick, work, src)), "gptq")
    raise ValueError(kind)


def gptq_dir(quick: bool, work: Path, src: Path) -> Path:
    """A GPTQ int4 (group 64) checkpoint of ``src``, made once with zo-quantize and cached."""
    cache = Path(os.environ.get("ZO_BENCH_CACHE", Path.home() / ".cache" / "zo_trainer_bench"))
    out = cache / ("tiny-gptq4-g64" if quick else "smol-gptq4-g64")
    if (out / "quantize_config.json").exists():
        return out
    from zo_trainer.cli.quantize import quantize

    lines = Path(default_rte_dir(), "train.jsonl").read_text().splitlines()
    texts = [json.loads(line)["premise"] for line in lines[: (8 if quick else 32)]]
    log_line(f"quantizing {src} to GPTQ int4 (group 64) -> {out}")
    quantize(str(src), str(out), texts, bits=4, group_size=64, max_length=128)
    return out
