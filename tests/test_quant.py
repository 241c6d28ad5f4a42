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

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
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


def test_zo_signal_fp32_path(qmodel, batch):
    """Projected gradient with a seeded Gaussian z on ALL scales agrees at eps=1e-3 and 1e-4
    (bf16 paths fail this), in eval mode after prepare()."""
    from zo_trainer.quant import scale_tensors

    kind, model = qmodel
    model.eval()
    scales = scale_tensors(model)
    gen = torch.Generator().manual_seed(1234)
    zs = [torch.randn(s.get().shape, generator=gen) for s in scales]
    base = [s.get() for s in scales]
    l0 = _loss(model, batch)

    def projected(eps):
        for s, t, z in zip(scales, base, zs):
            s.set(t + eps * z)
        lp = _loss(model, batch)
        for s, t, z in zip(scales, base, zs):
            s.set(t - eps * z)
        lm = _loss(model, batch)
        for s, t in zip(scales, base):
            s.set(t)
        return (lp - lm) / (2 * eps)

    g3, g4 = projected(1e-3), projected(1e-4)
    assert abs(g3 - g4) <= 0.1 * max(abs(g3), abs(g4)), (g3, g4)
    assert _loss(model, batch) == l0
    # no repack / bf16 path kicked in during the eval forwards
    for s in scales:
        assert s.get().dtype == torch.float32
        if kind == "nf4":
            assert not getattr(s.module.weight.quant_state, "packing_format_for_cpu", False)


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

    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4")
    model = torch.nn.Sequential(lin).to("cpu")
    assert lin.weight.quant_state.nested
    backend = get_backend(model)
    assert backend is not None and backend.name == "nf4"
    with pytest.raises(ValueError, match="double quant.*bnb_4bit_use_double_quant=False"):
        backend.prepare(model)
