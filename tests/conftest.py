"""Shared fixtures: tiny random Llama models and an offline tokenizer (no download), the real RTE data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
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

    from zo_trainer.tasks import get_task

    task = get_task("rte")
    rows = [json.loads(line) for line in (rte_dir / "train.jsonl").read_text().splitlines()[:400]]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=1500, special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"])
    tok.train_from_iterator([task.format_prompt(r) for r in rows] + ["Yes No"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def make_tiny_llama(vocab_size: int = 1500, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
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
    return LlamaForCausalLM(config).to(dtype)


@pytest.fixture
def tiny_llama_factory():
    return make_tiny_llama
