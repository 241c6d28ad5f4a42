"""Triton kernels of ``zo_trainer.triton_noise`` (imported only where they are used: it imports Triton)."""

import triton
import triton.language as tl

from zo_trainer import counter_noise

GOLDEN = tl.constexpr(counter_noise.SPLITMIX_GOLDEN)
MIX1 = tl.constexpr(counter_noise.SPLITMIX_MIX1)
MIX2 = tl.constexpr(counter_noise.SPLITMIX_MIX2)


@triton.jit
def mixed(key, word):
    """SplitMix64's output function of key + word * golden (uint64), as ``counter_noise`` defines the stream."""
    x = key.to(tl.int64).to(tl.uint64, bitcast=True) + word.to(tl.uint64) * GOLDEN
    x = (x ^ (x >> 30)) * MIX1
    x = (x ^ (x >> 27)) * MIX2
    return x ^ (x >> 31)


@triton.jit
def z_block(key, program, table, BLOCK: tl.constexpr, PICK_BITS: tl.constexpr):
    """z of the BLOCK entries from ``program * BLOCK`` of the stream of ``key``, in fp32: entry i is the table entry
    picked by PICK_BITS bits (i % lanes) of word i // lanes (lanes = 64 // PICK_BITS: 4 under scheme 4, 8 under 5).
    Each entry mixes its word itself (lanes x the integer work, no data movement): on an H200 over a 7B model's fp16
    matrices this measured faster than mixing each word once and interleaving its entries by join / reshape (a
    shuffle through shared memory) in every pass but scheme 5's perturbed copy, where the two were within 7%."""
    PICK: tl.constexpr = (1 << PICK_BITS) - 1
    LANE_BITS: tl.constexpr = 2 if PICK_BITS == 16 else 3
    index = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = (index & ((1 << LANE_BITS) - 1)) * PICK_BITS
    pick = (mixed(key, index >> LANE_BITS) >> lane.to(tl.uint64)) & PICK
    return tl.load(table + pick.to(tl.int32))


@triton.jit
def add(a, b):
    """``tl.reduce``'s combine for a sum. Not ``tl.sum``: Triton's own jit helpers are fixed as compiled or interpreted
    when Triton is first imported (torch may import it first), so the CPU tests' interpreter could not call them."""
    return a + b


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype``. To bf16 by integer ops on the bits: Triton's interpreter (the
    tests' CPU path) truncates that cast, the GPU rounds to nearest even; both give these bits."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit(do_not_specialize=["key"])
def fill(out, numel, key, table, BLOCK: tl.constexpr, PICK_BITS: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    z = z_block(key, tl.program_id(0), table, BLOCK, PICK_BITS)
    tl.store(out + index, rounded(z, out.dtype.element_ty), mask=index < numel)


@triton.jit(do_not_specialize=["key", "eps", "threshold"])
def perturb(
    weight,
    out,
    numel,
    key,
    table,
    eps,
    threshold,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    PICK_BITS: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < numel
    w = tl.load(weight + index, mask=inside, other=0.0).to(tl.float32)
    step = eps * z_block(key, tl.program_id(0), table, BLOCK, PICK_BITS)
    if MASKED:
        step = tl.where(tl.abs(w) <= threshold, step, 0.0)
    tl.store(out + index, rounded(w + step, out.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["threshold", "decay", "min_value"])
def update(
    weight,
    numel,
    keys,
    coefficients,
    table,
    threshold,
    decay,
    min_value,
    counts,
    NUM_KEYS: tl.constexpr,
    MASKED: tl.constexpr,
    DECAY: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
    PICK_BITS: tl.constexpr,
):
    program = tl.program_id(0)
    index = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < numel
    w = tl.load(weight + index, mask=inside, other=0.0).to(tl.float32)
    change = w * 0.0
    for k in tl.static_range(NUM_KEYS):
        change += tl.load(coefficients + k).to(tl.float32) * z_block(
            tl.load(keys + k), program, table, BLOCK, PICK_BITS
        )
    if MASKED:  # From the values before this update, as in the forward passes.
        taking_part = (tl.abs(w) <= threshold) & inside
        tl.store(counts + program, tl.reduce(taking_part.to(tl.int32), 0, add))
        w = tl.where(taking_part, w - change, w)
        if DECAY:
            w = tl.where(taking_part, w + decay * w, w)
    else:
        w = w - change
        if DECAY:
            w = w + decay * w
    if CLAMP:
        w = tl.maximum(w, min_value)
    tl.store(weight + index, rounded(w, weight.dtype.element_ty), mask=inside)
