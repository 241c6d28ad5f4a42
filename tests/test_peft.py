"""ZO training of PEFT LoRA adapters with the real ``peft``: on a tiny random Llama and on its NF4 (QLoRA) form.

Only the adapters PEFT marked trainable take part; the base stays bit-identical; ``ZOTrainer.save_model``
writes an adapter that ``PeftModel.from_pretrained(base, dir)`` reloads with identical weights; Sparse-MeZO
keeps training the zero-initialised ``lora_B`` (dense) while masking ``lora_A`` by magnitude; ``qzo`` on a
PEFT model is refused with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import TrainerCallback

from conftest import random_lm_rows
from zo_trainer import ZOTrainer, ZOTrainingArguments
from zo_trainer.engine import ZOEngine, ZOTarget

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402  (after the skip: peft is optional)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
VOCAB = 1500  # make_tiny_llama's default
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


@pytest.fixture(scope="module")
def lm_data():
    return random_lm_rows(VOCAB)


def zo_trainer(model, data, output_dir, optim: str, **overrides) -> ZOTrainer:
    settings = dict(
        output_dir=str(output_dir),
        optim=optim,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=5,
    )
    settings.update(overrides)
    return ZOTrainer(model=model, args=ZOTrainingArguments(**settings), train_dataset=data)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def lora_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_lora_adapters_train_alone_and_reload_with_peft(optim, tiny_llama_factory, lm_data, tmp_path):
    model = get_peft_model(tiny_llama_factory(), LoraConfig(**LORA))
    adapters = lora_names(model)
    before = snapshot(model)
    trainer = zo_trainer(model, lm_data, tmp_path / "out", optim)
    assert {t.name for t in trainer.zo_engine.targets} == adapters
    trainer.train()
    trainer.save_model()
    after = snapshot(model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == adapters  # Every adapter moved; the base (embeddings, norms, projections) is bit-identical.

    reloaded = PeftModel.from_pretrained(tiny_llama_factory(), str(tmp_path / "out"))
    reloaded_state = reloaded.state_dict()
    for name in adapters:
        assert torch.equal(reloaded_state[name], after[name]), name
    tokens = lm_data[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens).logits, model.eval()(tokens).logits)


class _RecordLoraB(TrainerCallback):
    def __init__(self, model):
        self.tensors = {n: p for n, p in model.named_parameters() if "lora_B" in n}
        self.history = [{n: p.detach().clone() for n, p in self.tensors.items()}]

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append({n: p.detach().clone() for n, p in self.tensors.items()})


def test_sparse_mezo_keeps_training_zero_initialised_lora_b(tiny_llama_factory, lm_data, tmp_path):
    """lora_B starts at zeros: its magnitude quantile is 0, and a mask |W| <= 0 would freeze it after step 1.
    The rule: a tensor whose |W| is constant at train begin (or whose quantile is 0) is trained densely."""
    model = get_peft_model(tiny_llama_factory(), LoraConfig(**LORA))
    before = snapshot(model)
    steps = 12
    trainer = zo_trainer(model, lm_data, tmp_path / "out", "sparse_mezo", max_steps=steps)
    recorder = _RecordLoraB(model)
    trainer.add_callback(recorder)
    trainer.train()
    thresholds = {t.name: t.threshold for t in trainer.zo_engine.targets}
    lora_b = [n for n in thresholds if "lora_B" in n]
    lora_a = [n for n in thresholds if "lora_A" in n]
    assert lora_b and all(thresholds[n] is None for n in lora_b)
    assert lora_a and all(thresholds[n] is not None and thresholds[n] > 0 for n in lora_a)
    assert len(recorder.history) == steps + 1
    for name in lora_b:  # Moves at every step, every entry (dense), not only at the first.
        for step in range(steps):
            assert bool((recorder.history[step + 1][name] != recorder.history[step][name]).all()), (name, step)
    after = snapshot(model)
    for name in lora_a:
        # Masked as usual: an entry above the threshold never takes part, so never moves.
        changed = before[name] != after[name]
        assert changed.any(), name
        assert not (changed & (before[name].abs() > thresholds[name])).any(), name


def test_sparse_mezo_trains_every_tensor_peft_marked_trainable(tiny_llama_factory, lm_data, tmp_path):
    """Embedding adapters are not projection matrices: with PEFT they still take part (densely), as PEFT says."""
    model = get_peft_model(tiny_llama_factory(), LoraConfig(**dict(LORA, target_modules=["q_proj", "embed_tokens"])))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_embedding_A" in name for name in trainable)
    before = snapshot(model)
    trainer = zo_trainer(model, lm_data, tmp_path / "out", "sparse_mezo", max_steps=2)
    trainer.train()
    assert {t.name for t in trainer.zo_engine.targets} == trainable
    thresholds = trainer.zo_engine.thresholds()
    assert all(thresholds[n] is None for n in trainable if "lora_embedding" in n or "lora_B" in n)
    assert all(thresholds[n] is not None for n in trainable if "q_proj.lora_A" in n)
    after = snapshot(model)
    assert {name for name in before if not torch.equal(before[name], after[name])} == trainable


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_sparse_lora_resumes_bit_exactly(tiny_llama_factory, lm_data, tmp_path):
    """The adapter checkpoint plus the saved thresholds (None for the dense lora_B) continue the same run."""

    def run(output_dir, stop_at=None, resume=None):
        model = get_peft_model(tiny_llama_factory(), LoraConfig(**LORA))
        trainer = zo_trainer(
            model, lm_data, output_dir, "sparse_mezo", max_steps=4, save_strategy="steps", save_steps=2
        )
        if stop_at is not None:
            trainer.add_callback(_StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, _ = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=2)
    resumed, trainer = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert any(t.threshold is None for t in trainer.zo_engine.targets)
    expected, found = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[name], found[name]) for name in expected)


def test_uninformative_magnitudes_get_no_threshold():
    """Constant |W| and a zero quantile both mean dense; an ordinary matrix gets its quantile."""
    tensors = {
        "zeros": torch.zeros(8, 16),
        "constant": torch.full((8, 16), -0.5),
        "mostly_zero": torch.cat([torch.zeros(100), torch.randn(28)]),
        "ordinary": torch.randn(8, 16, generator=torch.Generator().manual_seed(0)),
    }
    owner = torch.nn.Identity()
    targets = [ZOTarget(name=k, modules=(owner,), get=lambda t=t: t, set=lambda _: None) for k, t in tensors.items()]
    engine = ZOEngine(targets)
    engine.set_thresholds(0.8)
    found = engine.thresholds()
    assert found["zeros"] is None and found["constant"] is None and found["mostly_zero"] is None
    expected = tensors["ordinary"].abs().flatten().kthvalue(26).values.item()  # ceil(0.2 * 128)
    assert found["ordinary"] == expected
    engine.remove()


def test_qzo_on_a_peft_model_is_refused(tiny_llama_factory, lm_data, tmp_path):
    model = get_peft_model(tiny_llama_factory(), LoraConfig(**LORA))
    with pytest.raises(ValueError, match="qzo.*PEFT adapter cannot save or reload.*optim='mezo'"):
        zo_trainer(model, lm_data, tmp_path / "out", "qzo")


# --------------------------------------------------------------------------- LoRA on an NF4 base (QLoRA)
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return str(path)


def load_nf4(path: str):
    from transformers import AutoModelForCausalLM

    from zo_trainer.quant import nf4_config

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(), dtype=torch.float32)


@pytest.mark.quant
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not importable: run scripts/install_quant.sh")
@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_qlora_adapters_train_over_a_frozen_nf4_base(optim, tiny_llama_dir, lm_data, tmp_path):
    from zo_trainer.quant.bnb import is_bnb_4bit_module, keep_fp32_cpu_path

    model = get_peft_model(load_nf4(tiny_llama_dir), LoraConfig(**LORA))
    quantized = [m for m in model.modules() if is_bnb_4bit_module(m)]
    assert len(quantized) == 14  # 7 projections x 2 layers are 4-bit
    codes = [m.weight.data.clone() for m in quantized]
    absmax = [m.weight.quant_state.absmax.clone() for m in quantized]
    adapters = lora_names(model)
    before = snapshot(model)
    trainer = zo_trainer(model, lm_data, tmp_path / "out", optim)
    trainer.train()
    trainer.save_model()
    after = snapshot(model)
    assert {name for name in adapters if not torch.equal(before[name], after[name])} == adapters
    # The NF4 base is frozen and stayed on bnb's fp32 dequantize path (no repack for the bf16 CPU kernel).
    for module, code, scale in zip(quantized, codes, absmax):
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(module.weight.data, code) and torch.equal(module.weight.quant_state.absmax, scale)
    for name in before:
        if name not in adapters:
            assert torch.equal(before[name], after[name]), name

    reloaded = PeftModel.from_pretrained(load_nf4(tiny_llama_dir), str(tmp_path / "out"))
    keep_fp32_cpu_path(reloaded)
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[name], after[name]) for name in adapters)
    tokens = lm_data[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(tokens).logits, model.eval()(tokens).logits)


@pytest.mark.quant
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not importable: run scripts/install_quant.sh")
def test_qzo_on_qlora_is_refused_with_the_alternatives(tiny_llama_dir, lm_data, tmp_path):
    from zo_trainer.quant.bnb import is_bnb_4bit_module

    model = get_peft_model(load_nf4(tiny_llama_dir), LoraConfig(**LORA))
    quantized = [m for m in model.modules() if is_bnb_4bit_module(m)]
    absmax = [m.weight.quant_state.absmax.clone() for m in quantized]
    with pytest.raises(ValueError, match="4-bit base model.*use optim='mezo' or 'sparse_mezo'"):
        zo_trainer(model, lm_data, tmp_path / "out", "qzo")
    assert quantized and all(torch.equal(m.weight.quant_state.absmax, a) for m, a in zip(quantized, absmax))
