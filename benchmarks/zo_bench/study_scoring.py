"""The RTE study's own measurements: a saved model scored on the test split (per-example predictions, bootstrap
interval, zero-shot rate), and the ``reference`` runs (our mezo step beside MeZO's four-pass scheme)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

from .steppers import MeZOReferenceBaseline, ZOStepper
from .study_plan import DIVERGENCE_FACTOR, LN2


# =====================================================================================================
# scoring a model on the test split (per-example predictions) and the bootstrap interval
# =====================================================================================================
def task_splits(args: dict[str, Any]):
    """The run's task and its train / dev / eval samples, as zo-train draws them from ``args``."""
    from zo_trainer.data import load_task_splits
    from zo_trainer.tasks import get_task

    task = get_task(args["task"])
    splits = load_task_splits(
        task,
        args.get("data_dir"),
        num_train=int(args["num_train"]),
        num_dev=int(args["num_dev"]),
        num_eval=int(args["num_eval"]),
        data_seed=int(args.get("data_seed", args.get("seed", 0))),
    )
    return task, splits


def is_adapter_dir(model_path: str | None) -> bool:
    """Whether ``model_path`` holds a PEFT adapter (a ``--use_peft`` run's output), not a full model."""
    return bool(model_path) and (Path(model_path) / "adapter_config.json").exists()


def load_scored_model(model_path: str | None, args: dict[str, Any]):
    """(model, tokenizer) of a finished run: a full model as saved, or a LoRA adapter on the run's base model
    (``args``' model_name_or_path and quantization, as it was trained) through ``PeftModel.from_pretrained``."""
    from zo_trainer.models import ModelArguments, load_model

    if not is_adapter_dir(model_path):
        return load_model(ModelArguments(model_name_or_path=model_path, quantization=args.get("quantization")))
    from peft import PeftModel

    base, tokenizer = load_model(
        ModelArguments(model_name_or_path=args.get("model_name_or_path"), quantization=args.get("quantization"))
    )
    return PeftModel.from_pretrained(base, model_path), tokenizer


def score_model(model_path: str | None, args: dict[str, Any], split: str = "eval") -> dict[str, Any]:
    """Candidate scores of every example of ``split`` ("eval" = the test set, "train", "dev")."""
    import torch

    from zo_trainer.data import (
        CandidateCollator,
        candidate_loss,
        prepare_dataset,
    )

    task, splits = task_splits(args)
    model, tokenizer = load_scored_model(model_path, args)
    model.eval()
    data = prepare_dataset(tokenizer, task, splits[split], int(args["max_length"]))
    collate = CandidateCollator(tokenizer)
    bs = int(args.get("per_device_eval_batch_size", 16))
    preds: list[int] = []
    labels: list[int] = []
    loss_sum = 0.0
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(data), bs):
            batch = collate([data[j] for j in range(i, min(i + bs, len(data)))])
            loss, scores = candidate_loss(model, batch)
            loss_sum += float(loss) * len(batch["labels"])
            preds += scores.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    correct = [int(p == y) for p, y in zip(preds, labels)]
    return {
        "accuracy": sum(correct) / len(correct),
        "loss": loss_sum / len(correct),
        "n": len(correct),
        "predictions": preds,
        "labels": labels,
        "seconds": time.time() - t0,
    }


def bootstrap_ci(correct: list[int], n_resamples: int = 10000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the accuracy over the examples."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    lo = means[int((1 - level) / 2 * n_resamples)]
    hi = means[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return [lo, hi]


def majority_rate(labels: list[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


def zero_shot(root: Path, args: dict[str, Any]) -> dict[str, Any]:
    """The base model scored on the test split once per (model, quantization, data): cached under root."""
    key = f"{args.get('model_name_or_path') or 'smollm2-135m'}|{args.get('quantization')}|{args['num_eval']}|{args['max_length']}"
    cache = root / "zero_shot.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        res = score_model(args.get("model_name_or_path"), args)
        res["ci95"] = bootstrap_ci([int(p == y) for p, y in zip(res["predictions"], res["labels"])])
        table[key] = res
        root.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table))
    return table[key]


# =====================================================================================================
# slow or broken: MeZO's own four-pass scheme beside our mezo step, same batches
# =====================================================================================================
def _mean_loss(model, dataset, collate, batch_size: int = 16) -> float:
    import torch

    from zo_trainer.data import candidate_loss

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            total += float(candidate_loss(model, batch)[0]) * len(batch["labels"])
    return total / len(dataset)


def run_reference(run: dict[str, Any], args: dict[str, Any], root: Path, threads: int = 1) -> dict[str, Any]:
    """Our mezo (ZOStepper: ``zo_step``, the step ZOTrainer runs) and MeZOReferenceBaseline on the same batches."""
    import torch

    from zo_trainer.data import CandidateCollator, prepare_dataset
    from zo_trainer.models import ModelArguments, load_model

    torch.set_num_threads(threads)
    task, splits = task_splits(args)  # the reference runs' args always carry data_seed (COMMON, quick_plan)
    steps, eval_steps, bs = int(args["max_steps"]), int(args["eval_steps"]), int(args["per_device_train_batch_size"])
    lr, eps = float(args["learning_rate"]), float(args["zo_eps"])
    out: dict[str, Any] = {}
    for scheme in ("ours", "reference"):
        model, tok = load_model(ModelArguments(model_name_or_path=args.get("model_name_or_path")))
        model.eval()
        train_ds = prepare_dataset(tok, task, splits["train"], int(args["max_length"]))
        dev_ds = prepare_dataset(tok, task, splits["dev"], int(args["max_length"]))
        collate = CandidateCollator(tok)
        stepper = (
            ZOStepper(model, "mezo", learning_rate=lr, zo_eps=eps, seed=int(args.get("seed", 0)))
            if scheme == "ours"
            else MeZOReferenceBaseline(model, lr=lr, eps=eps)
        )
        order = random.Random(int(args.get("seed", 0)))
        idx: list[int] = []

        t0 = time.time()
        curve = [dict(step=0, eval_loss=_mean_loss(model, dev_ds, collate), wall_seconds=time.time() - t0)]
        train_curve = []
        for step in range(1, steps + 1):
            if len(idx) < bs:
                more = list(range(len(train_ds)))
                order.shuffle(more)
                idx += more
            batch = collate([train_ds[j] for j in idx[:bs]])
            del idx[:bs]
            loss = stepper.step(batch)
            train_curve.append(dict(step=step, loss=loss, wall_seconds=time.time() - t0))
            if step % eval_steps == 0 or step == steps:
                curve.append(
                    dict(step=step, eval_loss=_mean_loss(model, dev_ds, collate), wall_seconds=time.time() - t0)
                )
            if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * LN2:
                break
        out[scheme] = dict(eval=curve, train=train_curve, wall_seconds=time.time() - t0)
        del model
    return out
