"""QZO end to end on the real SmolLM2-135M in int4: GPTQ (4 bit, group 64: the session fixture ``gptq_dir``,
quantized by zo-quantize) and bitsandbytes NF4 (``--quantization nf4``).

* ``zo-train --optim qzo`` in process: integer weights / zero points / NF4 codes bit-identical, every scale moved
  and stays > 0, the saved output_dir reloads and reproduces the final test loss;
* clipping of the projected gradient to [-zo_clip, zo_clip] and the exact update it implies;
* Sparse QZO (``--zo_sparsity``): only the scales at or below their tensor's threshold move;
* the errors: an unquantized model, a GPTQ kernel that pre-packs its scales.

Session fixtures (one GPTQ quantization per pytest run, shared with test_quant.py): conftest.py. Tests that train
the shared ``gptq_model`` / ``nf4_model`` in memory restore their scales and remove the engine's hooks afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from conftest import HAS_GPTQ

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import zo_trainer.cli.train as train_module  # noqa: E402
from zo_trainer import ZOTrainer, ZOTrainingArguments  # noqa: E402
from zo_trainer.data import CandidateCollator, compute_accuracy, load_task_splits, prepare_dataset  # noqa: E402
from zo_trainer.engine import perturbation_seed  # noqa: E402
from zo_trainer.quant import NO_QUANT_MESSAGE, get_backend, load_quantized, scale_tensors  # noqa: E402
from zo_trainer.tasks import get_task  # noqa: E402

pytestmark = [pytest.mark.quant, pytest.mark.slow]

TINY = torch.finfo(torch.float32).tiny  # QZO's floor for a scale after an update


def qzo_flags(rte_dir, output_dir, *extra):
    return [
        "--task",
        "rte",
        "--data_dir",
        str(rte_dir),
        "--optim",
        "qzo",
        "--max_steps",
        "2",
        "--num_train",
        "16",
        "--num_dev",
        "8",
        "--num_eval",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "16",
        "--max_length",
        "128",
        "--learning_rate",
        "1e-6",
        "--lr_scheduler_type",
        "constant",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


@pytest.fixture
def zo_train(monkeypatch):
    """``zo_trainer.cli.train.main`` in process; returns (metrics, trainer). The trainer main() built records the
    int4 state right after its set-up (before any step) and the (dataset, metrics) of every evaluation."""
    built = []

    class RecordingZOTrainer(ZOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.frozen_before = get_backend(self.model).frozen_state(self.model)
            self.scales_before = {s.name: s.get().clone() for s in scale_tensors(self.model)}
            self.evaluations = []
            built.append(self)

        def evaluate(self, eval_dataset=None, *args, **kwargs):
            metrics = super().evaluate(eval_dataset, *args, **kwargs)
            self.evaluations.append((eval_dataset, metrics))
            return metrics

    monkeypatch.setattr(train_module, "ZOTrainer", RecordingZOTrainer)

    def run(flags):
        metrics = train_module.run(flags)
        (trainer,) = built
        built.clear()
        return metrics, trainer

    return run


@pytest.mark.parametrize("kind", ["gptq", "nf4"])
def test_zo_train_qzo_end_to_end(kind, request, tmp_path, rte_dir, zo_train):
    if kind == "gptq":
        extra = ["--model_name_or_path", request.getfixturevalue("gptq_dir")]
    else:
        request.getfixturevalue("nf4_model")  # skips without bitsandbytes
        extra = ["--quantization", "nf4"]
    out = tmp_path / "out"
    metrics, trainer = zo_train(qzo_flags(rte_dir, out, *extra))

    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])
    trajectory = trainer._zo_optimizer().trajectory
    assert len(trajectory) == 2
    for record in trajectory:
        (d,) = record["projected_gradients"]
        assert math.isfinite(d) and abs(d) <= 100.0  # QZO's default clip
    logged = [h["zo_projected_grad"] for h in trainer.state.log_history if "zo_projected_grad" in h]
    assert len(logged) == 2 and all(math.isfinite(g) for g in logged)

    # In memory: integer weights / zero points / NF4 codes untouched, every scale tensor moved and stays > 0.
    model = trainer.model
    backend = get_backend(model)
    assert backend.name == kind
    frozen = backend.frozen_state(model)
    assert frozen and frozen.keys() == trainer.frozen_before.keys()
    for key, value in frozen.items():
        assert torch.equal(value, trainer.frozen_before[key]), key
    scales = {s.name: s.get() for s in scale_tensors(model)}
    assert scales.keys() == trainer.scales_before.keys() and len(scales) == 30 * 7
    for name, before in trainer.scales_before.items():
        after = scales[name]
        assert after.dtype == torch.float32
        assert not torch.equal(after, before), f"{name} did not move"
        assert (after > 0).all(), name

    # The saved output_dir: load_quantized gives back the same int4 state and the same test loss.
    ((test_set, test_metrics),) = [(d, m) for d, m in trainer.evaluations if "test_loss" in m]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = load_quantized(str(out))
    reloaded_backend = get_backend(reloaded)
    assert reloaded_backend.name == kind
    for key, value in reloaded_backend.frozen_state(reloaded).items():
        assert torch.equal(value, frozen[key]), key
    for s in scale_tensors(reloaded):
        assert torch.equal(s.get(), scales[s.name]), s.name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id == trainer.processing_class.pad_token_id
    evaluator = ZOTrainer(
        model=reloaded,
        args=ZOTrainingArguments(
            output_dir=str(tmp_path / "reload_eval"),
            optim="qzo",
            per_device_eval_batch_size=16,
            report_to="none",
            disable_tqdm=True,
        ),
        processing_class=tokenizer,
        data_collator=CandidateCollator(tokenizer),
        compute_metrics=compute_accuracy,
    )
    again = evaluator.evaluate(test_set, metric_key_prefix="test")
    assert again["test_loss"] == pytest.approx(test_metrics["test_loss"], abs=1e-6)
    assert again["test_accuracy"] == test_metrics["test_accuracy"]
    evaluator.zo_engine.remove()
    del evaluator, reloaded

    # Plain from_pretrained loads it too (GPTQ: with whatever kernel gptqmodel picks, fp16/bf16 scales).
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert get_backend(plain) is not None and get_backend(plain).name == kind


def test_qzo_on_unquantized_model_is_one_clear_error(tmp_path, rte_dir, base_dir, zo_train):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        zo_train(qzo_flags(rte_dir, out, "--model_name_or_path", base_dir))
    assert str(error.value) == NO_QUANT_MESSAGE
    assert "zo-quantize" in NO_QUANT_MESSAGE and "--quantization nf4" in NO_QUANT_MESSAGE
    # Raised while the trainer was set up: no step ran, nothing was written.
    assert not out.exists() or not any(out.glob("*.safetensors"))


# ---------------------------------------------------------------------------- in memory, on the shared models
@pytest.fixture(scope="module")
def smol_data(base_dir, rte_dir):
    from transformers import AutoTokenizer

    from zo_trainer.models import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base_dir))
    task = get_task("rte")
    splits = load_task_splits(task, rte_dir, num_train=8, num_dev=4, num_eval=4, data_seed=0)
    return tokenizer, {k: prepare_dataset(tokenizer, task, v, max_length=128) for k, v in splits.items()}


@contextlib.contextmanager
def trained_in_place(model, tmp_path, data, **overrides):
    """A ZOTrainer on a shared session model; afterwards its scales are restored and the hooks removed."""
    tokenizer, splits = data
    backups = [(s, s.get().clone()) for s in scale_tensors(model)]
    settings = dict(
        output_dir=str(tmp_path / "out"),
        optim="qzo",
        max_steps=1,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=3,
        disable_tqdm=True,
    )
    settings.update(overrides)
    trainer = ZOTrainer(
        model=model,
        args=ZOTrainingArguments(**settings),
        train_dataset=splits["train"],
        processing_class=tokenizer,
        data_collator=CandidateCollator(tokenizer),
    )
    try:
        yield trainer
    finally:
        trainer.zo_engine.remove()
        for s, backup in backups:
            s.set(backup)
        model.eval()


def test_clipping_engages_and_sets_the_update(tmp_path, nf4_model, smol_data):
    clip, lr = 1e-6, 1.0  # |d| is O(1..10) here: clipped every time; lr large enough to see lr * C * z in fp32
    with trained_in_place(nf4_model, tmp_path, smol_data, zo_clip=clip, learning_rate=lr) as trainer:
        targets = trainer.zo_engine.targets
        before = [t.get().clone() for t in targets]
        trainer.train()
        (record,) = trainer._zo_optimizer().trajectory
        assert record["seeds"] == [perturbation_seed(3, 0, 0)] and record["lr"] == lr
        (d,) = record["projected_gradients"]
        assert abs(d) == clip, "the projected gradient must be clipped to +-zo_clip"
        moved = 0
        for target, b in zip(targets, before):
            z = trainer.zo_engine.noise(target, record["seeds"][0])
            expected = b.clone().add_(z, alpha=-(lr * d)).clamp_(min=TINY)  # t <- t - lr * (+-C) * z
            assert torch.equal(target.get(), expected), target.name
            moved += not torch.equal(target.get(), b)
        assert moved == len(targets)


@pytest.mark.parametrize("kind", ["gptq", "nf4"])
def test_sparse_qzo_moves_only_small_scales(kind, request, tmp_path, smol_data):
    model = request.getfixturevalue(f"{kind}_model")
    with trained_in_place(model, tmp_path, smol_data, zo_sparsity=0.5, learning_rate=1e-5) as trainer:
        before = {t.name: t.get().clone() for t in trainer.zo_engine.targets}
        trainer.train()
        thresholds = trainer.zo_engine.thresholds()
        for target in trainer.zo_engine.targets:
            b, a, threshold = before[target.name], target.get(), thresholds[target.name]
            magnitude = b.abs().flatten()
            assert threshold == float(magnitude.kthvalue(math.ceil(0.5 * magnitude.numel())).values)
            changed = a != b
            assert changed.any(), target.name
            assert not changed[b.abs() > threshold].any(), f"{target.name}: a scale above the threshold moved"
            assert changed.float().mean() <= 0.5 + 0.1  # ties at the threshold (fp16-born GPTQ scales) take part
            assert (a > 0).all()
        fractions = [h["zo_update_fraction"] for h in trainer.state.log_history if "zo_update_fraction" in h]
        assert fractions and all(0.5 <= f <= 0.6 for f in fractions)


# ---------------------------------------------------------------------------- GPTQ kernel check
@pytest.mark.skipif(not HAS_GPTQ, reason="gptqmodel/optimum not importable: run scripts/install_quant.sh")
def test_gptq_kernel_that_prepacks_scales_is_refused(gptq_dir, tmp_path):
    """gptqmodel's ATen int4pack kernel (what plain from_pretrained picks on this CPU) folds the scales into
    ``scales_and_zeros`` on its first forward: QZO would perturb a tensor nobody reads. It must be refused with
    the fix, and it indeed ignores scale edits."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch build has no ATen int4pack CPU kernel")
    model = AutoModelForCausalLM.from_pretrained(
        gptq_dir, quantization_config=GPTQConfig(bits=4, backend="gptq_torch_aten"), dtype=torch.bfloat16
    )
    kernels = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel.")}
    assert kernels == {"TorchAtenLinear"}
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = layer(x)
        layer.scales.mul_(2.0)
        y1 = layer(x)
    assert torch.equal(y0, y1), "premise: this kernel does not read `scales` after packing"

    with pytest.raises(ValueError, match=r"TorchAtenLinear.*pre-pack the scales.*Fix:.*load_quantized\(path, 'gptq'\)"):
        ZOTrainer(model=model, args=ZOTrainingArguments(output_dir=str(tmp_path), optim="qzo", report_to="none"))
