"""ZOTrainer inside HF's loop, on a tiny random Llama and real RTE data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainingArguments

from conftest import make_trainer, state
from zo_trainer import ZOTrainingArguments
from zo_trainer.engine import perturbation_seed


def test_mezo_step_is_exactly_the_seeded_update(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    model = tiny_llama_factory()
    before = state(model)
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, model, max_steps=1)
    trainer.train()
    optimizer = trainer._zo_optimizer()
    (record,) = optimizer.trajectory
    assert record["seeds"] == [perturbation_seed(7, 0, 0)]
    # Replay the update alone on the initial weights: equal bit for bit.
    replay = tiny_llama_factory()
    replay.load_state_dict(before)
    from zo_trainer.engine import ZOEngine
    from zo_trainer.methods import MeZO

    engine = ZOEngine(MeZO(trainer.args).targets(replay))
    engine.update(record["seeds"], [record["lr"] * record["projected_gradients"][0]])
    after = state(model)
    for key, value in state(replay).items():
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    logged = [h for h in trainer.state.log_history if "zo_projected_grad" in h]
    assert logged and logged[0]["zo_projected_grad"] == pytest.approx(record["projected_gradients"][0])
    assert "grad_norm" not in trainer.state.log_history[0]


def test_sparse_mezo_trains_only_small_decoder_weights(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    model = tiny_llama_factory()
    before = state(model)
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, model, optim="sparse_mezo", max_steps=2)
    trainer.train()
    after = state(model)
    thresholds = trainer.zo_engine.thresholds()
    for key in before:
        changed = before[key] != after[key]
        if key in thresholds:
            assert changed.any()
            assert not changed[before[key].abs() > thresholds[key]].any(), key
            assert changed.float().mean() <= 0.21  # Masks are rebuilt each step: a few entries cross the threshold.
        else:
            assert not changed.any(), f"{key} changed under sparse_mezo"
    fractions = [h["zo_update_fraction"] for h in trainer.state.log_history if "zo_update_fraction" in h]
    # Step 1 updates the entries at or under the thresholds, fixed from these weights: 20%. Later steps rebuild the
    # masks from moved weights: entries cross the thresholds both ways, more after a large step (seed 7's first
    # projected gradient is 1.27 under z scheme 3: 18% at step 2; 0.24 under scheme 2: 19.6%).
    assert fractions and abs(fractions[0] - 0.2) < 0.01 and all(0.15 < f < 0.21 for f in fractions)


def test_gradient_accumulation_equals_larger_batch(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    results = []
    for batch, accumulation in [(4, 1), (2, 2)]:
        model = tiny_llama_factory()
        trainer = make_trainer(
            tmp_path,
            tiny_tokenizer,
            rte_small,
            model,
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        results.append((trainer._zo_optimizer().trajectory, state(model)))
    (trajectory_a, weights_a), (trajectory_b, weights_b) = results
    for a, b in zip(trajectory_a, trajectory_b):
        assert a["seeds"] == b["seeds"]
        assert a["projected_gradients"] == pytest.approx(b["projected_gradients"], rel=1e-4, abs=1e-6)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-4, atol=1e-6)


def test_several_perturbations_average(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    trainer = make_trainer(
        tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory(), max_steps=2, zo_num_perturbations=3
    )
    trainer.train()
    for step, record in enumerate(trainer._zo_optimizer().trajectory):
        assert record["seeds"] == [perturbation_seed(7, step, k) for k in range(3)]
        assert len(set(record["projected_gradients"])) == 3


def test_resume_is_bit_exact(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    full = tiny_llama_factory()
    make_trainer(tmp_path / "a", tiny_tokenizer, rte_small, full, optim="sparse_mezo", max_steps=4).train()
    first = tiny_llama_factory()
    trainer = make_trainer(
        tmp_path / "b",
        tiny_tokenizer,
        rte_small,
        first,
        optim="sparse_mezo",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    resumed = tiny_llama_factory(seed=123)  # Different init: everything must come from the checkpoint.
    trainer = make_trainer(
        tmp_path / "b",
        tiny_tokenizer,
        rte_small,
        resumed,
        optim="sparse_mezo",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    expected = state(full)
    for key, value in state(resumed).items():
        assert torch.equal(value, expected[key]), key
    # The trajectory continues across the resume: the resumed run's file is the uninterrupted run's, and the
    # checkpoint's is its prefix (seeds, projected gradients, lr, thresholds, base and final fingerprints).
    uninterrupted = json.loads((tmp_path / "a" / "out" / "zo_trajectory.json").read_text())
    continued = json.loads((tmp_path / "b" / "out" / "zo_trajectory.json").read_text())
    assert continued == uninterrupted and len(continued["steps"]) == 4
    at_checkpoint = json.loads((tmp_path / "b" / "out" / "checkpoint-2" / "zo_trajectory.json").read_text())
    assert at_checkpoint["steps"] == uninterrupted["steps"][:2]
    assert at_checkpoint["base_fingerprint"] == uninterrupted["base_fingerprint"]


def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    full = tiny_llama_factory()
    make_trainer(tmp_path / "a", tiny_tokenizer, rte_small, full, max_steps=4).train()
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    make_trainer(tmp_path / "b", tiny_tokenizer, rte_small, tiny_llama_factory(), **settings).train()
    out = tmp_path / "b" / "out"
    # What kill -9 in the middle of saving checkpoint-4 leaves: HF writes trainer_state.json last, in place.
    state_file = out / "checkpoint-4" / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:40])
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        make_trainer(tmp_path / "b", tiny_tokenizer, rte_small, tiny_llama_factory(), **settings).train(
            resume_from_checkpoint=str(out / "checkpoint-4")
        )
    resumed = tiny_llama_factory(seed=123)
    make_trainer(tmp_path / "b", tiny_tokenizer, rte_small, resumed, **settings).train(resume_from_checkpoint=True)
    expected = state(full)
    for key, value in state(resumed).items():
        assert torch.equal(value, expected[key]), key


def test_evaluation_reports_accuracy(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory(), max_steps=1)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0


def test_first_order_baseline_still_works(tmp_path, tiny_tokenizer, rte_small, tiny_llama_factory):
    model = tiny_llama_factory()
    before = state(model)
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, model, optim="adamw_torch", max_steps=2)
    assert not trainer.is_zo
    trainer.train()
    assert "AdamW" in type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
    assert not torch.equal(state(model)["model.norm.weight"], before["model.norm.weight"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(zo_eps=0.0), "zo_eps"),
        (dict(zo_eps=-1e-3), "zo_eps"),
        (dict(optim="sparse_mezo", zo_sparsity=1.0), "zo_sparsity"),
        (dict(optim="sparse_mezo", zo_sparsity=-0.1), "zo_sparsity"),
        (dict(zo_num_perturbations=0), "zo_num_perturbations"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(optim="qzo", zo_clip=0.0), "freezes training"),
        (dict(fp16=True), "bf16"),
        (dict(gradient_checkpointing=True), "gradient_checkpointing"),
        (dict(zo_sparsity=0.5), "sparse_mezo"),
    ],
)
def test_bad_arguments_are_refused(overrides, message):
    settings = dict(output_dir="unused", optim="mezo", report_to="none")
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        ZOTrainingArguments(**settings)


def test_unknown_optimizer_is_refused_and_plain_args_reject_zo_names():
    with pytest.raises(ValueError):
        TrainingArguments(output_dir="unused", optim="sparse_mezo")
    with pytest.raises(ValueError):
        ZOTrainingArguments(output_dir="unused", optim="not_an_optimizer")
