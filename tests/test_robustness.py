"""Trajectories and zo-replay, non-finite losses, atomic writes, bad input caught before any weight changes."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import make_trainer, state
from zo_trainer.cli.replay import run as replay_run
from zo_trainer.optim import NonFiniteLossError
from zo_trainer.trajectory import TRAJECTORY_NAME, TrajectoryError, load_trajectory, replay


def trajectory(path):
    return json.loads((path / TRAJECTORY_NAME).read_text())


@pytest.fixture
def tiny_base_dir(tmp_path, tiny_tokenizer, tiny_llama_factory):
    """The tiny model and tokenizer saved as a base model folder (what zo-replay --base takes)."""
    path = tmp_path / "base"
    tiny_llama_factory().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def load_base(tiny_base_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)


# ----- trajectory and replay ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(optim="mezo", zo_num_perturbations=2, weight_decay=0.1, lr_scheduler_type="linear"),
        dict(optim="sparse_mezo", weight_decay=0.1),
    ],
    ids=["mezo", "sparse_mezo"],
)
def test_replay_rebuilds_trained_weights_bit_exactly(tmp_path, tiny_base_dir, tiny_tokenizer, rte_small, overrides):
    model = load_base(tiny_base_dir)
    trainer = make_trainer(
        tmp_path, tiny_tokenizer, rte_small, model, max_steps=3, save_strategy="steps", save_steps=2, **overrides
    )
    trainer.train()
    out = tmp_path / "out"
    saved = trajectory(out)  # Written at the end of train() (and by save_model).
    assert saved["method"] == overrides["optim"] and saved["global_step"] == 3 and saved["eps"] == 1e-3
    assert [s["global_step"] for s in saved["steps"]] == [1, 2, 3]
    assert saved["base_model"] == str(tiny_base_dir) and saved["dtype"] == "float32"
    if overrides["optim"] == "sparse_mezo":
        assert saved["thresholds"] == trainer.zo_engine.thresholds()
    assert trajectory(out / "checkpoint-2")["steps"] == saved["steps"][:2]

    replay_run(["--trajectory", str(out), "--output_dir", str(tmp_path / "replayed")])  # --base from the file.
    replayed = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    trained = state(model)
    assert replayed.keys() <= trained.keys() and "model.embed_tokens.weight" in replayed
    for key, value in replayed.items():
        assert torch.equal(value, trained[key]), key
    assert any(not torch.equal(v, state(load_base(tiny_base_dir))[k]) for k, v in replayed.items())

    # A checkpoint's trajectory rebuilds that checkpoint; sparse thresholds recomputed from the base agree.
    partial = load_base(tiny_base_dir)
    replay(partial, load_trajectory(out / "checkpoint-2"), recompute_thresholds=True)
    checkpoint = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    for key, value in checkpoint.items():
        assert torch.equal(value, state(partial)[key]), key


def test_replay_refuses_a_different_base_and_a_truncated_file(
    tmp_path, tiny_base_dir, tiny_tokenizer, rte_small, tiny_llama_factory
):
    make_trainer(tmp_path, tiny_tokenizer, rte_small, load_base(tiny_base_dir), max_steps=1).train()
    payload = load_trajectory(tmp_path / "out")
    with pytest.raises(TrajectoryError, match="does not match the trajectory's start"):
        replay(tiny_llama_factory(seed=5), payload)
    text = (tmp_path / "out" / TRAJECTORY_NAME).read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(TrajectoryError, match="not a complete trajectory"):
        load_trajectory(tmp_path / "cut.json")


_WRITER = """
import contextlib, os, sys, uuid
%s
path, i = sys.argv[1], 0
while True:
    i += 1
    write_json_atomic(path, '{"n": %%d, "pad": "%%s"}' %% (i, "x" * (1 << 22)))
    print(i, flush=True)
"""


def test_kill_9_during_trajectory_writes_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / TRAJECTORY_NAME
    import inspect

    from zo_trainer.trajectory import write_json_atomic

    script = _WRITER % inspect.getsource(write_json_atomic)  # The same code, without importing torch (fast).
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline()  # At least one complete write happened.
        for _ in range(3):
            time.sleep(0.05)  # Land somewhere inside a later write.
            payload = json.loads(target.read_text())
            assert len(payload["pad"]) == 1 << 22
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    payload = json.loads(target.read_text())  # Complete: the old or the new version, never a mix.
    assert len(payload["pad"]) == 1 << 22 and payload["n"] >= 1


# ----- non-finite losses ----------------------------------------------------------------------------
class NaNOnCalls:
    """Fault injection: the model's logits become NaN (or inf) on chosen forward calls (0-based)."""

    def __init__(self, model, calls: dict[int, float]):
        self.calls, self.count = calls, 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        value = self.calls.get(self.count)
        self.count += 1
        if value is not None:
            output.logits = output.logits * value
        return output


class Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.weights = model, {0: state(model)}

    def on_step_end(self, args, state_, control, **kwargs):
        self.weights[state_.global_step] = state(self.model)


def test_non_finite_loss_skips_the_step_and_leaves_weights_unchanged(
    tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory, caplog
):
    model = tiny_llama_factory()
    before = state(model)
    # Two forwards per step (L+, L-): NaN in L- of global step 2, inf in L+ of global step 3.
    NaNOnCalls(model, {3: float("nan"), 4: float("inf")})
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, model, max_steps=4, zo_max_skipped_steps=3)
    snapshots = Snapshots(model)
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="zo_trainer.optim"):
        trainer.train()
    weights = snapshots.weights
    for step in (2, 3):
        for key in before:
            assert torch.equal(weights[step][key], weights[1][key]), (step, key)
    assert any(not torch.equal(weights[4][k], weights[3][k]) for k in before)
    assert any(not torch.equal(weights[1][k], weights[0][k]) for k in before)
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == 2 and "global step 2" in messages[0] and "global step 3" in messages[1]
    records = trainer._zo_optimizer().trajectory
    assert [bool(r.get("skipped")) for r in records] == [False, True, True, False]
    assert trainer._zo_optimizer().consecutive_skips == 0
    # The saved trajectory is strict JSON and replays (skipping the skipped steps) to the trained weights.
    saved = (tmp_path / "out" / TRAJECTORY_NAME).read_text()
    assert "NaN" not in saved and "Infinity" not in saved
    rebuilt = tiny_llama_factory()
    replay(rebuilt, load_trajectory(tmp_path / "out"))
    for key, value in state(rebuilt).items():
        assert torch.equal(value, weights[4][key]), key


def test_consecutive_non_finite_losses_stop_with_the_last_checkpoint_intact(
    tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory
):
    model = tiny_llama_factory()
    NaNOnCalls(model, {call: float("nan") for call in range(4, 100)})  # Every forward from global step 3 on.
    trainer = make_trainer(
        tmp_path,
        tiny_tokenizer,
        rte_small,
        model,
        max_steps=10,
        zo_max_skipped_steps=3,
        save_strategy="steps",
        save_steps=2,
    )
    snapshots = Snapshots(model)
    trainer.add_callback(snapshots)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "3 consecutive" in message and "global step 5" in message and "zo_max_skipped_steps=3" in message
    last = tmp_path / "out" / "checkpoint-4"  # Saved during the streak: the weights of step 2, unchanged.
    assert str(last) in message
    assert not (tmp_path / "out" / "checkpoint-6").exists()
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        saved = load_file(str(tmp_path / "out" / checkpoint / "model.safetensors"))
        for key, value in saved.items():
            assert torch.equal(value, snapshots.weights[2][key]), (checkpoint, key)
            assert torch.equal(value, state(model)[key]), key  # In memory too: the failed steps changed nothing.
    records = trajectory(last)["steps"]
    assert [bool(r.get("skipped")) for r in records] == [False, False, True, True]


# ----- bad input: one clear error before the model is even loaded -----------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture
def small_rte(tmp_path, rte_dir):
    folder = tmp_path / "rte"
    folder.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        lines = (rte_dir / name).read_text().splitlines()[:12]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize(
    "corrupt, flags, message",
    [
        ("malformed", [], r"train\.jsonl: line 4 is not valid JSON"),
        ("label", [], r"val\.jsonl: line 2: label 'maybe' is not allowed for task 'rte'"),
        (None, ["--num_train", "0"], r"split 'train' is empty after sampling"),
        (None, ["--num_train", "10", "--num_dev", "5"], r"exceeds the size of the train split \(12 examples\)"),
        (None, ["--zo_num_perturbations", "0"], "zo_num_perturbations must be >= 1"),
        (None, ["--learning_rate=-1e-3"], r"learning_rate must be > 0"),
    ],
)
def test_bad_input_fails_before_the_model_is_loaded(tmp_path, small_rte, monkeypatch, corrupt, flags, message):
    from zo_trainer.cli import train

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(train, "load_model", must_not_load)
    if corrupt == "malformed":
        lines = (small_rte / "train.jsonl").read_text().splitlines()
        lines[3] = lines[3][: len(lines[3]) // 2]
        _write_jsonl(small_rte / "train.jsonl", lines)
    elif corrupt == "label":
        rows = [json.loads(line) for line in (small_rte / "val.jsonl").read_text().splitlines()]
        rows[1]["label"] = "maybe"
        _write_jsonl(small_rte / "val.jsonl", rows)
    output_dir = tmp_path / "run"
    argv = [
        "--task",
        "rte",
        "--data_dir",
        str(small_rte),
        "--optim",
        "mezo",
        "--num_train",
        "6",
        "--num_dev",
        "2",
        "--num_eval",
        "4",
        "--output_dir",
        str(output_dir),
        "--report_to",
        "none",
        *flags,
    ]
    with pytest.raises(ValueError, match=message):
        train.run(argv)
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_trajectory_numbers_are_exact_json_floats():
    # JSON must round-trip the float64 projected gradients and lr exactly (Python writes repr()).
    values = [math.pi * 1e-7, -1 / 3, 2.0**-1074, 1e308]
    assert json.loads(json.dumps(values)) == values


def test_collator_refuses_labels_outside_the_candidates(tiny_tokenizer):
    from zo_trainer.data import CandidateCollator

    features = [{"prompt_ids": [2, 5, 6], "candidate_ids": [[7], [8]], "labels": label} for label in (0, 2)]
    with pytest.raises(ValueError, match=r"label\(s\) \[2\] outside the 2 candidates"):
        CandidateCollator(tiny_tokenizer)(features)


def test_replay_draws_noise_as_recorded_even_if_engine_defaults_change(
    tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory, monkeypatch
):
    from zo_trainer.engine import ZOEngine

    model = tiny_llama_factory()
    with monkeypatch.context() as patch:
        patch.setattr(ZOEngine, "_CHUNKED_MIN_NUMEL", 1 << 10)  # Chunked, threaded z on this tiny model's tensors.
        make_trainer(tmp_path, tiny_tokenizer, rte_small, model, max_steps=2).train()
    payload = load_trajectory(tmp_path / "out")
    assert payload["noise"]["cpu_chunked_min_numel"] == 1 << 10 != ZOEngine._CHUNKED_MIN_NUMEL
    rebuilt = tiny_llama_factory()
    replay(rebuilt, payload)
    for key, value in state(rebuilt).items():
        assert torch.equal(value, state(model)[key]), key


def test_replay_trains_exactly_the_tensors_that_trained(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    model = tiny_llama_factory()
    model.model.embed_tokens.weight.requires_grad_(False)  # The user froze the (tied) embeddings.
    make_trainer(tmp_path, tiny_tokenizer, rte_small, model, max_steps=2).train()
    payload = load_trajectory(tmp_path / "out")
    assert "model.embed_tokens.weight" not in payload["targets"]
    rebuilt = tiny_llama_factory()  # requires_grad everywhere: the file, not the flags, decides.
    replay(rebuilt, payload)
    for key, value in state(rebuilt).items():
        assert torch.equal(value, state(model)[key]), key


# ----- issue 8: non-finite values never crash or hide; quantization recorded ---------------------------------------
def test_skipped_steps_log_nan_and_the_trajectory_stays_strict_json(
    tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory
):
    model = tiny_llama_factory()
    NaNOnCalls(model, {call: float("nan") for call in range(0, 4)})  # Global steps 1 and 2: both passes NaN.
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, model, max_steps=3, zo_max_skipped_steps=5)
    trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert math.isnan(losses[1]) and math.isnan(losses[2]) and math.isfinite(losses[3])  # Never a perfect 0.
    records = trajectory(tmp_path / "out")["steps"]
    assert [r.get("skipped", False) for r in records] == [True, True, False]
    assert records[0]["projected_gradients"] == ["nan"]


def test_trajectory_writer_and_reader_survive_non_finite_values(
    tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory
):
    from zo_trainer.trajectory import dumps_trajectory, trajectory_payload

    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory(), max_steps=1)
    trainer.train()
    payload = trajectory_payload(trainer)
    payload["fingerprint"] = [float("nan"), float("inf")]  # A diverged run's weights.
    payload["steps"].append(
        {"global_step": 2, "seeds": [1], "projected_gradients": [float("-inf")], "lr": 1e-3, "skipped": True}
    )
    text = dumps_trajectory(payload)  # Used to raise "Out of range float values are not JSON compliant".
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    (tmp_path / "t.json").write_text(text)
    loaded = load_trajectory(tmp_path / "t.json")
    assert math.isnan(loaded["fingerprint"][0]) and loaded["steps"][-1]["projected_gradients"] == [float("-inf")]
    rebuilt = tiny_llama_factory()
    replay(rebuilt, loaded, verify=False)  # The skipped record is skipped.


def test_finite_check_names_the_tensor(tiny_llama_factory):
    from zo_trainer.optim import check_finite_weights

    model = tiny_llama_factory()
    check_finite_weights(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        check_finite_weights(model, "some/dir")


@pytest.mark.quant
def test_qzo_trajectory_records_nf4_and_replay_uses_it(tmp_path, tiny_base_dir, small_rte):
    pytest.importorskip("bitsandbytes")
    from zo_trainer.cli import train

    out = tmp_path / "qzo"
    train.run(
        [
            "--model_name_or_path",
            str(tiny_base_dir),
            "--task",
            "rte",
            "--data_dir",
            str(small_rte),
            "--quantization",
            "nf4",
            "--optim",
            "qzo",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "2",
            "--num_train",
            "6",
            "--num_dev",
            "2",
            "--num_eval",
            "4",
            "--max_length",
            "64",
            "--per_device_train_batch_size",
            "3",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(out),
        ]
    )
    assert trajectory(out)["quantization"] == "nf4"
    replay_run(["--trajectory", str(out), "--output_dir", str(tmp_path / "rebuilt")])  # No --quantization needed.
    rebuilt, trained = (load_file(str(folder / "model.safetensors")) for folder in (tmp_path / "rebuilt", out))
    absmax = [key for key in trained if "absmax" in key]
    assert absmax and all(torch.equal(rebuilt[key], trained[key]) for key in absmax)
    payload = json.loads((out / TRAJECTORY_NAME).read_text())
    payload["quantization"] = None
    (tmp_path / "plain.json").write_text(json.dumps(payload))
    with pytest.raises(TrajectoryError, match="trained with quantization None"):
        replay_run(
            ["--trajectory", str(tmp_path / "plain.json"), "--output_dir", str(tmp_path / "x"), "--quantization", "nf4"]
        )
