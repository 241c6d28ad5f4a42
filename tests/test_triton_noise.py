"""z schemes 4-6 (``zo_trainer.triton_noise``): z of a CUDA tensor is the CPU's counter stream (scheme 3's
16-bit picks under scheme 4, 8-bit picks under 5; from 6 Rademacher z too, the picks' signs), drawn inside Triton
kernels that apply it. On a GPU these run the compiled kernels; without one, Triton's interpreter runs the same kernels
on CPU tensors (TRITON_INTERPRET=1), so CI checks the kernels' logic and bits too."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_tiny_llama
from zo_trainer import counter_noise, triton_noise
from zo_trainer.engine import ZOEngine, perturbation_seed, projected_gradient, target_seed
from zo_trainer.methods import MeZO, SparseMeZO
from zo_trainer.training_args import ZOTrainingArguments

# Not imported here: on CPU, Triton must first be imported with TRITON_INTERPRET=1 set (the fixture below).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# Keys whose int64 argument is small, negative and large: the kernels must read all 64 bits the same way.
KEYS = (1, 12345, (1 << 63) - 7, 0x9E3779B97F4A7C15, (1 << 64) - 1)


@pytest.fixture(autouse=True)
def kernels_run_here(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_noise.supported(torch.empty(4, device=DEVICE))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu().view(BITS[tensor.dtype])


# The counter streams the kernels draw: (pick bits, distribution).
STREAMS = [(16, "gaussian"), (8, "gaussian"), (8, "rademacher")]


@pytest.mark.parametrize("pick_bits,distribution", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_gives_the_counter_streams_bits(dtype, pick_bits, distribution):
    """z in every dtype is the CPU stream's table entry, bit for bit, whatever the key and however the tensor's size
    falls against the kernel's blocks."""
    for key in KEYS:
        for numel in (1, 5, triton_noise.BLOCK, 3 * triton_noise.BLOCK + 7):
            out = triton_noise.fill_(torch.empty(numel, dtype=dtype, device=DEVICE), key, pick_bits, distribution)
            expected = counter_noise.counter_normal_reference(numel, key, 0, dtype, pick_bits, distribution)
            assert torch.equal(bits(out), bits(expected)), (key, numel)


@pytest.mark.parametrize("pick_bits,distribution", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [None, 0.6])
def test_perturbed_copy_is_weight_plus_eps_z_in_one_rounding(dtype, threshold, pick_bits, distribution):
    """``w + eps * z (* (|w| <= threshold))`` computed in fp32 and rounded once; the weight is left untouched. The
    mask compares |w| with the threshold rounded to the tensor's dtype."""
    numel, key, eps = 2 * triton_noise.BLOCK + 11, 99, 0.25
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = weight.clone()
    out = triton_noise.perturbed_copy(
        weight.to(DEVICE), torch.empty(numel, dtype=dtype, device=DEVICE), key, eps, threshold, pick_bits, distribution
    )
    z = counter_noise.counter_normal_reference(numel, key, 0, torch.float32, pick_bits, distribution)
    step = eps * z
    if threshold is not None:
        mask = weight.float().abs() <= float(torch.tensor(threshold).to(dtype))
        assert 0 < int(mask.sum()) < numel
        step = torch.where(mask, step, 0.0)
    expected = (weight.float() + step).to(dtype)
    assert torch.equal(before, weight)
    # fp32: a GPU may fuse the multiply-add (one rounding less); a narrow dtype's single rounding absorbs that.
    tolerance = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(out.cpu(), expected, **tolerance)


@pytest.mark.parametrize("pick_bits,distribution", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_applies_every_key_under_the_mask_of_the_old_values(dtype, pick_bits, distribution):
    """``w -= sum_k c_k z_k`` where |w| <= threshold before the update (keys with a zero coefficient change nothing),
    then decoupled decay on those entries and the clamp; the count of entries taking part comes back as a tensor."""
    numel, keys, coefficients, threshold = 3 * triton_noise.BLOCK - 5, [7, 8, 9], [0.5, -0.25, 0.0], 0.8
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype)
    work = weight.to(DEVICE, copy=True)
    arguments = triton_noise.update_arguments([keys], coefficients, work.device)
    count = triton_noise.update_(
        work,
        arguments[0][0],
        arguments[1],
        threshold,
        decay=-0.01,
        min_value=-1.5,
        pick_bits=pick_bits,
        distribution=distribution,
    )
    mask = weight.float().abs() <= float(torch.tensor(threshold).to(dtype))
    change = sum(
        c * counter_noise.counter_normal_reference(numel, k, pick_bits=pick_bits, distribution=distribution)
        for k, c in zip(keys, coefficients)
    )
    updated = torch.where(mask, weight.float() - change, weight.float())
    expected = torch.where(mask, updated - 0.01 * updated, updated).clamp(min=-1.5).to(dtype)
    assert isinstance(count, torch.Tensor) and int(count) == int(mask.sum())
    tolerance = {"atol": 2e-6, "rtol": 2e-6} if dtype == torch.float32 else {"atol": 0, "rtol": 0}
    if dtype != torch.float32:  # Several fused multiply-adds may round the fp32 sum differently before the cast.
        tolerance = {"atol": 1e-2, "rtol": 1e-2}
        assert (bits(work) != bits(expected)).float().mean() < 0.01
    torch.testing.assert_close(work.cpu(), expected, **tolerance)
    dense = weight.to(DEVICE, copy=True)
    first_key, first_coefficient = triton_noise.update_arguments([keys[:1]], coefficients[:1], dense.device)
    assert (
        triton_noise.update_(dense, first_key[0], first_coefficient, None, 0.0, None, pick_bits, distribution) is None
    )
    z = counter_noise.counter_normal_reference(numel, 7, pick_bits=pick_bits, distribution=distribution)
    torch.testing.assert_close(dense.cpu().float(), (weight.float() - 0.5 * z).to(dtype).float())


# (the CPU reference's scheme, the kernels' scheme, their stream's pick bits, z's distribution)
SCHEME_PAIRS = [(3, 4, 16, "gaussian"), (5, 5, 8, "gaussian"), (6, 6, 8, "rademacher")]


def engines(optim: str, cpu_scheme: int = 3, kernel_scheme: int = 4, distribution: str = "gaussian"):
    """The same tiny model twice: on the CPU with ``cpu_scheme`` (torch ops and the C fill), and on DEVICE with
    ``kernel_scheme`` (the kernels). Scheme 3 on CUDA would draw ``normal_`` instead: the CPU run is the reference for the
    same z (and never takes the kernels, even where the interpreter would run them on CPU tensors)."""
    args = ZOTrainingArguments(output_dir="unused", optim=optim, report_to="none", learning_rate=0.1, zo_eps=1e-2)
    pairs = []
    for scheme, device in ((cpu_scheme, "cpu"), (kernel_scheme, DEVICE)):
        model = make_tiny_llama(300, hidden_size=64, max_position_embeddings=32).to(device).eval()
        method = (SparseMeZO if optim == "sparse_mezo" else MeZO)(args)
        engine = ZOEngine(method.targets(model), num_noise_threads=1, distribution=distribution)
        engine.load_noise_config({**engine.noise_config(), "scheme": scheme})
        if device == "cpu" and not pairs:
            engine._fused = lambda tensor: False
        if optim == "sparse_mezo":
            engine.set_thresholds(0.5)
        pairs.append((model, engine))
    return pairs


@pytest.mark.parametrize("cpu_scheme,scheme,pick_bits,distribution", SCHEME_PAIRS)
@pytest.mark.parametrize("optim", ["mezo", "sparse_mezo"])
def test_kernel_engine_draws_the_cpus_z_and_restores_exactly(optim, cpu_scheme, scheme, pick_bits, distribution):
    """A whole ZO step through the engine: under schemes 4-6 every target takes the kernels (on CPU: interpreted), z
    of every target is the CPU's z (scheme 3's, 5's, 6's Rademacher) bit for bit, the two losses and the update agree
    with the CPU's step to fp32 rounding, and the weights come back bit for bit after each perturbed forward."""
    (reference, old), (model, new) = engines(optim, cpu_scheme, scheme, distribution)
    assert new.noise_config()["scheme"] == scheme and all(new._fused(t.get()) for t in new.targets)
    assert not any(old._fused(t.get()) for t in old.targets)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    seed = perturbation_seed(5, 0)
    for target in new.targets[:6]:
        z = new.noise(target, seed)
        key = target_seed(seed, target.index)
        expected = counter_noise.counter_normal_reference(
            z.numel(), key, pick_bits=pick_bits, distribution=distribution
        )
        assert torch.equal(bits(z), bits(expected.view(z.shape))), target.name
        assert torch.equal(bits(old.noise(old.targets[target.index], seed)), bits(expected.view(z.shape)))
    losses = {}
    for name, m, engine in (("old", reference, old), ("new", model, new)):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        with torch.no_grad():
            with engine.perturbed(seed, 1e-2):
                plus = m(ids.to(m.device), labels=ids.to(m.device)).loss
            assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
            with engine.perturbed(seed, -1e-2):
                minus = m(ids.to(m.device), labels=ids.to(m.device)).loss
            assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
        losses[name] = (plus, minus)
    assert [float(v) for v in losses["old"]] == pytest.approx([float(v) for v in losses["new"]], rel=1e-4)
    coefficient = 0.1 * float(projected_gradient(*losses["old"], 1e-2))  # One coefficient: compare the updates alone.
    assert coefficient != 0.0
    old.update([seed], [coefficient])
    new.update([seed], [coefficient])
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.cpu(), p, atol=1e-6, rtol=1e-5, msg=name)
    if optim == "sparse_mezo":
        assert old.pop_mask_fraction() == pytest.approx(new.pop_mask_fraction(), abs=1e-6)


@pytest.mark.parametrize("scheme,distribution", [(4, "gaussian"), (5, "gaussian"), (6, "rademacher")])
def test_a_kernel_scheme_trajectory_without_triton_on_cuda_is_one_clear_error(scheme, distribution, monkeypatch):
    """Replaying or resuming a scheme-4/5/6 run needs Triton where the tensors are on CUDA: one error naming the way
    out."""
    (_, _), (model, engine) = engines("mezo", distribution=distribution)
    monkeypatch.setattr(triton_noise, "available", lambda: False)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match=f"scheme {scheme}.*Triton"):
            engine.load_noise_config({**engine.noise_config(), "scheme": scheme})
    else:  # A CPU run draws the scheme's z with the C fill: no Triton needed.
        monkeypatch.delenv("TRITON_INTERPRET")
        engine.load_noise_config({**engine.noise_config(), "scheme": scheme})
        assert not any(engine._fused(t.get()) for t in engine.targets)
