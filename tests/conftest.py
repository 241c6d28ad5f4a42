"""Shared fixtures: tiny random Llama models and an offline tokenizer (no download), the real RTE data, and the
real SmolLM2-135M in int4 (GPTQ group 64, quantized once per session by zo-quantize; bitsandbytes NF4).

Set ZO_QUANT_TEST_GPTQ_DIR=<dir> to reuse an existing GPTQ checkpoint instead of quantizing (~1.5-2 min on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from zo_trainer import ZOTrainer, ZOTrainingArguments
from zo_trainer.data import CandidateCollator, compute_accuracy, load_task_splits, prepare_dataset
from zo_trainer.quant.gptq import set_cpu_workers
from zo_trainer.tasks import get_task

set_cpu_workers()  # Before any test imports gptqmodel.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RTE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "superglue" / "rte"


@pytest.fixture(scope="session")
def rte_dir() -> Path:
    if not (RTE_DIR / "train.jsonl").is_file():
        pytest.skip(f"RTE data not found at {RTE_DIR}")
    return RTE_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer(rte_dir):
    """A real fast word-level tokenizer trained offline on RTE prompts; adds BOS, pads with [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    task = get_task("rte")
    rows = [json.loads(line) for line in (rte_dir / "train.jsonl").read_text().splitlines()[:400]]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=1500, special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"])
    tok.train_from_iterator([task.format_prompt(r) for r in rows] + ["Yes No"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def make_tiny_llama(vocab_size: int = 1500, dtype: torch.dtype = torch.float32, seed: int = 0, **config):
    """The tests' tiny random Llama (2 layers, hidden 32), seeded; ``config`` overrides ``LlamaConfig`` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings)).to(dtype)


def random_lm_rows(vocab_size: int, count: int = 8, length: int = 16, seed: int = 0) -> list[dict]:
    """``count`` rows of random token ids (labels = inputs) for causal-LM training steps."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


@pytest.fixture
def tiny_llama_factory():
    return make_tiny_llama


# --------------------------------------------------------------------------- ZOTrainer on tiny models
@pytest.fixture(scope="module")
def rte_small(rte_dir, tiny_tokenizer):
    task = get_task("rte")
    splits = load_task_splits(task, rte_dir, num_train=16, num_dev=8, num_eval=8, data_seed=0)
    return {k: prepare_dataset(tiny_tokenizer, task, v, max_length=96) for k, v in splits.items()}


def make_trainer(tmp_path, tokenizer, data, model, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        optim="mezo",
        learning_rate=1e-3,
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        disable_tqdm=True,
    )
    settings.update(overrides)
    args = ZOTrainingArguments(**settings)
    return ZOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["dev"],
        processing_class=tokenizer,
        data_collator=CandidateCollator(tokenizer),
        compute_metrics=compute_accuracy,
    )


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- int4 SmolLM2 (QZO)
HAS_GPTQ = all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def rte_texts(n: int, offset: int = 0) -> list[str]:
    """``n`` RTE prompts (from the train split) as plain text: calibration data and LM-loss batches."""
    path = RTE_DIR / "train.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()[offset : offset + n]]
        return [get_task("rte").format_prompt(r) for r in rows]
    return [f"Sentence number {i}: the cat sat on the mat.\nIs that true? Yes or No?\n" for i in range(n)]


@pytest.fixture(scope="session")
def base_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as an fp32 Hugging Face directory."""
    from zo_trainer.models import ensure_default_model

    return str(ensure_default_model())


@pytest.fixture(scope="session")
def gptq_dir(base_dir, tmp_path_factory) -> str:
    """SmolLM2 GPTQ-quantized once per session (4 bit, group 64) by ``zo_trainer.cli.quantize.quantize``."""
    if not HAS_GPTQ:
        pytest.skip("gptqmodel/optimum not importable: run scripts/install_quant.sh")
    reuse = os.environ.get("ZO_QUANT_TEST_GPTQ_DIR")
    if reuse and (Path(reuse) / "config.json").exists():
        return reuse
    from zo_trainer.cli.quantize import quantize
    from zo_trainer.models import _file_lock  # the lock zo-train's model cache takes

    # Under pytest-xdist (CI's `-n 2`) the workers share one checkpoint: the first quantizes it under a lock in the
    # run's common temp folder, the others wait and reuse it (as zo-train's model cache does).
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    root = shared / "gptq" if shared else tmp_path_factory.mktemp("gptq")
    out = root / "smol-gptq4-g64"
    with _file_lock(root / ".lock"):
        if not (out / "config.json").exists():
            quantize(base_dir, str(out), rte_texts(4), bits=4, group_size=64, max_length=64, batch_size=4)
    return str(out)


@pytest.fixture(scope="session")
def gptq_model(gptq_dir):
    """Shared, prepared GPTQ model: tests that change its scales must restore them."""
    from zo_trainer.quant import load_quantized

    return load_quantized(gptq_dir, "gptq")


@pytest.fixture(scope="session")
def nf4_model(base_dir):
    """Shared, prepared NF4 model: tests that change its absmax must restore it."""
    if not HAS_BNB:
        pytest.skip("bitsandbytes not importable: run scripts/install_quant.sh")
    from zo_trainer.quant import load_quantized

    return load_quantized(base_dir, "nf4")


def zo_bench(*args, env: dict[str, str] | None = None, cwd=None, timeout: float = 300):
    """Run the installed ``zo-bench`` console script (one torch thread); stdout and stderr captured as text."""
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(Path(sys.executable).with_name("zo-bench")), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
