"""Data pipeline for prompt-based classification (MeZO protocol).

load -> sample (train / dev / eval) -> tokenize (prompt + per-candidate ids) -> collate
(left-padded) -> score each candidate by its mean log-probability under the causal LM.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from .tasks import Task

logger = logging.getLogger(__name__)

__all__ = [
    "SPLIT_FILES",
    "load_task_splits",
    "tokenize_example",
    "prepare_dataset",
    "CandidateCollator",
    "score_candidates",
    "candidate_loss",
    "compute_accuracy",
]

# SuperGLUE distribution file names, by split name.
SPLIT_FILES: dict[str, str] = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}


# --------------------------------------------------------------------------- loading


def _check_example(task: Task, example: Any, where: str) -> None:
    if not isinstance(example, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(example).__name__}")
    missing = [f for f in (*task.fields, "label") if f not in example]
    if missing:
        raise ValueError(
            f"{where}: missing required field(s) {missing} for task {task.name!r} "
            f"(required: {list(task.fields) + ['label']})"
        )
    empty = [f for f in task.fields if example[f] is None or (isinstance(example[f], str) and not example[f].strip())]
    if empty:  # A null field would be formatted into the prompt as the text "None".
        raise ValueError(
            f"{where}: field(s) {empty} of task {task.name!r} are null or empty; every example needs "
            f"non-empty {list(task.fields)}"
        )
    label = example["label"]
    try:
        ok = label in task.label_map
    except TypeError:  # unhashable label (list/dict)
        ok = False
    if not ok:
        raise ValueError(
            f"{where}: label {label!r} is not allowed for task {task.name!r}; allowed labels: {list(task.label_map)}"
        )


def _read_jsonl(task: Task, path: Path) -> int:
    """Validate a jsonl file line by line; returns the number of examples."""
    n = 0
    with path.open("rb") as fh:  # Bytes, decoded per line: a bad byte is reported with its file and line.
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: line {lineno} is not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue  # datasets' json reader skips blank lines too
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            _check_example(task, example, f"{path}: line {lineno}")
            n += 1
    return n


def _sample_indices(
    n_train: int, n_eval: int, num_train: int, num_dev: int, num_eval: int, data_seed: int, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for name, v in (("num_train", num_train), ("num_dev", num_dev), ("num_eval", num_eval)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if num_train + num_dev > n_train:
        raise ValueError(
            f"num_train + num_dev = {num_train} + {num_dev} = {num_train + num_dev} exceeds the "
            f"size of the train split ({n_train} examples) of {source}"
        )
    rng = np.random.default_rng(data_seed)
    perm = rng.permutation(n_train)
    train_idx, dev_idx = perm[:num_train], perm[num_train : num_train + num_dev]
    if num_eval >= n_eval:
        eval_idx = np.arange(n_eval)  # capped: the whole split, original order
    else:
        eval_idx = rng.permutation(n_eval)[:num_eval]
    for name, idx in (("train", train_idx), ("dev", dev_idx), ("eval", eval_idx)):
        if len(idx) == 0:
            raise ValueError(
                f"split {name!r} is empty after sampling (num_train={num_train}, num_dev={num_dev}, "
                f"num_eval={num_eval}; train size {n_train}, eval size {n_eval}) from {source}"
            )
    return train_idx, dev_idx, eval_idx


def load_task_splits(
    task: Task,
    data_dir: str | os.PathLike | None,
    num_train: int = 1000,
    num_dev: int = 500,
    num_eval: int = 1000,
    data_seed: int = 42,
) -> dict[str, datasets.Dataset]:
    """Load a task and sample the MeZO splits ``{"train", "dev", "eval"}``.

    ``train`` and ``dev`` are disjoint samples of the shuffled train split; ``eval`` is
    ``num_eval`` examples of ``task.eval_split`` (all of it, in order, if it is smaller).
    With ``data_dir``, reads SuperGLUE jsonl files (``train.jsonl``, ``val.jsonl``) there;
    otherwise loads ``task.hub_path``/``task.hub_config`` from the Hugging Face Hub.
    Inputs are fully validated before any dataset is built.
    """
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(
                f"data_dir {str(root)!r} does not exist or is not a directory; expected a folder "
                f"with SuperGLUE {task.name!r} files {SPLIT_FILES['train']} and "
                f"{SPLIT_FILES.get(task.eval_split, task.eval_split + '.jsonl')}"
            )
        eval_file = SPLIT_FILES.get(task.eval_split, f"{task.eval_split}.jsonl")
        files = {"train": root / SPLIT_FILES["train"], task.eval_split: root / eval_file}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing data file(s) {missing} for task {task.name!r}; expected "
                f"{SPLIT_FILES['train']} (train) and {eval_file} ({task.eval_split}) in {str(root)!r}"
            )
        sizes = {split: _read_jsonl(task, path) for split, path in files.items()}
        idx = _sample_indices(
            sizes["train"], sizes[task.eval_split], num_train, num_dev, num_eval, data_seed, str(root)
        )
        raw = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
        for split, n in sizes.items():
            if len(raw[split]) != n:  # guards against reader/validator disagreement
                raise ValueError(f"{files[split]}: read {len(raw[split])} rows, validated {n}")
        source = str(root)
    else:
        raw = datasets.load_dataset(task.hub_path, task.hub_config)
        source = f"{task.hub_path}/{task.hub_config}"
        for split in ("train", task.eval_split):
            if split not in raw:
                raise ValueError(f"{source} has no split {split!r} (available: {list(raw)})")
            for i, example in enumerate(raw[split]):
                _check_example(task, example, f"{source} [{split}] example {i}")
        idx = _sample_indices(
            len(raw["train"]), len(raw[task.eval_split]), num_train, num_dev, num_eval, data_seed, source
        )
    train_idx, dev_idx, eval_idx = idx
    return {
        "train": raw["train"].select(train_idx.tolist()),
        "dev": raw["train"].select(dev_idx.tolist()),
        "eval": raw[task.eval_split].select(eval_idx.tolist()),
    }


# --------------------------------------------------------------------------- tokenizing


def tokenize_example(tokenizer: Any, task: Task, example: Mapping[str, Any], max_length: int) -> dict:
    """Tokenize one example into ``prompt_ids``, per-candidate ``candidate_ids`` and ``label``.

    Candidates are tokenized on their own without special tokens; the prompt with the
    tokenizer's defaults (so a BOS is kept). If prompt + longest candidate exceeds
    ``max_length`` the prompt is cut from the left (the question sits at its end), keeping
    a leading BOS; ``truncated`` reports it.
    """
    prompt_ids = list(tokenizer(task.format_prompt(example))["input_ids"])
    candidate_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in task.get_candidates(example)]
    if any(len(c) == 0 for c in candidate_ids):
        raise ValueError(f"task {task.name!r}: a candidate tokenizes to no tokens: {task.get_candidates(example)}")
    if not prompt_ids:
        raise ValueError(f"task {task.name!r}: the prompt tokenizes to no tokens: {example}")
    budget = max_length - max(len(c) for c in candidate_ids)
    truncated = len(prompt_ids) > budget
    if truncated:
        bos = getattr(tokenizer, "bos_token_id", None)
        keep_bos = bos is not None and prompt_ids[0] == bos
        if budget < 1 + int(keep_bos):
            raise ValueError(
                f"max_length={max_length} leaves no room for the prompt (longest candidate: "
                f"{max(len(c) for c in candidate_ids)} tokens)"
            )
        prompt_ids = [bos] + prompt_ids[len(prompt_ids) - budget + 1 :] if keep_bos else prompt_ids[-budget:]
    return {
        "prompt_ids": prompt_ids,
        "candidate_ids": candidate_ids,
        "label": task.label_id(example["label"]),
        "truncated": truncated,
    }


def prepare_dataset(tokenizer: Any, task: Task, dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Tokenize a split; columns ``prompt_ids``, ``candidate_ids``, ``labels``.

    Logs one warning with the number of prompts that had to be truncated.
    """

    def _map(example: dict) -> dict:
        out = tokenize_example(tokenizer, task, example, max_length)
        return {
            "prompt_ids": out["prompt_ids"],
            "candidate_ids": out["candidate_ids"],
            "labels": out["label"],
            "truncated": out["truncated"],
        }

    mapped = dataset.map(
        _map,
        remove_columns=dataset.column_names,
        keep_in_memory=True,  # small splits; avoids writing cache files next to the source
        load_from_cache_file=False,
        desc=f"tokenizing {task.name}",
    )
    n_trunc = int(sum(list(mapped["truncated"])))
    if n_trunc:
        logger.warning(
            "%s: %d of %d examples were truncated from the left to fit max_length=%d",
            task.name,
            n_trunc,
            len(mapped),
            max_length,
        )
    return mapped.remove_columns("truncated")


# --------------------------------------------------------------------------- collating


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids, mask


@dataclass
class CandidateCollator:
    """Collate tokenized examples into left-padded tensors for :func:`score_candidates`.

    Single-token mode (every candidate is one token): one prompt sequence per example,
    ``input_ids`` [B, L], ``candidate_ids``/``candidate_mask`` [B, C, 1].
    Multi-token mode: one sequence per (example, candidate) = prompt + candidate[:-1],
    ``input_ids`` [B*C, L], ``candidate_ids`` [B, C, Lc] right-padded with 0 and a bool
    ``candidate_mask``. Always adds ``position_ids`` and ``labels`` [B].
    """

    tokenizer: Any
    # Dataset columns read here. They are no arguments of the model's forward, so ZOTrainer adds them to Trainer's
    # signature columns: HF's default remove_unused_columns=True would drop them otherwise.
    input_columns: ClassVar[tuple[str, ...]] = ("prompt_ids", "candidate_ids", "labels", "label")

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        return int(pad)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        prompts = [list(f["prompt_ids"]) for f in features]
        cands = [[list(c) for c in f["candidate_ids"]] for f in features]
        labels = torch.tensor([int(f["labels"] if "labels" in f else f["label"]) for f in features])
        num_c = {len(c) for c in cands}
        if len(num_c) != 1:
            raise ValueError(f"all examples in a batch need the same number of candidates, got {sorted(num_c)}")
        B, C = len(features), num_c.pop()
        bad = [int(v) for v in labels.tolist() if not 0 <= v < C]
        if bad:  # cross_entropy would fail deep inside the forward (a device-side assert on CUDA).
            raise ValueError(
                f"label(s) {sorted(set(bad))} outside the {C} candidates of this task (class ids 0..{C - 1})"
            )
        pad = self.pad_token_id

        if all(len(c) == 1 for cs in cands for c in cs):
            input_ids, attention_mask = _left_pad(prompts, pad)
            candidate_ids = torch.tensor([[c[0] for c in cs] for cs in cands], dtype=torch.long)[..., None]
            candidate_mask = torch.ones((B, C, 1), dtype=torch.bool)
        else:
            seqs = [p + c[:-1] for p, cs in zip(prompts, cands) for c in cs]
            input_ids, attention_mask = _left_pad(seqs, pad)
            Lc = max(len(c) for cs in cands for c in cs)
            candidate_ids = torch.zeros((B, C, Lc), dtype=torch.long)
            candidate_mask = torch.zeros((B, C, Lc), dtype=torch.bool)
            for b, cs in enumerate(cands):
                for j, c in enumerate(cs):
                    candidate_ids[b, j, : len(c)] = torch.as_tensor(c, dtype=torch.long)
                    candidate_mask[b, j, : len(c)] = True
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "candidate_ids": candidate_ids,
            "candidate_mask": candidate_mask,
            "labels": labels,
        }


# --------------------------------------------------------------------------- scoring


def score_candidates(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean log-probability of each candidate's tokens, shape [B, C].

    Only the last ``Lc`` positions' logits are computed (``logits_to_keep``): with left
    padding these are exactly the positions that predict the candidate tokens.
    """
    cand_ids, cand_mask = batch["candidate_ids"], batch["candidate_mask"].bool()
    B, C, Lc = cand_ids.shape
    input_ids = batch["input_ids"]
    single = Lc == 1 and input_ids.shape[0] == B
    if not single and input_ids.shape[0] != B * C:
        raise ValueError(
            f"input_ids has {input_ids.shape[0]} rows; expected {B} (single-token) or {B * C} (multi-token)"
        )
    logits = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        logits_to_keep=Lc,
    ).logits
    logprobs = torch.log_softmax(logits[:, -Lc:].float(), dim=-1)  # [N, Lc, V]
    if single:
        return logprobs[:, -1].gather(-1, cand_ids[..., 0])  # [B, C]

    logprobs = logprobs.view(B, C, Lc, -1)
    # Candidates are right-padded but their predictions end at the last position: window
    # position k predicts token j = k - (Lc - m) of a candidate of length m. Right-align
    # the ids instead of moving the [.., V] log-probs.
    lengths = cand_mask.sum(-1, keepdim=True)  # [B, C, 1]
    j = torch.arange(Lc, device=cand_ids.device) - (Lc - lengths)  # [B, C, Lc]
    valid = j >= 0
    aligned_ids = cand_ids.gather(-1, j.clamp(min=0))
    token_lp = logprobs.gather(-1, aligned_ids[..., None]).squeeze(-1)  # [B, C, Lc]
    token_lp = token_lp.masked_fill(~valid, 0.0)
    return token_lp.sum(-1) / lengths.squeeze(-1).clamp(min=1)


def candidate_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the candidate scores against ``labels`` (mean over the batch)."""
    scores = score_candidates(model, batch)
    return F.cross_entropy(scores, batch["labels"].to(scores.device)), scores


# --------------------------------------------------------------------------- metric


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for HF Trainer: argmax of the candidate scores vs ``label_ids``."""
    if hasattr(eval_pred, "predictions"):
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, label_ids = eval_pred[0], eval_pred[1]
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(label_ids, (tuple, list)):
        label_ids = label_ids[0]
    predictions = np.asarray(predictions)
    label_ids = np.asarray(label_ids).reshape(-1)
    if predictions.ndim != 2 or predictions.shape[0] != label_ids.shape[0]:
        raise ValueError(f"expected scores [N, C] and labels [N], got {predictions.shape} and {label_ids.shape}")
    return {"accuracy": float((predictions.argmax(-1) == label_ids).mean())}
