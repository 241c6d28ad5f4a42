"""Counter-based Gaussian z of z schemes 3 (16-bit picks) and 5 (8-bit picks) (``zo_trainer.counter_noise``): the
compiled kernels (scheme 5: the AVX-512 one and the portable one) give the bits of the torch-ops reference, entry i
depends only on (key, i) (so chunks and threads change nothing), the values are a unit-variance Gaussian, and without
the C extension the same z comes from the reference. Rademacher z of scheme 6 is the same stream's signs: the same
checks on the fills and the apply."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from zo_trainer import counter_noise
from zo_trainer.counter_noise import counter_normal_, counter_normal_reference, normal_table

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KEY = 0x7FFF_1234_5678_9ABC


# Starts and sizes around word boundaries (4 / 8 entries) and the AVX-512 loop's groups of 64 entries.
SPANS = [(0, 1), (0, 7), (3, 10), (1, 2), (2, 1), (0, 64), (7, 64), (1, 71), (9, 200), (65536, 65536), (5, 100_003)]
SPANS += [((1 << 33) + 1, 50), ((1 << 33) + 3, 5_000)]


@pytest.mark.parametrize("pick_bits", counter_noise.PICK_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,numel", SPANS)
def test_the_c_fill_gives_the_reference_bits(dtype, start, numel, pick_bits):
    expected = counter_normal_reference(numel, KEY, start, dtype, pick_bits)
    for simd in (True, False):  # Scheme 5: the AVX-512 loop (where the CPU has it) and the portable one.
        drawn = counter_normal_(torch.empty(numel, dtype=dtype), KEY, start, pick_bits, simd=simd)
        assert torch.equal(drawn, expected), simd


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_z_is_the_sign_of_scheme_5s_picks(dtype):
    """Scheme 6's Rademacher z: both loops give the reference's bits, and entry i is the sign of scheme 5's Gaussian
    entry i (the pick's bit 7), so it is +-1 exactly in every dtype and, like it, depends on (key, i) alone."""
    for start, numel in SPANS:
        expected = counter_normal_reference(numel, KEY, start, dtype, 8, "rademacher")
        gaussian = counter_normal_(torch.empty(numel, dtype=dtype), KEY, start, 8)
        assert torch.equal(expected, torch.sign(gaussian)), (start, numel)
        for simd in (True, False):
            drawn = counter_normal_(
                torch.empty(numel, dtype=dtype), KEY, start, 8, simd=simd, distribution="rademacher"
            )
            assert torch.equal(drawn, expected), (start, numel, simd)
    z = counter_normal_(torch.empty(1 << 20), KEY, 0, 8, distribution="rademacher").double()
    assert abs(float(z.mean())) < 5 * 2**-10  # Balanced: 5 sigma of 2^20 signs.
    lanes = z.view(-1, 8).mean(0)  # Each of a word's 8 lanes (bits 7, 15, ... of the word) balanced too.
    assert float(lanes.abs().max()) < 5 * 2**-8.5, lanes
    assert abs(float((z[1:] * z[:-1]).mean())) < 5 * 2**-10


def test_rademacher_needs_8_bit_picks():
    with pytest.raises(ValueError, match="rademacher"):
        normal_table(torch.float32, 16, "rademacher")
    with pytest.raises(ValueError, match="not uniform"):
        normal_table(torch.float32, 8, "uniform")


def test_this_machines_cpu_runs_the_avx512_fill():
    """The project's CPUs have AVX-512 (CI's too): the test above compared both of scheme 5's loops there, and the
    apply tests below the bf16 loop with AVX512_BF16's conversion where the CPU has it."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "avx512bw" not in cpuinfo.read_text():
        pytest.skip("this CPU has no AVX-512BW")
    assert counter_noise.simd_fill()
    assert counter_noise.simd_level() == (2 if "avx512_bf16" in cpuinfo.read_text() else 1)


@pytest.mark.parametrize("pick_bits", counter_noise.PICK_BITS)
def test_entries_depend_on_their_index_only(pick_bits):
    """Cut anywhere (word boundaries or not), the pieces make up the whole draw: chunks and threads change no bit."""
    whole = counter_normal_(torch.empty(10_000), KEY, 40, pick_bits)
    cuts = [0, 1, 2, 7, 64, 65, 4097, 9_998, 10_000]
    pieces = [counter_normal_(torch.empty(b - a), KEY, 40 + a, pick_bits) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(counter_normal_(torch.empty(100, 100), KEY, 40, pick_bits).view(-1), whole[:10_000])


@pytest.mark.parametrize("pick_bits,kurtosis,tail", [(16, 3.0, 0.01), (8, 2.92, 0.04)])
def test_z_is_a_unit_gaussian_and_keys_give_unrelated_streams(pick_bits, kurtosis, tail):
    """Mean 0, variance 1, near-Gaussian kurtosis (3; 256 levels cut the tails at 2.89: 2.92) and quantiles (256
    levels: within half a level's spacing, 0.04 at 2 sigma, of N(0, 1)'s); neighbouring keys, entries and the lanes of one word
    uncorrelated."""
    z = counter_normal_(torch.empty(1 << 22, dtype=torch.float64), KEY, 0, pick_bits)
    assert abs(float(z.mean())) < 3e-3 and abs(float(z.var()) - 1) < 3e-3
    assert abs(float(z.pow(4).mean()) - kurtosis) < 0.03  # Rademacher: 1, uniform: 1.8.
    assert float(z.abs().max()) <= float(normal_table(torch.float64, pick_bits).abs().max())
    for q, expected in ((0.5, 0.0), (0.8413, 1.0), (0.9772, 2.0)):
        assert abs(float(z.quantile(q)) - expected) < tail
    other = counter_normal_(torch.empty(1 << 22, dtype=torch.float64), KEY + 1, 0, pick_bits)
    assert abs(float((z * other).mean())) < 3e-3  # Neighbouring keys: uncorrelated.
    lanes = z.view(-1, counter_noise.lanes(pick_bits))  # The lanes of one word are independent too.
    assert all(abs(float((lanes[:, 0] * lanes[:, k]).mean())) < 5e-3 for k in range(1, lanes.shape[1]))
    assert abs(float((z[1:] * z[:-1]).mean())) < 3e-3


def test_the_table_is_pinned():
    """The 65,536 values in fp32 (torch's ndtri in float64): a change would change every scheme-3 run's z."""
    table = normal_table(torch.float32)
    assert table.numel() == 1 << 16 and torch.equal(table, -table.flip(0))
    digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()
    assert digest == "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"


def test_scheme_5s_table_is_pinned_and_the_same_in_every_dtype():
    """256 values: 128 increasing positive magnitudes, then the same negated (bit 7 of a pick is the sign); bf16-exact,
    so fp32 / bf16 / fp16 / fp64 z are the same numbers; variance 1 to bf16 rounding. A change would change every
    scheme-5 run's z."""
    table = normal_table(torch.float64, 8)
    magnitudes = table[:128]
    assert table.numel() == 256 and torch.equal(table[128:], -magnitudes)
    assert bool((magnitudes > 0).all()) and bool((magnitudes.diff() > 0).all())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(normal_table(dtype, 8).double(), table), dtype
    assert abs(float(table.square().mean()) - 1) < 2e-3 and float(table.max()) == pytest.approx(2.89, abs=0.01)
    digest = hashlib.sha256(normal_table(torch.float32, 8).numpy().tobytes()).hexdigest()
    assert digest == "b419553df83ef6bcbb7c133c2bb5e2749e5a3b25f7d64a45a89c1c277d287989"


def test_other_pick_widths_are_refused():
    with pytest.raises(ValueError, match="pick_bits must be one of"):
        normal_table(torch.float32, 4)


def test_the_c_fill_is_built_and_used():
    """CI installs with a C compiler: the extension must be there (else the tests above compared the reference with
    itself)."""
    assert counter_noise._fills() is not None


@pytest.mark.parametrize("pick_bits,distribution", [(16, "gaussian"), (8, "gaussian"), (8, "rademacher")])
def test_without_the_extension_the_reference_draws_the_same_z(pick_bits, distribution, monkeypatch):
    draw = {"pick_bits": pick_bits, "distribution": distribution}
    expected = counter_normal_(torch.empty(5_000, dtype=torch.bfloat16), KEY, 12, **draw)
    monkeypatch.setitem(sys.modules, "zo_trainer._counter_noise", None)  # Its import now raises ImportError.
    counter_noise._fills.cache_clear()
    try:
        with pytest.warns(UserWarning, match="C extension .* is not built"):
            drawn = counter_normal_(torch.empty(5_000, dtype=torch.bfloat16), KEY, 12, **draw)
        assert torch.equal(drawn, expected)
    finally:
        counter_noise._fills.cache_clear()


APPLY_SPANS = [(0, 1), (3, 10), (0, 63), (0, 64), (7, 64), (1, 127), (9, 200), (5, 100_003), ((1 << 33) + 3, 5_000)]


@pytest.mark.parametrize("distribution", counter_noise.DISTRIBUTIONS)
@pytest.mark.parametrize("threshold", [None, 0.015])
@pytest.mark.parametrize("dtype", counter_noise.APPLY_DTYPES)
@pytest.mark.parametrize("start,numel", APPLY_SPANS)
def test_apply_as_drawn_gives_the_torch_ops_bits(dtype, start, numel, threshold, distribution):
    """``counter_apply_`` is the fill then the torch op it replaces, bit for bit: ``torch.add(w, z, alpha)`` (fused
    multiply-add; bf16 with alpha rounded to bf16, and torch's own rounding past its last whole 64 entries) or, with a
    threshold, ``torch.addcmul(w, z, |w| <= threshold, value=alpha)``; into another tensor or in place; both loops;
    the count of entries inside the mask. torch's op on one intra-op thread: torch cuts an op over several threads
    into pieces with a bf16 tail each, which the engine's chunks never do (they are whole 64-entry pieces or run on
    one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_apply(dtype, start, numel, threshold, distribution)
    finally:
        torch.set_num_threads(previous)


def check_apply(dtype: torch.dtype, start: int, numel: int, threshold: float | None, distribution: str) -> None:
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).mul_(0.02).to(dtype)
    z = counter_normal_(torch.empty(numel, dtype=dtype), KEY, start, pick_bits=8, distribution=distribution)
    for alpha in (1e-3, -2.5e-3, -0.0123456):
        if threshold is None:
            expected, inside = torch.add(weight, z, alpha=alpha), 0
        else:
            mask = torch.abs(weight).le_(threshold)
            expected, inside = torch.addcmul(weight, z, mask, value=alpha), int(torch.count_nonzero(mask))
        for simd in APPLY_LEVELS:
            out = torch.empty_like(weight)
            count = counter_noise.counter_apply_(
                out, weight, KEY, start, alpha, threshold, simd=simd, distribution=distribution
            )
            assert count == inside
            assert torch.equal(out.view(bits), expected.view(bits)), (alpha, simd)
        in_place = weight.clone()
        counter_noise.counter_apply_(in_place, in_place, KEY, start, alpha, threshold, distribution=distribution)
        assert torch.equal(in_place, expected)


# The vector loops of the apply: 2 the bf16 one with AVX512_BF16's conversion, 1 AVX-512, 0 the portable loop (a level
# this CPU lacks runs the next one down).
APPLY_LEVELS = (2, 1, 0)
# Weights the bf16 loop's conversion would get wrong if it took them (it reads denormals as zero and rounds NaN its own
# way): its groups holding such sums must fall back to the rounding of the other loops.
SPECIAL = [float("inf"), -float("inf"), 0.0, -0.0, 1e-39, -3e-39, 9.2e-41, 2.0**-126, -(2.0**-127), 3.3e38, -3.3e38]


@pytest.mark.parametrize("threshold", [None, 0.015])
def test_bf16_apply_rounds_special_sums_as_torch(threshold):
    """Every loop gives torch's bits on bf16 weights holding infinities, zeros, denormals and huge values, among
    ordinary ones, including sums that come out denormal (alpha 1e-40); with NaN weights every loop gives the portable
    loop's bits (torch's own differ between its vector and scalar code, and training stops at a NaN weight)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(3)
        numel = 4_099
        weight = torch.randn(numel, generator=generator).mul_(0.02)
        where = torch.randint(0, numel, (numel // 20,), generator=generator)
        weight[where] = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), where.shape, generator=generator)]
        weight = weight.to(torch.bfloat16)
        z = counter_normal_(torch.empty(numel, dtype=torch.bfloat16), KEY, 11, pick_bits=8)
        for alpha in (1e-3, -0.0123456, 1e-40, -3e-40):
            if threshold is None:
                expected = torch.add(weight, z, alpha=alpha)
            else:
                expected = torch.addcmul(weight, z, torch.abs(weight).le_(threshold), value=alpha)
            for simd in APPLY_LEVELS:
                out = torch.empty_like(weight)
                counter_noise.counter_apply_(out, weight, KEY, 11, alpha, threshold, simd=simd)
                assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), (alpha, simd)
        weight[::97] = float("nan")
        outs = [torch.empty_like(weight) for _ in APPLY_LEVELS]
        for out, simd in zip(outs, APPLY_LEVELS):
            counter_noise.counter_apply_(out, weight, KEY, 11, -2.5e-3, threshold, simd=simd)
        assert all(torch.equal(out.view(torch.int16), outs[-1].view(torch.int16)) for out in outs)
        assert int(torch.isnan(outs[0]).sum()) == len(range(0, numel, 97))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threshold", [None, 0.015])
@pytest.mark.parametrize("dtype", counter_noise.APPLY_DTYPES)
def test_apply_split_over_torchs_openmp_team_gives_the_same_bits(dtype, threshold):
    """On Linux with torch's OpenMP backend (CI's), the C pass runs on torch's own OpenMP threads (the ones the
    forward's matmuls use: threads of our own would share the cores with those threads' spinning) and, z of an entry
    depending on its index alone, gives the bits of the pass on one thread: split at every size and offset, counts
    included."""
    assert counter_noise.team_available()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for start, numel in [(0, 64), (3, 8_191), (5, 100_003), (64, 1 << 16), ((1 << 33) + 3, 77_777)]:
            weight = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).mul_(0.02).to(dtype)
            alone, split = torch.empty_like(weight), torch.empty_like(weight)
            inside = counter_noise.counter_apply_(alone, weight, KEY, start, -3e-3, threshold, threads=1)
            assert counter_noise.last_team_size() == 1
            assert counter_noise.counter_apply_(split, weight, KEY, start, -3e-3, threshold, threads=2) == inside
            assert counter_noise.last_team_size() == (2 if numel >= 8192 else 1)  # Short passes stay on one thread.
            assert torch.equal(split, alone), (start, numel)
    finally:
        torch.set_num_threads(previous)


# Rademacher z (scheme 6) takes the same paths: checked on torch's team (the default) and on one thread.
ENGINE_CASES = [(where, "gaussian") for where in ("one thread", "noise threads", "openmp team")]
ENGINE_CASES += [("one thread", "rademacher"), ("openmp team", "rademacher")]


@pytest.mark.parametrize("where,distribution", ENGINE_CASES)
@pytest.mark.parametrize("optim", ["mezo", "masked"])
@pytest.mark.parametrize("dtype", counter_noise.APPLY_DTYPES)
def test_engine_steps_are_the_same_bits_with_z_applied_as_drawn(dtype, optim, where, distribution, monkeypatch):
    """Whole ZO steps under scheme 6 (tensors of whole and partial 64-entry groups, the row paths of the vocabulary
    tensors, masks on every target), z applied as drawn on one thread, on two noise threads, or on torch's OpenMP
    team of two: the weights after two steps, and both losses of each, are those of the fill then torch ops, bit for
    bit."""
    ids = torch.randint(0, 333, (2, 9), generator=torch.Generator().manual_seed(1))
    threads = 1 if where == "one thread" else 2
    if where != "openmp team":
        monkeypatch.setattr(counter_noise, "team_available", lambda: False)
    teams = []
    counter_apply = counter_noise.counter_apply_

    def apply_and_note_team(*args, **kwargs):
        count = counter_apply(*args, **kwargs)
        teams.append(counter_noise.last_team_size())
        return count

    monkeypatch.setattr(counter_noise, "counter_apply_", apply_and_note_team)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = two_steps_each_way(dtype, optim, where, ids, monkeypatch, distribution)
    finally:
        torch.set_num_threads(previous)
    assert (max(teams) == 2) is (where == "openmp team")  # The larger passes split over the team.
    (losses, weights), (reference_losses, reference_weights) = runs
    assert repr(losses) == repr(reference_losses)
    for name, value in weights.items():
        assert torch.equal(value, reference_weights[name]), name


def two_steps_each_way(dtype, optim, where, ids, monkeypatch, distribution="gaussian"):
    """(losses, weights) after two steps with z applied as drawn (``where``), then with the fill and torch ops. The
    MLP's 8,400-entry matrices are passes long enough to split over a team."""
    from conftest import make_tiny_llama
    from zo_trainer.engine import ZOEngine
    from zo_trainer.methods import MeZO
    from zo_trainer.optim import ZOOptimizer
    from zo_trainer.step import zo_step
    from zo_trainer.training_args import ZOTrainingArguments

    runs = []
    for as_drawn in (True, False):
        model = make_tiny_llama(333, dtype, hidden_size=40, intermediate_size=210, max_position_embeddings=32).eval()
        args = ZOTrainingArguments(output_dir="unused", optim="mezo", report_to="none", learning_rate=0.3, zo_eps=1e-2)
        method = MeZO(args)
        threads = 2 if as_drawn and where == "noise threads" else 1
        engine = ZOEngine(method.targets(model), num_noise_threads=threads, distribution=distribution)
        assert engine.noise_scheme == 6
        engine.ROW_CHUNK_BYTES = 4096  # The embedding and lm_head take the row paths.
        engine.load_noise_config({**engine.noise_config(), "block": 1024})  # Several blocks per tensor: threads share
        if optim == "masked":
            engine.set_thresholds(0.5)
        if not as_drawn:
            monkeypatch.setattr(engine, "_applied_as_drawn", lambda tensor: False)
        assert all(engine._applied_as_drawn(t.get()) is as_drawn for t in engine.targets)
        pools = []
        monkeypatch.setattr(engine, "_pool", lambda pool=engine._pool, pools=pools: pools.append(1) or pool())
        optimizer = ZOOptimizer(engine, method, lr=args.learning_rate, num_perturbations=1, max_skipped_steps=3)
        losses = []
        for step in range(2):
            loss = lambda model=model: model(input_ids=ids, labels=ids).loss  # noqa: E731
            losses.append(zo_step(engine, optimizer, loss, eps=args.zo_eps, num_perturbations=1, seed=3, step=step))
            optimizer.step()
        assert bool(pools) is (as_drawn and where == "noise threads")  # The chunks went to the noise threads.
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    assert any(t.numel % 64 for t in engine.targets)
    return runs
