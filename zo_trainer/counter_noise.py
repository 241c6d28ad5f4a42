"""Gaussian z of z scheme 3 on CPU: entry i of a tensor's z is a pure function of (the tensor's seed, i).

torch's CPU ``normal_`` (mt19937 + Box-Muller, one thread per call) costs ~2.4 ns per fp32 entry, and a ZO step draws
every entry three times: on SmolLM2 that was most of a MeZO step's cost above its two forwards. Here each 64-bit word
of a counter-based stream (SplitMix64's output function of ``key + word * golden``) gives four entries, each one 16 bits
that pick one of 65,536 quantiles of N(0, 1) (the midpoints (k + 1/2) / 65536, rescaled to unit variance: |z| <= 4.33).
A C fill (``zo_trainer/_counter_noise.c``, built at install, called through ctypes, which releases the GIL) takes
~0.5 ns per fp32 entry on one thread, in any dtype (it copies the table's bit patterns), and as z of an entry does
not depend on how a tensor is cut into chunks or threads, neither does a run. (A numba kernel was as fast, but loading
numba and its LLVM adds ~130 MB to a process: 11% of SmolLM2's inference peak.)

``counter_normal_reference`` computes the same bits with torch integer ops: the fallback where the extension was not
built (~10 ns per entry) and the reference the tests check the C fill against.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
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
LANES = 4  # Entries per 64-bit word: 16 bits each.


def normal_table(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 65,536 values z takes, in ``dtype``: quantiles of N(0, 1) at (k + 1/2) / 65536, scaled to unit variance."""
    return _table(dtype).clone()


@functools.cache
def _table(dtype: torch.dtype) -> torch.Tensor:
    levels = torch.special.ndtri((torch.arange(1 << 16, dtype=torch.float64) + 0.5) / (1 << 16))
    levels = levels / levels.square().mean().sqrt()  # Variance 1 exactly (the midpoints alone give 0.99988).
    return levels.to(torch.float32).to(dtype)  # Through fp32: the same bf16 / fp16 values on every machine.


def supported(tensor: torch.Tensor) -> bool:
    """Whether ``counter_normal_`` fills ``tensor`` (CPU, contiguous, a float dtype it has a table for)."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _BITS


def counter_normal_(out: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
    """Fill ``out`` (CPU, contiguous) with entries ``start .. start + out.numel()`` of the z stream of ``key``."""
    if out.numel() == 0:
        return out
    fills = _fills()
    if fills is None:
        out.view(-1).copy_(counter_normal_reference(out.numel(), key, start, out.dtype))
        return out
    fills[out.dtype](out.data_ptr(), _table(out.dtype).data_ptr(), out.numel(), key & MASK64, start)
    return out


def counter_normal_reference(numel: int, key: int, start: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Entries ``start .. start + numel`` of the z stream of ``key``, with torch integer ops (int64 arithmetic wraps
    modulo 2^64 as the kernel's uint64 does; right shifts are made logical by masking the sign extension)."""
    first, last = start // LANES, (start + numel - 1) // LANES
    words = torch.arange(first, last + 1, dtype=torch.int64)
    x = words * _signed(SPLITMIX_GOLDEN) + _signed(key & MASK64)
    x = (x ^ _shift_right(x, 30)) * _signed(SPLITMIX_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(SPLITMIX_MIX2)
    x = x ^ _shift_right(x, 31)
    lanes = torch.stack([_shift_right(x, 16 * lane) & 0xFFFF for lane in range(LANES)], dim=1).view(-1)
    picks = lanes[start - first * LANES : start - first * LANES + numel]
    return _table(dtype)[picks]


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x if bits == 0 else (x >> bits) & ((1 << (64 - bits)) - 1)


@functools.cache
def _fills() -> dict[torch.dtype, Callable[..., None]] | None:
    """The C fills by dtype (``zo_trainer/_counter_noise.c``, built at install), or None where it was not built."""
    try:
        extension = importlib.import_module("zo_trainer._counter_noise")
    except ImportError:
        warnings.warn(
            "zo_trainer's C extension (_counter_noise) is not built: Gaussian z is drawn with torch ops instead (the "
            "same values, several times slower). Reinstall zo_trainer with a C compiler present to build it.",
            stacklevel=3,
        )
        return None
    library = ctypes.CDLL(extension.__file__)
    fills = {}
    for dtype, bits in _BITS.items():
        fill = getattr(library, f"zo_counter_fill_{torch.iinfo(bits).bits}")
        fill.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int64]
        fill.restype = None
        fills[dtype] = fill
    return fills
