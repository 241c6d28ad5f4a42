"""Sequence classification with a classification head, written the way transformers' examples/pytorch/
text-classification/run_glue.py is (HfArgumentParser over model / data / TrainingArguments,
AutoModelForSequenceClassification, dynamic padding with DataCollatorWithPadding, the raw text column left in the
dataset for Trainer's remove_unused_columns to drop, plain Trainer), cut down to local csv/json files. It knows
nothing of zo_trainer: tests run it unmodified with `python` and with `zo-run`.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model or model identifier."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A csv or json file with a 'sentence' and a 'label' column."})
    validation_file: str | None = field(default=None, metadata={"help": "The same for evaluation."})
    max_seq_length: int = field(default=64, metadata={"help": "Longer sentences are truncated."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "False: pad each batch to its longest."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file}
    if data_args.validation_file is not None:
        data_files["validation"] = data_args.validation_file
    extension = data_args.train_file.rsplit(".", 1)[-1]
    raw_datasets = datasets.load_dataset("csv" if extension == "csv" else "json", data_files=data_files)

    label_list = sorted(raw_datasets["train"].unique("label"))
    num_labels = len(label_list)

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    label_to_id = {v: i for i, v in enumerate(label_list)}
    model.config.label2id = label_to_id
    model.config.id2label = {i: str(v) for v, i in label_to_id.items()}
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess_function(examples):
        result = tokenizer(examples["sentence"], padding=padding, max_length=data_args.max_seq_length, truncation=True)
        result["label"] = [label_to_id[label] for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(preprocess_function, batched=True)

    train_dataset = raw_datasets["train"] if training_args.do_train else None
    eval_dataset = raw_datasets["validation"] if training_args.do_eval else None

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.argmax(preds, axis=1)
        return {"accuracy": (preds == p.label_ids).astype(np.float32).mean().item()}

    data_collator = None if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
