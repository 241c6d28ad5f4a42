"""Counter-based Gaussian z (z schemes 3 and 5): entry i of a tensor's z is a pure function of (the tensor's seed, i).

torch's CPU ``normal_`` (mt19937 + Box-Muller, one thread per call) costs ~2.4 ns per fp32 entry, and a ZO step draws
every entry three times: on SmolLM2 that was most of a MeZO step's cost above its two forwards. Here each 64-bit word
of a counter-based stream (SplitMix64's output function of ``key + word * golden``) gives four entries, each one 16 bits
that pick one of 65,536 quantiles of N(0, 1) (the midpoints (k + 1/2) / 65536, rescaled to unit variance: |z| <= 4.33).
A C fill (``zo_trainer/_counter_noise.c``, built at install, called through ctypes, which releases the GIL) takes
~0.5 ns per fp32 entry on one thread, in any dtype (it copies the table's bit patterns), and as z of an entry does
not depend on how a tensor is cut into chunks or threads, neither does a run. (A numba kernel was as fast, but loading
numba and its LLVM adds ~130 MB to a process: 11% of SmolLM2's inference peak.)

Scheme 5 (``pick_bits=8``) takes eight entries from each word, 8 bits each picking one of 256 values: the quantiles of
N(0, 1) at (k + 1/2) / 256, rescaled to unit variance and rounded to bf16 (|z| <= 2.89, variance 1.0009), so fp32, bf16
and fp16 z are the same numbers. Its 128 magnitudes (the top bit is the sign) fit in four AVX-512 registers: a lookup
is two permutes and a select per 32 entries, with no memory access, and half the words to mix: ~0.2 ns per entry
against scheme 3's ~0.7 on this project's CPU (README). ZO-SGD needs only E[z z^T] = I of z; Rademacher (two values)
trains too. Where AVX-512 is missing, a portable C loop gives the same bits (several times slower). Scheme 5's apply
(``counter_apply_``: ``w + alpha * z`` in one pass, z never written out) splits a pass over torch's own OpenMP threads
(``team_available``): threads of our own would share the cores with the forward's spinning OpenMP workers.

Rademacher z from scheme 6 on (``distribution="rademacher"``) is the same stream with all 128 magnitudes 1: entry i is
the sign bit of scheme 5's pick, so the fills, the apply and the CUDA kernels draw it at the Gaussian's cost (the
signs of distinct bits of a mixed word: independent, +-1 with probability 1/2 each).

``counter_normal_reference`` computes the same bits with torch integer ops: the fallback where the extension was not
built (~10 ns per entry) and the reference the tests check the C fill against.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import warnings
from collections.abc import Callable

import torch

# SplitMix64: its Weyl increment and the multipliers of its output function (the engine's seeds use them too).
SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15
SPLITMIX_MIX1, SPLITMIX_MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
PICK_BITS = (16, 8)  # Bits of a word that pick one entry's value: scheme 3 (4 entries per word), scheme 5 (8).
DISTRIBUTIONS = ("gaussian", "rademacher")  # Rademacher: 8-bit picks only (its magnitudes are all 1).


def lanes(pick_bits: int) -> int:
    """Entries per 64-bit word."""
    return 64 // pick_bits


def normal_table(
    dtype: torch.dtype = torch.float32, pick_bits: int = 16, distribution: str = "gaussian"
) -> torch.Tensor:
    """The 2 ** pick_bits values z takes, in ``dtype``, indexed by the pick. 16 bits: quantiles of N(0, 1) at
    (k + 1/2) / 65536, scaled to unit variance. 8 bits: 128 magnitudes (the quantiles at (128 + k + 1/2) / 256,
    scaled as the 256 would be to unit variance, rounded to bf16), then the same negated: bit 7 is the sign.
    ``distribution="rademacher"`` (8 bits): the 128 magnitudes are 1, so z is the pick's sign."""
    return _table(dtype, pick_bits, distribution).clone()


@functools.cache
def _table(dtype: torch.dtype, pick_bits: int = 16, distribution: str = "gaussian") -> torch.Tensor:
    if pick_bits not in PICK_BITS:
        raise ValueError(f"pick_bits must be one of {PICK_BITS}, not {pick_bits}")
    if distribution not in DISTRIBUTIONS or (distribution == "rademacher" and pick_bits != 8):
        raise ValueError(
            f"counter-based z is {DISTRIBUTIONS[0]} (8 or 16 bits) or {DISTRIBUTIONS[1]} (8), not {distribution}"
        )
    if distribution == "rademacher":
        return torch.cat([torch.ones(128), -torch.ones(128)]).to(dtype)
    levels = torch.special.ndtri((torch.arange(1 << pick_bits, dtype=torch.float64) + 0.5) / (1 << pick_bits))
    levels = levels / levels.square().mean().sqrt()  # Variance 1 (the midpoints alone give 0.99988 / 0.98).
    if pick_bits == 8:  # Rounded to bf16 so that every float dtype holds the same values; bit 7 the sign.
        magnitudes = levels[128:].to(torch.float32).to(torch.bfloat16).to(torch.float32)
        return torch.cat([magnitudes, -magnitudes]).to(dtype)
    return levels.to(torch.float32).to(dtype)  # Through fp32: the same bf16 / fp16 values on every machine.


@functools.cache
def _magnitudes16(dtype: torch.dtype, distribution: str = "gaussian") -> torch.Tensor:
    """Scheme 5's 128 magnitudes as the 16-bit patterns the AVX-512 fill permutes: fp16 ones for fp16 z, bf16 ones
    otherwise (an fp32 z is its bf16 pattern shifted up 16 bits)."""
    values = _table(torch.float16 if dtype == torch.float16 else torch.bfloat16, 8, distribution)
    return values[:128].view(torch.int16).contiguous()


def supported(tensor: torch.Tensor) -> bool:
    """Whether ``counter_normal_`` fills ``tensor`` (CPU, contiguous, a float dtype it has a table for)."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _BITS


def counter_normal_(
    out: torch.Tensor,
    key: int,
    start: int = 0,
    pick_bits: int = 16,
    simd: bool = True,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """Fill ``out`` (CPU, contiguous) with entries ``start .. start + out.numel()`` of the z stream of ``key``.
    ``simd=False``: scheme 5's portable loop even where AVX-512 is present (the same bits; for tests).
    ``distribution="rademacher"``: the signs of the 8-bit picks (``normal_table``)."""
    if out.numel() == 0:
        return out
    fills = _fills()
    if fills is None:
        out.view(-1).copy_(counter_normal_reference(out.numel(), key, start, out.dtype, pick_bits, distribution))
        return out
    table = _table(out.dtype, pick_bits, distribution).data_ptr()
    if pick_bits == 16:
        fills[16, out.dtype](out.data_ptr(), table, out.numel(), key & MASK64, start)
    else:
        magnitudes = _magnitudes16(out.dtype, distribution).data_ptr()
        fills[8, out.dtype](out.data_ptr(), table, magnitudes, out.numel(), key & MASK64, start, int(simd))
    return out


APPLY_DTYPES = (torch.float32, torch.bfloat16)


def apply_supported(tensor: torch.Tensor) -> bool:
    """Whether ``counter_apply_`` takes ``tensor``: CPU, contiguous, fp32 or bf16, the C extension built."""
    return (
        tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in APPLY_DTYPES and _fills() is not None
    )


def counter_apply_(
    out: torch.Tensor,
    weight: torch.Tensor,
    key: int,
    start: int,
    alpha: float,
    threshold: float | None = None,
    simd: int | None = None,
    threads: int = 1,
    distribution: str = "gaussian",
) -> int:
    """``out := weight + alpha * z (* (|weight| <= threshold))`` with z entries ``start .. start + numel`` of scheme
    5's stream of ``key``, drawn as they are applied (one pass; ``out`` may be ``weight``: an update in place).

    The bits are those of the torch ops it replaces on CPU: ``torch.add(weight, z, alpha=alpha)`` (one fused
    multiply-add in fp32; bf16 rounds alpha to bf16 first, as torch does), or with a threshold
    ``torch.addcmul(weight, z, mask, value=alpha)`` (the product rounded, then the sum) with ``mask = |weight| <=
    threshold``; ``tests/test_counter_noise.py`` checks both against torch. ``apply_supported`` tensors only. Returns
    the number of entries inside the mask (0 without a threshold). ``threads`` > 1: the pass is split over that many
    threads of torch's own OpenMP team where ``team_available()`` (the same bits), else it runs on this thread.
    ``distribution="rademacher"``: z is the picks' signs (``normal_table``). ``simd``: the fastest vector loop up to
    that level (``simd_level``) this CPU runs (default ``APPLY_SIMD``); 0 the portable loop (the same bits at every
    level; for tests)."""
    if out.numel() == 0:
        return 0
    if out.dtype != weight.dtype or out.numel() != weight.numel():
        raise ValueError(f"out and weight differ: {out.dtype} {out.numel()} vs {weight.dtype} {weight.numel()}")
    masked = threshold is not None
    numel = out.numel()
    if out.dtype == torch.bfloat16 and not masked:
        # torch's bf16 add rounds otherwise on the entries after its last whole pair of vectors (64 entries): those
        # are left to torch itself.
        numel -= numel % 64
    scalar, bound = _apply_scalars(alpha, threshold, out.dtype)
    count = _applies()(
        32 if out.dtype == torch.float32 else 16,
        out.data_ptr(),
        weight.data_ptr(),
        _table(torch.float32, 8, distribution).data_ptr(),
        _magnitudes16(torch.bfloat16, distribution).data_ptr(),
        numel,
        key & MASK64,
        start,
        scalar,
        bound,
        int(masked),
        APPLY_SIMD if simd is None else int(simd),
        threads if team_available() else 1,
    )
    if numel < out.numel():
        tail_out, tail_weight = out.view(-1)[numel:], weight.view(-1)[numel:]
        z = counter_normal_(torch.empty_like(tail_out), key, start + numel, pick_bits=8, distribution=distribution)
        torch.add(tail_weight, z, alpha=alpha, out=tail_out)
    return count


@functools.lru_cache(maxsize=256)
def _apply_scalars(alpha: float, threshold: float | None, dtype: torch.dtype) -> tuple[float, float]:
    """``counter_apply_``'s alpha and threshold as torch's ops use them on a ``dtype`` tensor: alpha in fp32 (bf16
    for a dense bf16 op, as torch's ``add`` rounds it), the threshold rounded to the dtype (0 where there is none).
    Cached: one step's passes ask the same few values for every tensor."""
    scalar = torch.tensor(alpha, dtype=torch.float32)
    if dtype == torch.bfloat16 and threshold is None:
        scalar = scalar.to(torch.bfloat16)
    bound = 0.0 if threshold is None else float(torch.tensor(threshold, dtype=torch.float32).to(dtype))
    return float(scalar), bound


@functools.cache
def _applies() -> Callable[..., int]:
    """The C apply (``zo_counter8_apply_team``: width 32 or 16 first, the team's thread count last)."""
    apply = _library().zo_counter8_apply_team
    apply.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64]
    apply.argtypes += [ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    apply.restype = ctypes.c_int64
    return apply


def last_team_size() -> int:
    """Threads the last ``counter_apply_`` pass ran on (1: the calling thread alone)."""
    return int(_library().zo_counter8_team_last())


# ZO_TRAINER_APPLY_TEAM=0: the C passes never run on torch's OpenMP team (timing comparisons).
APPLY_TEAM = os.environ.get("ZO_TRAINER_APPLY_TEAM", "1") != "0"
# ZO_TRAINER_APPLY_SIMD=1: the bf16 apply without AVX512_BF16's conversion, as before it (timing comparisons).
APPLY_SIMD = int(os.environ.get("ZO_TRAINER_APPLY_SIMD", "2"))


@functools.cache
def team_available() -> bool:
    """Whether ``counter_apply_`` can split its pass over torch's own OpenMP threads: torch's parallel backend is
    OpenMP, the process has mapped exactly one OpenMP runtime, GNU's (torch's, on Linux), and it has GOMP_parallel.
    Its entry points are handed to the C extension, which links no runtime of its own; elsewhere (no /proc, another
    runtime beside it, another backend) the pass runs on the calling thread and the engine spreads chunks over its own
    threads instead."""
    if not APPLY_TEAM or _fills() is None or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    except OSError:
        return False
    runtimes = {path for path in paths if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp"))}
    if len(runtimes) != 1 or not os.path.basename(next(iter(runtimes))).startswith("libgomp"):
        return False
    try:
        runtime = ctypes.CDLL(next(iter(runtimes)))  # The loaded one: dlopen returns its handle.
        entries = [runtime.GOMP_parallel, runtime.omp_get_thread_num, runtime.omp_get_num_threads]
    except (OSError, AttributeError):
        return False
    _library().zo_counter8_set_team(*(ctypes.cast(entry, ctypes.c_void_p) for entry in entries))
    return True


def counter_normal_reference(
    numel: int,
    key: int,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
    pick_bits: int = 16,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """Entries ``start .. start + numel`` of the z stream of ``key``, with torch integer ops (int64 arithmetic wraps
    modulo 2^64 as the kernel's uint64 does; right shifts are made logical by masking the sign extension)."""
    per_word = lanes(pick_bits)
    first, last = start // per_word, (start + numel - 1) // per_word
    words = torch.arange(first, last + 1, dtype=torch.int64)
    x = words * _signed(SPLITMIX_GOLDEN) + _signed(key & MASK64)
    x = (x ^ _shift_right(x, 30)) * _signed(SPLITMIX_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(SPLITMIX_MIX2)
    x = x ^ _shift_right(x, 31)
    mask = (1 << pick_bits) - 1
    picks = torch.stack([_shift_right(x, pick_bits * lane) & mask for lane in range(per_word)], dim=1).view(-1)
    picks = picks[start - first * per_word : start - first * per_word + numel]
    return _table(dtype, pick_bits, distribution)[picks]


@functools.cache
def simd_fill() -> bool:
    """Whether scheme 5's AVX-512 fill is built and runs on this CPU."""
    return simd_level() >= 1


def simd_level() -> int:
    """The C extension's vector loops this CPU runs: 0 none (or no extension), 1 AVX-512 (fills and applies), 2 also
    the bf16 apply with AVX512_BF16's conversion."""
    return int(_library().zo_counter8_simd()) if _fills() is not None else 0


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x if bits == 0 else (x >> bits) & ((1 << (64 - bits)) - 1)


def _library() -> ctypes.CDLL:
    """The C extension (``zo_trainer/_counter_noise.c``, built at install) as a ctypes library; ImportError where it
    was not built."""
    return ctypes.CDLL(importlib.import_module("zo_trainer._counter_noise").__file__)


@functools.cache
def _fills() -> dict[tuple[int, torch.dtype], Callable[..., None]] | None:
    """The C fills by (pick bits, dtype), or None where the extension was not built."""
    try:
        library = _library()
    except ImportError:
        warnings.warn(
            "zo_trainer's C extension (_counter_noise) is not built: Gaussian z is drawn with torch ops instead (the "
            "same values, several times slower). Reinstall zo_trainer with a C compiler present to build it.",
            stacklevel=3,
        )
        return None
    fills = {}
    pointers, position = [ctypes.c_void_p, ctypes.c_void_p], [ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64]
    for dtype, bits in _BITS.items():
        width = torch.iinfo(bits).bits
        fill = getattr(library, f"zo_counter_fill_{width}")
        fill.argtypes, fill.restype = pointers + position, None
        fills[16, dtype] = fill
        fill = getattr(library, f"zo_counter8_fill_{width}")
        fill.argtypes, fill.restype = pointers + [ctypes.c_void_p] + position + [ctypes.c_int], None
        fills[8, dtype] = fill
    return fills
