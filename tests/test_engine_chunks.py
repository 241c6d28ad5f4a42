"""z schemes 2 and 3 work a chunk of several NOISE_BLOCK blocks at a time (``ZOEngine.CHUNK_BLOCKS``): each block is still
seeded and drawn on its own, only the elementwise work is one op per chunk. Here every chunked path is checked, bit for
bit, against a per-block reference built in the test from ``ZOEngine._block_noise`` (one block, one seed, one op on one
intra-op thread), on tensors whose last block is partial and whose block count the chunk size does not divide, on 1-3
intra-op threads; and z itself is pinned to the values the per-block engine of git 9f34871 drew, so a change of z
cannot pass unnoticed."""

from __future__ import annotations

import contextlib
import hashlib
import threading

import pytest
import torch
from torch import nn

from zo_trainer.engine import ZOEngine, parameter_targets, target_seed

# 256-entry blocks in chunks of 4: the 37 x 61 weight is 8 full blocks and one of 209 entries (209 = 26 bytes + 1 bit
# of Rademacher signs), chunked 4 + 4 + 1; the 100-entry bias is one partial block.
BLOCK, CHUNK = 256, 4
ROWS, COLS = 37, 61


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", BLOCK)
    monkeypatch.setattr(ZOEngine, "CHUNK_BLOCKS", CHUNK)


class Layer(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(ROWS, COLS, generator=generator).to(dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(100, generator=generator).to(dtype), requires_grad=False)


# z as new runs draw it on CPU (scheme 6: Gaussian from a counter-based stream of 8-bit picks, Rademacher its signs),
# scheme 3's Gaussian (16-bit picks), scheme 2's (one normal_ stream per block) and schemes 2-5's Rademacher (torch
# generator bits per block), which replay and resume of scheme-2 to 5 runs still draw.
DISTRIBUTIONS = ("gaussian", "gaussian-scheme3", "gaussian-scheme2", "rademacher", "rademacher-scheme5")


def engine_for(module: nn.Module, distribution: str, threads: int) -> ZOEngine:
    """An engine drawing ``distribution`` (one of DISTRIBUTIONS) z on ``threads`` noise threads."""
    name, _, scheme = distribution.partition("-scheme")
    engine = ZOEngine(parameter_targets(module, lambda *_: True), threads, distribution=name)
    assert engine.noise_scheme == 6
    engine.noise_scheme = int(scheme or engine.noise_scheme)
    if threads > 1:
        engine.CHEAP_DRAW_THREADS = 0  # Cheap draws (Rademacher, scheme 3) over the noise threads too (default: one).
    return engine


def reference_z(engine: ZOEngine, target, step_seed: int) -> torch.Tensor:
    """z of ``target``, one ``_block_noise`` call per block into a buffer of its own."""
    flat, size = target.get().view(-1), engine.NOISE_BLOCK
    seed = target_seed(step_seed, target.index)
    pieces = []
    for start in range(0, flat.numel(), size):
        block = torch.empty(min(size, flat.numel() - start), dtype=flat.dtype)
        pieces.append(engine._block_noise(seed, start, block, 0))
    return torch.cat(pieces).view(target.get().shape)


def block_pairs(size: int, *tensors: torch.Tensor):
    """The per-block views (blocks of ``size`` entries) of equally shaped tensors, block after block."""
    flats = [t.view(-1) for t in tensors]
    for start in range(0, flats[0].numel(), size):
        yield [flat[start : start + size] for flat in flats]


def block_mask(values: torch.Tensor, threshold: float | None) -> torch.Tensor | None:
    return None if threshold is None else (values.abs() <= threshold).to(values.dtype)


@contextlib.contextmanager
def one_intra_op_thread():
    """The reference's ops run on one thread: in bf16 an op split over threads can round an entry otherwise."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reference_perturbed(engine: ZOEngine, target, step_seed: int, signed_eps: float) -> torch.Tensor:
    with one_intra_op_thread():
        return _reference_perturbed(engine, target, step_seed, signed_eps)


def _reference_perturbed(engine: ZOEngine, target, step_seed: int, signed_eps: float) -> torch.Tensor:
    z = reference_z(engine, target, step_seed)
    out = torch.empty_like(z)
    for values, z_block, out_block in block_pairs(engine.NOISE_BLOCK, target.get(), z, out):
        mask = block_mask(values, target.threshold)
        if mask is None:
            torch.add(values, z_block, alpha=signed_eps, out=out_block)
        else:
            torch.addcmul(values, z_block, mask, value=signed_eps, out=out_block)
    return out


def reference_update(engine: ZOEngine, expected: list[torch.Tensor], seeds, coefficients, lr: float) -> int:
    """``engine.update`` block by block on ``expected`` (copies of the targets' tensors); returns the masked count."""
    with one_intra_op_thread():
        return _reference_update(engine, expected, seeds, coefficients, lr)


def _reference_update(engine: ZOEngine, expected: list[torch.Tensor], seeds, coefficients, lr: float) -> int:
    count = 0
    for target, tensor in zip(engine.targets, expected):
        zs = [reference_z(engine, target, seed) for seed in seeds]
        for values, *z_blocks in block_pairs(engine.NOISE_BLOCK, tensor, *zs):
            mask = block_mask(values, target.threshold)
            count += values.numel() if mask is None else int((mask != 0).sum())
            for z_block, coefficient in zip(z_blocks, coefficients):
                if coefficient and mask is None:
                    values.add_(z_block, alpha=-coefficient)
                elif coefficient:
                    values.addcmul_(z_block, mask, value=-coefficient)
            if target.weight_decay and lr:
                decay = -lr * target.weight_decay
                if mask is None:
                    values.mul_(1.0 + decay)
                else:
                    values.add_(values * mask, alpha=decay)
            if target.min_value is not None:
                values.clamp_(min=target.min_value)
    return count


DTYPES = [torch.float32, torch.bfloat16]
CASES = pytest.mark.parametrize(
    "distribution,dtype,threads",
    [(d, t, n) for d in DISTRIBUTIONS for t in DTYPES for n in (1, 2)],
)


@CASES
def test_chunked_z_equals_per_block_draws(distribution, dtype, threads, small_blocks):
    engine = engine_for(Layer(dtype), distribution, threads)
    for target in engine.targets:
        z = engine.noise(target, 1234)
        assert torch.equal(z, reference_z(engine, target, 1234)), target.name
    assert len({tuple(engine.noise(engine.targets[0], seed).view(-1)[:32].tolist()) for seed in (1, 2)}) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocks_not_made_of_whole_vectors_or_words_are_worked_one_by_one(dtype, small_blocks, monkeypatch):
    """A block of 200 entries is neither whole SIMD vector pairs nor whole 64-bit words of Rademacher bits."""
    monkeypatch.setattr(ZOEngine, "NOISE_BLOCK", 200)
    engine = engine_for(Layer(dtype), "rademacher-scheme5", 1)
    for target in engine.targets:
        assert torch.equal(engine.noise(target, 1234), reference_z(engine, target, 1234)), target.name


@CASES
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_perturbed_copy_equals_per_block_reference(distribution, dtype, threads, sparse, small_blocks):
    engine = engine_for(Layer(dtype), distribution, threads)
    if sparse:
        engine.set_thresholds(0.5)
    for target in engine.targets:
        for signed_eps in (1e-2, -3e-3):
            copy = engine._perturbed_tensor(target, target.get(), 77, signed_eps)
            expected = reference_perturbed(engine, target, 77, signed_eps)
            assert torch.equal(copy, expected), (target.name, signed_eps)
            assert not torch.equal(copy, target.get())


@CASES
def test_chunked_update_equals_per_block_reference(distribution, dtype, threads, small_blocks):
    """Two perturbations (one with coefficient 0: skipped), a mask, weight decay and a clamp, in that order per
    entry; the masked count (mask fraction) is exact."""
    layer, reference = Layer(dtype), Layer(dtype)
    engine = engine_for(layer, distribution, threads)
    engine.set_thresholds(0.5)
    weight, bias = engine.targets
    weight.weight_decay, bias.min_value = 0.1, -0.5
    seeds, coefficients, lr = [11, 12, 13], [0.3, 0.0, -0.2], 0.05
    expected_count = reference_update(engine, [reference.weight.data, reference.bias.data], seeds, coefficients, lr)
    engine.update(seeds, coefficients, lr=lr)
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    assert not torch.equal(layer.weight, Layer(dtype).weight)
    assert 0 < expected_count < engine.total_numel
    assert engine.pop_mask_fraction() == pytest.approx(expected_count / engine.total_numel, rel=1e-6)


@pytest.mark.parametrize("intra_op_threads", [1, 2, 3])
@pytest.mark.parametrize("noise_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_real_blocks_keep_the_per_block_bits_on_any_torch_thread_count(
    distribution, dtype, noise_threads, intra_op_threads
):
    """Default 65536-entry blocks, 9 and a partial one of 40001. torch splits an op over its threads, and in bf16 and
    fp16 an entry in the scalar tail of a split piece can round otherwise than in the vector body: chunks must be cut
    where every piece stays whole vectors (on 3 threads: chunks of 6, 3 or 1 blocks), and the partial block, which no
    split on 2-3 threads keeps whole, is worked on one thread, so the bits are the same on every thread count and in
    the noise threads (one intra-op thread each). Dense (``add``, ``add_``, ``mul_``) and masked (``addcmul``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads)
    try:
        holder = nn.Module()
        generator = torch.Generator().manual_seed(4)
        for name in ("dense", "masked"):
            values = torch.randn(9 * ZOEngine.NOISE_BLOCK + 40001, generator=generator).to(dtype)
            holder.register_parameter(name, nn.Parameter(values, requires_grad=False))
        engine = engine_for(holder, distribution, noise_threads)
        dense, masked = engine.targets
        masked.threshold, dense.weight_decay, masked.weight_decay = 0.7, 0.1, 0.1
        for target in engine.targets:
            copy = engine._perturbed_tensor(target, target.get(), 21, 1e-3)
            assert torch.equal(copy, reference_perturbed(engine, target, 21, 1e-3)), target.name
        expected = [holder.dense.detach().clone(), holder.masked.detach().clone()]
        reference_update(engine, expected, [21, 22], [0.37, -0.11], 0.05)
        engine.update([21, 22], [0.37, -0.11], lr=0.05)
        assert torch.equal(holder.dense, expected[0]) and torch.equal(holder.masked, expected[1])
    finally:
        torch.set_num_threads(previous)


class Vocab(nn.Module):
    """An embedding and an untied vocab projection, large enough for the row paths."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.embed = nn.Embedding(120, 45, dtype=dtype)
        self.head = nn.Linear(45, 120, bias=False, dtype=dtype)
        for p in self.parameters():
            p.requires_grad_(False)
            p.copy_(torch.randn(p.shape, generator=generator).to(dtype))


@CASES
@pytest.mark.parametrize("sparse", [False, True])
def test_row_paths_equal_per_block_reference(distribution, dtype, threads, sparse, small_blocks, monkeypatch):
    """The embedding's rows and the lm_head's chunks (22 blocks, the last partial; lm_head chunks of 5 blocks in fp32,
    10 in bf16, worked 2 + 2 + 1 and 4 + 4 + 2 blocks at a time, rows of 45 cut at chunk ends) come out as the per-block reference's perturbed tensor. The lm_head is fed the identity, so
    its output is its perturbed weight exactly, whatever order BLAS sums in."""
    monkeypatch.setattr(ZOEngine, "ROW_CHUNK_BYTES", 5 * BLOCK * 4)
    model = Vocab(dtype)
    engine = engine_for(model, distribution, threads)
    if sparse:
        engine.set_thresholds(0.5)
    embed, head = engine.targets
    ids = torch.tensor([[119, 0, 7, 7], [12, 13, 60, 61]])  # Rows in the first, last, and straddling blocks.
    with torch.no_grad():
        assert engine._row_kind(model.embed, model.embed.weight) == "embedding"
        assert engine._row_kind(model.head, model.head.weight) == "linear"
        for signed_eps in (1e-2, -1e-2):
            with engine.perturbed(99, signed_eps):
                embedded, logits = model.embed(ids), model.head(torch.eye(45, dtype=dtype))
            expected_embed = reference_perturbed(engine, embed, 99, signed_eps)
            assert torch.equal(embedded, expected_embed[ids])
            assert torch.equal(logits, reference_perturbed(engine, head, 99, signed_eps).t())
            assert not torch.equal(logits, model.head.weight.t())


# sha256 of z's bytes (``engine.noise``) for a tensor of 3 default blocks + 1000 entries, step seed 5, target 0. Scheme
# 2: drawn by the engine of git 9f34871 (one op per block, before chunks); every committed scheme-2 run replays with
# these z. Scheme 3: its Gaussian z as first drawn (git of this test's commit; the values also follow from
# ``counter_noise.counter_normal_reference``, see tests/test_counter_noise.py); its Rademacher z is scheme 2's. Scheme 5:
# likewise, 8-bit picks (first drawn by the commit that added it). Scheme 4 draws scheme 3's z on CPU. Scheme 6: scheme
# 5's Gaussian z (the same hashes), and Rademacher z of its own, the signs of scheme 5's picks (first drawn by the
# commit that added it).
GOLDEN_Z = {
    (2, "gaussian", torch.float32): "1175d3399879347473bbec3d17830e2277a1967ecd8f561da127e7d19701498c",
    (2, "gaussian", torch.bfloat16): "5f0c94373ebce760fd69f11b944adbfb1c378a062aab24be98a449d7c34f832b",
    (2, "rademacher", torch.float32): "2472d10ee024462f68568dabae85d936c3a6d9cb2b3fda4b90489b5628ebd21b",
    (2, "rademacher", torch.bfloat16): "ccb3ff03b174ad39ab52d855a4dbe03138f8bec3b88d8b0c71ab9164eac53b19",
    (3, "gaussian", torch.float32): "3d71cda95d206c17600843408098f1f1b9d843de4b4fb3a6569b1737553b43ed",
    (3, "gaussian", torch.bfloat16): "2c0bfc56a0b023ec725dd93bd6353e9b89eb14374b424552af9c8239c3319951",
    (3, "gaussian", torch.float16): "bcdbe257d6840e3c6da2a746d097b4e3891848a707e4298801fe7823531d58f4",
    (3, "rademacher", torch.float32): "2472d10ee024462f68568dabae85d936c3a6d9cb2b3fda4b90489b5628ebd21b",
    (3, "rademacher", torch.bfloat16): "ccb3ff03b174ad39ab52d855a4dbe03138f8bec3b88d8b0c71ab9164eac53b19",
    (5, "gaussian", torch.float32): "216f8f08840418ff8d84f65fbdab2e8745cfe79253c10a4efaa9160543e7ca65",
    (5, "gaussian", torch.bfloat16): "e73a920b03bd66116962f0fb484401b5eb801dba85f4f1d902a4fdbaa25a2acc",
    (5, "gaussian", torch.float16): "1ac70770ee4daf13b1ea0052ea610fb4daeba6a9d8355fd1ae0605c1acd57f93",
    (5, "rademacher", torch.float32): "2472d10ee024462f68568dabae85d936c3a6d9cb2b3fda4b90489b5628ebd21b",
    (6, "gaussian", torch.float32): "216f8f08840418ff8d84f65fbdab2e8745cfe79253c10a4efaa9160543e7ca65",
    (6, "gaussian", torch.bfloat16): "e73a920b03bd66116962f0fb484401b5eb801dba85f4f1d902a4fdbaa25a2acc",
    (6, "rademacher", torch.float32): "8976353469578eaff93f66218104417e0e82a29cf40d9c37020800a6258a81e6",
    (6, "rademacher", torch.bfloat16): "d6dc70229f67c12d8a401908ef46e5a782f39dafe44026107f1c013cc27ea529",
}


@pytest.mark.parametrize("scheme,distribution,dtype", list(GOLDEN_Z))
@pytest.mark.parametrize("threads", [1, 2])
def test_z_values_are_pinned(scheme, distribution, dtype, threads):
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(3 * ZOEngine.NOISE_BLOCK + 1000, dtype=dtype), requires_grad=False)
    engine = engine_for(holder, f"{distribution}-scheme{scheme}", threads)
    assert engine.noise_scheme == scheme and engine.NOISE_BLOCK == 1 << 16
    z = engine.noise(engine.targets[0], 5)
    assert hashlib.sha256(z.view(torch.uint8).numpy().tobytes()).hexdigest() == GOLDEN_Z[(scheme, distribution, dtype)]


def test_noise_threads_end_with_each_update(small_blocks):
    """The noise threads live from a step's first draw to its update: a thread that ran a parallel torch op keeps an
    OpenMP team while it lives, and spare teams slow every forward of the process (evaluation between steps too)."""

    def noise_threads() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name.startswith("zo-noise")}

    layer = Layer(torch.float32)
    engine = engine_for(layer, "gaussian-scheme2", 2)  # Scheme 3's draws are cheap: they run on the calling thread.
    for step in range(2):
        others = noise_threads()  # Other tests' engines may still hold theirs.
        engine._perturbed_tensor(engine.targets[0], layer.weight, step, 1e-3)  # 8 blocks and a partial one: 2 runs
        started = noise_threads() - others  # One or two: the pool starts a second only if the first is still busy.
        assert started
        engine.update([step], [0.1])
        assert not any(thread.is_alive() for thread in started)
