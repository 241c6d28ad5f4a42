"""Tests for zo_trainer.tasks and zo_trainer.data (offline, tiny random Llama)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from zo_trainer import data as zdata
from zo_trainer.data import (
    CandidateCollator,
    candidate_loss,
    compute_accuracy,
    load_task_splits,
    prepare_dataset,
    score_candidates,
    tokenize_example,
)
from zo_trainer.tasks import TASKS, Task, get_task

RTE_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/superglue/rte"
needs_rte = pytest.mark.skipif(not (RTE_DIR / "train.jsonl").is_file(), reason=f"no RTE data at {RTE_DIR}")

RTE = get_task("rte")
# Same prompt, multi-token answers of different lengths (exercises the multi-token path).
RTE_MULTI = replace(RTE, name="rte_multi", candidates=("Yes it is true", "No"))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# --------------------------------------------------------------------------- fixtures


def _rte_rows(n: int = 300) -> list[dict]:
    if (RTE_DIR / "train.jsonl").is_file():
        return _read_jsonl(RTE_DIR / "train.jsonl")[:n]
    # Fallback sentences so tokenizer/model tests still run without the data.
    return [
        {
            "premise": f"The cat number {i} sat on the mat in city {i % 7}.",
            "hypothesis": f"A cat sat in city {i % 5}.",
            "label": ["entailment", "not_entailment"][i % 2],
            "idx": i,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def rte_rows() -> list[dict]:
    return _rte_rows()


@pytest.fixture(scope="module")
def tokenizer(rte_rows):
    """A real fast tokenizer trained offline: word-level, adds BOS, has a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"])
    corpus = [RTE.format_prompt(r) for r in rte_rows] + ["Yes No Maybe it is true"]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_llama(
        len(tokenizer),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).eval()


def _features(tokenizer, task: Task, rows: list[dict], max_length: int = 256) -> list[dict]:
    out = []
    for r in rows:
        t = tokenize_example(tokenizer, task, r, max_length)
        out.append({"prompt_ids": t["prompt_ids"], "candidate_ids": t["candidate_ids"], "labels": t["label"]})
    return out


def _brute_force_scores(model, features: list[dict]) -> torch.Tensor:
    """Mean candidate log-prob from full logits of one unpadded forward per (example, candidate)."""
    scores = []
    with torch.no_grad():
        for f in features:
            row = []
            P = len(f["prompt_ids"])
            for cand in f["candidate_ids"]:
                ids = torch.tensor([f["prompt_ids"] + cand])
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                row.append(torch.stack([lp[P - 1 + j, t] for j, t in enumerate(cand)]).mean())
            scores.append(torch.stack(row))
    return torch.stack(scores)


# --------------------------------------------------------------------------- tasks


def test_task_registry_and_unknown_name():
    assert {"rte", "boolq", "cb", "wic", "copa"} <= set(TASKS)
    assert get_task("RTE") is TASKS["rte"]
    with pytest.raises(ValueError) as e:
        get_task("sst9")
    for name in ("rte", "boolq", "cb", "wic", "copa"):
        assert name in str(e.value)


def test_rte_definition_and_prompts():
    ex = {"premise": "P.", "hypothesis": "H.", "label": "entailment"}
    assert RTE.format_prompt(ex) == 'P.\nDoes this mean that "H." is true? Yes or No?\n'
    assert RTE.candidates == ("Yes", "No")
    assert [RTE.label_id(x) for x in ("entailment", "not_entailment", 0, 1)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="allowed labels"):
        RTE.label_id("neutral")
    assert (RTE.hub_path, RTE.hub_config, RTE.eval_split) == ("aps/super_glue", "rte", "validation")


def test_other_tasks_format():
    boolq = get_task("boolq")
    assert boolq.format_prompt({"passage": "Sky.", "question": "is the sky blue"}) == "Sky. Is the sky blue?\n"
    assert boolq.label_id(True) == 1 and boolq.label_id(0) == 0
    cb = get_task("cb")
    assert cb.label_id("neutral") == 2 and cb.get_candidates({}) == ("Yes", "No", "Maybe")
    wic = get_task("wic")
    p = wic.format_prompt({"word": "bank", "sentence1": "A.", "sentence2": "B."})
    assert p.endswith("A.\nB.\n") and '"bank"' in p
    copa = get_task("copa")
    ex = {
        "premise": "The man broke his toe.",
        "choice1": "He dropped a hammer.",
        "choice2": "He ran.",
        "question": "cause",
        "label": 0,
    }
    assert copa.format_prompt(ex) == "The man broke his toe because"
    assert copa.get_candidates(ex) == (" he dropped a hammer.", " he ran.")
    assert copa.format_prompt({**ex, "question": "effect"}).endswith(" so")


# --------------------------------------------------------------------------- loading


@needs_rte
def test_load_rte_sizes_and_disjoint():
    splits = load_task_splits(RTE, str(RTE_DIR), num_train=100, num_dev=50, num_eval=1000, data_seed=3)
    assert set(splits) == {"train", "dev", "eval"}
    assert (len(splits["train"]), len(splits["dev"])) == (100, 50)
    train_idx, dev_idx = set(splits["train"]["idx"]), set(splits["dev"]["idx"])
    assert len(train_idx) == 100 and len(dev_idx) == 50 and not train_idx & dev_idx
    # Capped eval: the whole validation split in its original order.
    val = _read_jsonl(RTE_DIR / "val.jsonl")
    assert splits["eval"]["idx"] == [r["idx"] for r in val]
    # The sample is shuffled, not the file's first rows.
    assert sorted(splits["train"]["idx"]) != list(range(100))
    assert set(splits["train"].column_names) >= {"premise", "hypothesis", "label"}


@needs_rte
def test_load_rte_seed_determinism_and_eval_sampling():
    a = load_task_splits(RTE, RTE_DIR, num_train=64, num_dev=32, num_eval=100, data_seed=42)
    b = load_task_splits(RTE, RTE_DIR, num_train=64, num_dev=32, num_eval=100, data_seed=42)
    c = load_task_splits(RTE, RTE_DIR, num_train=64, num_dev=32, num_eval=100, data_seed=43)
    for k in ("train", "dev", "eval"):
        assert a[k]["idx"] == b[k]["idx"]
    assert a["train"]["idx"] != c["train"]["idx"]
    assert a["eval"]["idx"] != c["eval"]["idx"]
    assert len(a["eval"]) == 100 and len(set(a["eval"]["idx"])) == 100


@pytest.fixture
def tiny_rte_dir(tmp_path, rte_rows):
    _write_jsonl(tmp_path / "train.jsonl", rte_rows[:20])
    _write_jsonl(tmp_path / "val.jsonl", rte_rows[20:30])
    return tmp_path


@pytest.fixture
def no_hub_load(monkeypatch):
    """Fail loudly if validation errors come after datasets.load_dataset was reached."""

    def _boom(*a, **k):
        raise AssertionError("datasets.load_dataset called before validation finished")

    monkeypatch.setattr(zdata.datasets, "load_dataset", _boom)


def test_malformed_jsonl_names_file_and_line(tiny_rte_dir, rte_rows, no_hub_load):
    rows = [json.dumps(r) for r in rte_rows[:5]]
    rows[2] = '{"premise": "oops", "hypothesis": '
    _write_jsonl(tiny_rte_dir / "train.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_task_splits(RTE, tiny_rte_dir, num_train=2, num_dev=1, num_eval=3)
    msg = str(e.value)
    assert str(tiny_rte_dir / "train.jsonl") in msg and "line 3" in msg


def test_bad_label_reports_line_and_allowed(tiny_rte_dir, rte_rows, no_hub_load):
    rows = [dict(r) for r in rte_rows[20:26]]
    rows[4]["label"] = "maybe"
    _write_jsonl(tiny_rte_dir / "val.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_task_splits(RTE, tiny_rte_dir, num_train=2, num_dev=1, num_eval=3)
    msg = str(e.value)
    assert "val.jsonl" in msg and "line 5" in msg and "'maybe'" in msg and "not_entailment" in msg


def test_missing_field_is_reported(tiny_rte_dir, rte_rows, no_hub_load):
    rows = [dict(r) for r in rte_rows[:5]]
    del rows[1]["hypothesis"]
    _write_jsonl(tiny_rte_dir / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 2.*hypothesis"):
        load_task_splits(RTE, tiny_rte_dir, num_train=2, num_dev=1, num_eval=3)


def test_missing_dir_and_files(tmp_path, no_hub_load):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_task_splits(RTE, tmp_path / "nope")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError) as e:
        load_task_splits(RTE, tmp_path)
    assert str(tmp_path / "val.jsonl") in str(e.value)


def test_sizes_too_large_and_empty_split(tiny_rte_dir, no_hub_load):
    with pytest.raises(ValueError) as e:
        load_task_splits(RTE, tiny_rte_dir, num_train=15, num_dev=10, num_eval=5)
    assert "25" in str(e.value) and "20" in str(e.value)
    with pytest.raises(ValueError, match="'dev' is empty"):
        load_task_splits(RTE, tiny_rte_dir, num_train=5, num_dev=0, num_eval=5)
    _write_jsonl(tiny_rte_dir / "val.jsonl", [])
    with pytest.raises(ValueError, match="'eval' is empty"):
        load_task_splits(RTE, tiny_rte_dir, num_train=5, num_dev=5, num_eval=5)


def test_tiny_dir_loads(tiny_rte_dir):
    s = load_task_splits(RTE, tiny_rte_dir, num_train=12, num_dev=8, num_eval=4, data_seed=0)
    assert sorted(list(s["train"]["idx"]) + list(s["dev"]["idx"])) == sorted(r["idx"] for r in _rte_rows()[:20])
    assert len(s["eval"]) == 4


def test_hub_branch_validates(monkeypatch, rte_rows):
    def fake_load(path, config):
        assert (path, config) == ("aps/super_glue", "rte")
        rows = [{**r, "label": i % 2} for i, r in enumerate(rte_rows[:30])]
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(rows[:20]),
                "validation": datasets.Dataset.from_list(rows[20:]),
            }
        )

    monkeypatch.setattr(zdata.datasets, "load_dataset", fake_load)
    s = load_task_splits(RTE, None, num_train=10, num_dev=5, num_eval=100)
    assert (len(s["train"]), len(s["dev"]), len(s["eval"])) == (10, 5, 10)

    def bad_load(path, config):
        ds = fake_load(path, config)
        return datasets.DatasetDict({"train": ds["train"], "validation": ds["validation"].map(lambda r: {"label": 7})})

    monkeypatch.setattr(zdata.datasets, "load_dataset", bad_load)
    with pytest.raises(ValueError, match=r"example 0.*allowed labels"):
        load_task_splits(RTE, None, num_train=10, num_dev=5, num_eval=100)


# --------------------------------------------------------------------------- tokenizing


def test_tokenize_example_and_truncation(tokenizer, rte_rows):
    ex = rte_rows[1]
    full = tokenize_example(tokenizer, RTE, ex, max_length=512)
    bos = tokenizer.bos_token_id
    assert full["prompt_ids"][0] == bos and full["truncated"] is False
    assert full["prompt_ids"] == tokenizer(RTE.format_prompt(ex))["input_ids"]
    assert full["candidate_ids"] == [[tokenizer.convert_tokens_to_ids("Yes")], [tokenizer.convert_tokens_to_ids("No")]]
    assert full["label"] == RTE.label_map[ex["label"]]

    P = len(full["prompt_ids"])
    multi = tokenize_example(tokenizer, RTE_MULTI, ex, max_length=P - 3)
    longest = max(len(c) for c in multi["candidate_ids"])
    assert longest == 4 and multi["truncated"] is True
    assert len(multi["prompt_ids"]) + longest == P - 3
    # BOS kept, then the END of the prompt (the question) survives.
    kept = P - 3 - longest - 1
    assert multi["prompt_ids"] == [bos] + full["prompt_ids"][-kept:]
    assert tokenizer.convert_ids_to_tokens(multi["prompt_ids"][-4:]) == ["Yes", "or", "No", "?"]
    with pytest.raises(ValueError, match="no room"):
        tokenize_example(tokenizer, RTE_MULTI, ex, max_length=4)


def test_prepare_dataset_columns_and_one_warning(tokenizer, rte_rows, caplog):
    ds = datasets.Dataset.from_list(rte_rows[:12])
    lengths = [len(tokenizer(RTE.format_prompt(r))["input_ids"]) for r in rte_rows[:12]]
    max_length = int(np.median(lengths))
    expected = sum(n + 1 > max_length for n in lengths)
    assert 0 < expected < 12
    with caplog.at_level(logging.WARNING, logger="zo_trainer.data"):
        out = prepare_dataset(tokenizer, RTE, ds, max_length=max_length)
    assert set(out.column_names) == {"prompt_ids", "candidate_ids", "labels"}
    assert len(out) == 12 and all(len(p) + 1 <= max_length for p in out["prompt_ids"])
    assert out["labels"] == [RTE.label_map[r["label"]] for r in rte_rows[:12]]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "zo_trainer.data"]
    assert len(warnings) == 1 and f"{expected} of 12" in warnings[0].getMessage()


# --------------------------------------------------------------------------- collating


def test_collator_single_token_left_padding(tokenizer, rte_rows):
    feats = _features(tokenizer, RTE, rte_rows[:3])
    batch = CandidateCollator(tokenizer)(feats)
    lens = [len(f["prompt_ids"]) for f in feats]
    B, L = 3, max(lens)
    assert batch["input_ids"].shape == (B, L) and batch["attention_mask"].shape == (B, L)
    assert batch["candidate_ids"].shape == (B, 2, 1) and batch["candidate_mask"].shape == (B, 2, 1)
    assert batch["candidate_mask"].dtype == torch.bool and batch["candidate_mask"].all()
    assert batch["labels"].tolist() == [f["labels"] for f in feats]
    pad = tokenizer.pad_token_id
    for i, f in enumerate(feats):
        n = lens[i]
        assert batch["input_ids"][i, L - n :].tolist() == f["prompt_ids"]
        assert (batch["input_ids"][i, : L - n] == pad).all()
        assert batch["attention_mask"][i].tolist() == [0] * (L - n) + [1] * n
        assert batch["position_ids"][i].tolist() == [0] * (L - n) + list(range(n))
        assert batch["candidate_ids"][i, :, 0].tolist() == [c[0] for c in f["candidate_ids"]]


def test_collator_multi_token_shapes(tokenizer, rte_rows):
    feats = _features(tokenizer, RTE_MULTI, rte_rows[:2])
    batch = CandidateCollator(tokenizer)(feats)
    C, Lc = 2, 4
    seq_lens = [len(f["prompt_ids"]) + len(c) - 1 for f in feats for c in f["candidate_ids"]]
    L = max(seq_lens)
    assert batch["input_ids"].shape == (2 * C, L)
    assert batch["candidate_ids"].shape == (2, C, Lc)
    assert batch["candidate_mask"].tolist()[0] == [[True] * 4, [True, False, False, False]]
    assert batch["candidate_ids"][0, 1].tolist() == [feats[0]["candidate_ids"][1][0], 0, 0, 0]
    # Row 1 = example 0 with candidate "No": prompt only, left-padded.
    row = batch["input_ids"][1]
    assert row[L - seq_lens[1] :].tolist() == feats[0]["prompt_ids"]
    assert row[-1].item() == feats[0]["prompt_ids"][-1]
    assert batch["input_ids"][0, -3:].tolist() == feats[0]["candidate_ids"][0][:-1]
    assert (batch["position_ids"] == (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).all()


def test_collator_falls_back_to_eos(tokenizer, rte_rows):
    class NoPad:
        pad_token_id = None
        eos_token_id = 3

    feats = _features(tokenizer, RTE, rte_rows[:2])
    batch = CandidateCollator(NoPad())(feats)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 3).all()
    assert (batch["attention_mask"] == 0).any()


# --------------------------------------------------------------------------- scoring


class _LogitsSpy:
    def __init__(self, model):
        self.model, self.shapes, self.kwargs = model, [], []

    def __call__(self, **kw):
        self.kwargs.append(kw)
        out = self.model(**kw)
        self.shapes.append(tuple(out.logits.shape))
        return out


@pytest.mark.parametrize("task", [RTE, RTE_MULTI], ids=["single_token", "multi_token"])
def test_score_candidates_matches_brute_force(tokenizer, model, rte_rows, task):
    feats = _features(tokenizer, task, rte_rows[:4])
    batch = CandidateCollator(tokenizer)(feats)
    spy = _LogitsSpy(model)
    with torch.no_grad():
        scores = score_candidates(spy, batch)
    expected = _brute_force_scores(model, feats)
    assert scores.shape == (4, 2) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # One forward; only the last Lc positions' logits were materialised.
    Lc = batch["candidate_ids"].shape[-1]
    assert len(spy.shapes) == 1 and spy.kwargs[0]["logits_to_keep"] == Lc
    # RoPE is shift-invariant, so the brute-force match cannot see position_ids; models with
    # absolute positions need them, so check they are passed.
    assert spy.kwargs[0]["position_ids"] is batch["position_ids"]
    assert spy.shapes[0] == (batch["input_ids"].shape[0], Lc, len(tokenizer))
    assert batch["input_ids"].shape[0] == (4 if task is RTE else 8)


def test_candidate_loss_matches_cross_entropy(tokenizer, model, rte_rows):
    feats = _features(tokenizer, RTE_MULTI, rte_rows[4:9])
    batch = CandidateCollator(tokenizer)(feats)
    with torch.no_grad():
        loss, scores = candidate_loss(model, batch)
    expected = F.cross_entropy(_brute_force_scores(model, feats), batch["labels"])
    assert loss.ndim == 0
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # Gradients reach the parameters (the first-order baseline relies on it).
    model.zero_grad()
    loss, _ = candidate_loss(model, batch)
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()


# --------------------------------------------------------------------------- metric


def test_compute_accuracy():
    from transformers import EvalPrediction

    scores = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-5.0, -4.0]])
    labels = np.array([1, 0, 1, 0])
    assert compute_accuracy(EvalPrediction(predictions=scores, label_ids=labels)) == {"accuracy": 0.5}
    assert compute_accuracy(EvalPrediction(predictions=(scores, np.zeros(4)), label_ids=labels)) == {"accuracy": 0.5}
    assert compute_accuracy((scores, np.array([1, 0, 0, 1]))) == {"accuracy": 1.0}
