"""mezo / sparse_mezo / qzo on tiny random models of eight decoder families beyond Llama.

Each model is built from a config (2 layers, hidden 32, vocabulary 128) and trained for 2 steps through
``ZOTrainer`` on random token sequences (language-modelling loss). The tests check which tensors moved,
that every other tensor stayed bit-identical, and that every tensor mezo trains is really perturbed inside
the forward pass (a tensor read outside its module's forward would be updated along a meaningless z).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import random_lm_rows
from zo_trainer import ZOTrainer, ZOTrainingArguments
from zo_trainer.engine import ZOEngine
from zo_trainer.methods import MeZO

VOCAB = 128
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
_GQA = dict(_DECODER, num_key_value_heads=2)
_LLAMA_LIKE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# family: (config class, config kwargs, prefix of the decoder blocks, projection modules inside one block)
FAMILIES = {
    # The MeZO paper's family: biases everywhere, learned positions, LayerNorm with bias, tied lm_head.
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "model.decoder.layers",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
    # Conv1D projections (weights stored transposed), learned positions, tied lm_head.
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
        "transformer.h",
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ),
    "qwen2": ("Qwen2Config", _GQA, "model.layers", _LLAMA_LIKE),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(_GQA, head_dim=8), "model.layers", _LLAMA_LIKE),  # q/k norms
    "mistral": ("MistralConfig", _GQA, "model.layers", _LLAMA_LIKE),
    "gemma": ("GemmaConfig", dict(_GQA, head_dim=8), "model.layers", _LLAMA_LIKE),  # scaled, tied embeddings
    "phi": (
        "PhiConfig",
        _DECODER,
        "model.layers",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        _DECODER,
        "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "falcon": (
        "FalconConfig",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "transformer.h",
        ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
}


def build(family: str):
    config_class, kwargs, _, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def lm_data():
    return random_lm_rows(VOCAB)


def train(model, data, tmp_path, optim: str, **overrides) -> ZOTrainer:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        optim=optim,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
    )
    settings.update(overrides)
    trainer = ZOTrainer(model=model, args=ZOTrainingArguments(**settings), train_dataset=data)
    trainer.train()
    return trainer


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=True)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mezo_trains_every_float_tensor(family, lm_data, tmp_path):
    model = build(family)
    before = snapshot(model)
    trainer = train(model, lm_data, tmp_path, "mezo")
    after = snapshot(model)
    assert {t.name for t in trainer.zo_engine.targets} == set(before)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"{family}: mezo left {unchanged} untouched"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_mezo_tensor_is_perturbed_inside_the_forward(family):
    """The engine perturbs a tensor in a hook on the module that owns it; a tensor that the model read
    elsewhere would keep its stored value in the +eps / -eps passes (the estimate would ignore it)."""
    model = build(family).eval()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    args = ZOTrainingArguments(output_dir="unused", optim="mezo", report_to="none")
    with torch.no_grad():
        reference = model(tokens).logits
        for target in MeZO(args).targets(model):
            engine = ZOEngine([target])
            try:
                with engine.perturbed(step_seed=11, signed_eps=1e-2):
                    perturbed = model(tokens).logits
            finally:
                engine.remove()
            assert not torch.equal(perturbed, reference), f"{family}: perturbing {target.name} changed nothing"
        assert torch.equal(model(tokens).logits, reference)  # Every perturbation was undone exactly.


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_mezo_trains_the_decoder_projections_only(family, lm_data, tmp_path):
    _, _, blocks, projections = FAMILIES[family]
    model = build(family)
    before = snapshot(model)
    trainer = train(model, lm_data, tmp_path, "sparse_mezo")
    after = snapshot(model)
    expected = {f"{blocks}.{layer}.{module}.weight" for layer in range(2) for module in projections}
    assert {t.name for t in trainer.zo_engine.targets} == expected
    for name in before:
        if name not in expected:  # Embeddings, positions, lm_head, norms, biases: bit-identical.
            assert torch.equal(before[name], after[name]), f"{family}: {name} moved under sparse_mezo"
            continue
        changed = (before[name] != after[name]).float().mean().item()
        # zo_sparsity 0.8: 20% of each matrix takes part at a step; the mask follows the weights over 2 steps.
        assert 0.05 < changed < 0.4, f"{family}: {name} changed {changed:.2f} of its entries"


@pytest.mark.parametrize("family", ["opt", "gpt2", "qwen2", "mistral"])
def test_qzo_is_refused_on_a_model_that_is_not_quantized(family, lm_data, tmp_path):
    model = build(family)
    before = snapshot(model)
    args = ZOTrainingArguments(output_dir=str(tmp_path / "out"), optim="qzo", max_steps=1, report_to="none")
    with pytest.raises(ValueError, match="qzo needs a 4-bit model.*--quantization nf4"):
        ZOTrainer(model=model, args=args, train_dataset=lm_data)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_mezo_trains_lora_adapters_on_every_family(family, lm_data, tmp_path):
    """PEFT's default LoRA targets for the family (GPT-2: the Conv1D c_attn): only the adapters move,
    lora_A masked by magnitude, the zero-initialised lora_B dense."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(family), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    adapters = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    before = snapshot(model)
    trainer = train(model, lm_data, tmp_path, "sparse_mezo")
    after = snapshot(model)
    assert {name for name in before if not torch.equal(before[name], after[name])} == adapters
    thresholds = trainer.zo_engine.thresholds()
    assert all((thresholds[name] is None) == ("lora_B" in name) for name in adapters)
