"""QZO int4 back-ends on the real SmolLM2-135M (CPU): GPTQ (quantized by zo-quantize, group 64) and
bitsandbytes NF4.  Run: GPTQMODEL_CPU_WORKERS=2 python -m pytest tests/test_quant.py -q

The session fixtures base_dir / gptq_dir / gptq_model / nf4_model live in conftest.py (shared with
test_qzo.py). Set ZO_QUANT_TEST_GPTQ_DIR=<dir> to reuse an existing GPTQ checkpoint instead of quantizing.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import HAS_BNB, HAS_GPTQ, rte_texts

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

pytestmark = pytest.mark.quant

NEED_GPTQ = pytest.mark.skipif(not HAS_GPTQ, reason="gptqmodel/optimum not importable: run scripts/install_quant.sh")
NEED_BNB = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not importable: run scripts/install_quant.sh")


@pytest.fixture(scope="session")
def batch(base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(rte_texts(2, offset=100), return_tensors="pt", padding=True, truncation=True, max_length=48)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def _loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.fixture(params=["gptq", "nf4"])
def qmodel(request):
    return request.param, request.getfixturevalue(f"{request.param}_model")


def test_backend_and_kernel(qmodel):
    from zo_trainer.quant import get_backend, scale_tensors

    kind, model = qmodel
    backend = get_backend(model)
    assert backend is not None and backend.name == kind
    scales = scale_tensors(model)
    assert len(scales) == 30 * 7  # 30 layers x (q,k,v,o,gate,up,down)
    for s in scales:
        t = s.get()
        assert t.dtype == torch.float32 and not t.is_inference() and not t.requires_grad
    if kind == "gptq":
        assert {type(s.module).__name__ for s in scales} == {"TorchLinear"}
        assert all("dequantize_weight" not in s.module.__dict__ for s in scales)  # no torch.compile
    else:
        assert all(not s.module.support_avx512bf16_for_cpu for s in scales)


def test_set_restore_inplace_and_frozen(qmodel, batch):
    from zo_trainer.quant import get_backend, scale_tensors

    kind, model = qmodel
    model.eval()
    scales = scale_tensors(model)
    frozen = get_backend(model).frozen_state(model)
    l0 = _loss(model, batch)
    s = scales[3]
    orig = s.get()
    s.set(orig * 1.01)
    l1 = _loss(model, batch)
    assert l1 != l0, "perturbing one scale tensor must change the loss"
    s.set(orig)
    assert _loss(model, batch) == l0, "set(original) must restore the loss bit-exactly"
    # in-place edit of the master copy shows in the next forward
    backup = orig.clone()
    orig.mul_(1.01)
    l2 = _loss(model, batch)
    orig.copy_(backup)
    assert l2 == l1
    assert _loss(model, batch) == l0
    # integer weights / zero points / codes untouched
    after = get_backend(model).frozen_state(model)
    assert frozen.keys() == after.keys()
    for k in frozen:
        assert torch.equal(frozen[k], after[k]), k


def test_zo_signal_fp32_path(qmodel, batch, tmp_path):
    """On the QZO path (QZO's targets = every scale tensor, the engine's in-forward perturbation, fp32 dequant)
    the projected gradient of one seed agrees at eps=1e-3 and 1e-4 on a fixed batch.

    Measured on SmolLM2 (4 seeds, this batch): relative difference 0.07-15% (the larger values where |d| is
    small), GPTQ |d| 2..50, NF4 |d| 0.03..3.6. bf16 paths miss by 100%+ (e.g. -40.8 vs -1.4,
    notes/int4-on-cpu.md), so 20% keeps the test sharp. GPTQ's d at eps 1e-4 carries ~±1 of fp32 loss noise
    (loss differences of ~1e-4 over 2 eps): a seed whose |d| is a few units fails 20% by chance (z scheme 5,
    seed index 1: -1.24 / -2.75), so the seed is one with a large |d|."""
    from zo_trainer.engine import ZOEngine, perturbation_seed, projected_gradient
    from zo_trainer.methods import QZO
    from zo_trainer.training_args import ZOTrainingArguments

    kind, model = qmodel
    model.eval()
    engine = ZOEngine(QZO(ZOTrainingArguments(output_dir=str(tmp_path), optim="qzo", report_to="none")).targets(model))
    assert len(engine.targets) == 30 * 7
    # z scheme 5, measured: GPTQ d = 29.49 / 29.28, NF4 d = 2.566 / 2.558 (eps 1e-3 / 1e-4). A new z scheme draws
    # other z: re-measure, and keep a seed with |d| well above the noise.
    seed = perturbation_seed(0, 0)
    try:
        l0 = _loss(model, batch)

        def projected(eps):
            with torch.no_grad():
                with engine.perturbed(seed, +eps):
                    lp = model(**batch).loss
                with engine.perturbed(seed, -eps):
                    lm = model(**batch).loss
            return projected_gradient(lp, lm, eps).item()

        g3, g4 = projected(1e-3), projected(1e-4)
        assert g3 != 0.0 and g4 != 0.0
        assert abs(g3 - g4) <= 0.2 * max(abs(g3), abs(g4)), (g3, g4)
        assert _loss(model, batch) == l0, "the engine must restore the scales exactly"
    finally:
        engine.remove()
    # no repack / bf16 path kicked in during the eval forwards
    for t in engine.targets:
        assert t.get().dtype == torch.float32
        if kind == "nf4":
            assert not getattr(t.modules[0].weight.quant_state, "packing_format_for_cpu", False)


def test_save_reload_reproduces_loss(qmodel, batch, tmp_path):
    from zo_trainer.quant import get_backend, load_quantized, save_quantized, scale_tensors

    kind, model = qmodel
    model.eval()
    scales = scale_tensors(model)
    gen = torch.Generator().manual_seed(7)
    backups = [s.get().clone() for s in scales]
    try:
        for s in scales:  # edit every scale in place, as a QZO update would
            t = s.get()
            t.mul_(1 + 0.01 * torch.randn(t.shape, generator=gen)).clamp_(min=1e-8)
        l_edit = _loss(model, batch)
        save_quantized(model, tmp_path / "ckpt")
        reloaded = load_quantized(str(tmp_path / "ckpt"), kind)
        assert get_backend(reloaded).name == kind
        assert _loss(reloaded, batch) == pytest.approx(l_edit, abs=1e-6)
        got = {s.name: s.get() for s in scale_tensors(reloaded)}
        for s in scales:
            assert torch.equal(got[s.name], s.get()), s.name
        ref_frozen = get_backend(model).frozen_state(model)
        new_frozen = get_backend(reloaded).frozen_state(reloaded)
        for k in ref_frozen:
            assert torch.equal(ref_frozen[k], new_frozen[k]), k
        del reloaded
    finally:
        for s, b in zip(scales, backups):
            s.get().copy_(b)


@NEED_GPTQ
def test_gptq_checkpoint_loads_with_plain_from_pretrained(gptq_dir, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.float16)
    assert any(type(m).__module__.startswith("gptqmodel.") for m in model.modules())


def test_no_quantized_layers_raises(base_dir):
    from transformers import AutoModelForCausalLM

    from zo_trainer.quant import get_backend, scale_tensors

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert get_backend(model) is None
    with pytest.raises(ValueError, match=r"--optim qzo needs a 4-bit model.*zo-quantize.*--quantization nf4"):
        scale_tensors(model)


@NEED_BNB
def test_bnb_double_quant_rejected():
    import bitsandbytes as bnb

    from zo_trainer.quant import get_backend

    lin = bnb.nn.Linear4bit(
        128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4"
    )
    lin.weight = bnb.nn.Params4bit(
        torch.randn(64, 128), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    model = torch.nn.Sequential(lin).to("cpu")
    assert lin.weight.quant_state.nested
    backend = get_backend(model)
    assert backend is not None and backend.name == "nf4"
    with pytest.raises(ValueError, match="double quant.*bnb_4bit_use_double_quant=False"):
        backend.prepare(model)


@NEED_GPTQ
def test_nf4_on_a_gptq_checkpoint_is_refused(gptq_dir):
    from zo_trainer.quant import load_quantized

    with pytest.raises(ValueError, match="already a GPTQ checkpoint.*drop --quantization nf4"):
        load_quantized(gptq_dir, "nf4")
