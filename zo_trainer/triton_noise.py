"""z of z schemes 4-6 on CUDA: the CPU's counter stream (scheme 3's, or 5's; from scheme 6 Rademacher z too, the
signs of scheme 5's picks), drawn inside the kernels that apply it.

Entry i of a tensor's z is a pure function of (the tensor's seed, i) (``zo_trainer.counter_noise``: SplitMix64's output
function of ``key + (i // lanes) * golden``, 16 bits of it picking one of 65,536 quantiles of N(0, 1) under scheme 4,
8 bits one of 256 under scheme 5), so a CUDA tensor's z is the same table values as a CPU tensor's, bit for bit. With
torch ops a CUDA step drew z with ``normal_`` into a buffer and then read it back in a second op (three such passes
per step, one more for Sparse-MeZO's mask): on a 7B model the draws cost more than the two forward passes. These
Triton kernels compute z where it is used, so each pass reads the weights once and writes once: the perturbed copy
``w + eps * z (* mask)`` and the update ``w -= sum_k c_k z_k (* mask)`` (decay and clamp folded in), in fp32
arithmetic, one rounding to the tensor's dtype.
Measured on an H200 over a 7B model's fp16 matrices (README): under scheme 5 a perturbed copy takes 7.9 ms (dense) /
8.3 ms (masked) against 25 / 48 ms by torch ops, an update 8.9 / 14.0 against 26 / 90 ms (scheme 4's 16-bit picks:
25-27 ms each, as they mix one word per four entries where scheme 5 mixes one per eight).

Under ``TRITON_INTERPRET=1`` Triton runs the same kernels on CPU tensors (numpy): how the tests check the bits where no
GPU is present. Triton ships with PyTorch's CUDA wheels; where it is missing, CUDA runs keep z scheme 3 (torch ops).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch

from zo_trainer import counter_noise

BLOCK = 1024  # Entries per Triton program.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported(tensor: torch.Tensor) -> bool:
    """Whether the kernels take ``tensor``: contiguous, a dtype with a z table, on CUDA (or CPU, interpreted)."""
    on_device = tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreted())
    return on_device and tensor.is_contiguous() and tensor.dtype in DTYPES and available()


@functools.cache
def _table(device: torch.device, pick_bits: int, distribution: str = "gaussian") -> torch.Tensor:
    """The stream's z values in fp32 on ``device``: the kernels compute in fp32, and a bf16 / fp16 z written out
    is this value rounded once, which is the CPU table's entry in that dtype. Rademacher (scheme 6): +-1."""
    return counter_noise.normal_table(torch.float32, pick_bits, distribution).to(device)


@functools.cache
def _rounded(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype``: torch compares a bf16 / fp16 tensor with a scalar rounded so (CPU path)."""
    return float(torch.tensor(threshold, dtype=torch.float32).to(dtype))


def _signed64(key: int) -> int:
    """A 64-bit key as the int64 kernel argument with its bits (the kernel reinterprets it as uint64)."""
    key &= counter_noise.MASK64
    return key - (1 << 64) if key >= 1 << 63 else key


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use: Triton reads TRITON_INTERPRET when a kernel is defined, and CPU-only
    processes never import it."""
    from zo_trainer import _triton_kernels

    return _triton_kernels.fill, _triton_kernels.perturb, _triton_kernels.update


def _grid(numel: int) -> tuple[int]:
    return (-(-numel // BLOCK),)


def fill_(out: torch.Tensor, key: int, pick_bits: int = 16, distribution: str = "gaussian") -> torch.Tensor:
    """``out`` (``supported``) := entries 0 .. numel of the z stream of ``key``: ``counter_noise``'s bits."""
    if out.numel():
        fill, _, _ = _kernels()
        table = _table(out.device, pick_bits, distribution)
        fill[_grid(out.numel())](out, out.numel(), _signed64(key), table, BLOCK=BLOCK, PICK_BITS=pick_bits)
    return out


def perturbed_copy(
    weight: torch.Tensor,
    out: torch.Tensor,
    key: int,
    eps: float,
    threshold: float | None = None,
    pick_bits: int = 16,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """``out := weight + eps * z (* (|weight| <= threshold))``, z of ``key``; one read of ``weight``, one write."""
    if weight.numel():
        _, perturb, _ = _kernels()
        masked = threshold is not None
        bound = _rounded(threshold, weight.dtype) if masked else 0.0
        table = _table(weight.device, pick_bits, distribution)
        perturb[_grid(weight.numel())](
            weight,
            out,
            weight.numel(),
            _signed64(key),
            table,
            eps,
            bound,
            MASKED=masked,
            BLOCK=BLOCK,
            PICK_BITS=pick_bits,
        )
    return out


def update_arguments(
    keys: Sequence[Sequence[int]], coefficients: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``update_``'s keys (row i: the keys of tensor i) and coefficients for several tensors, in one copy to the
    device: a copy from pageable memory waits for the GPU, so one per update, not one per tensor."""
    words = torch.tensor([_signed64(key) for row in keys for key in row], dtype=torch.int64)
    packed = torch.cat([words, torch.tensor(list(coefficients), dtype=torch.float64).view(torch.int64)]).to(device)
    return packed[: words.numel()].view(len(keys), len(coefficients)), packed[words.numel() :].view(torch.float64)


def update_(
    weight: torch.Tensor,
    keys: torch.Tensor,
    coefficients: torch.Tensor,
    threshold: float | None = None,
    decay: float = 0.0,
    min_value: float | None = None,
    pick_bits: int = 16,
    distribution: str = "gaussian",
) -> torch.Tensor | None:
    """``weight -= sum_k coefficients[k] * z(keys[k]) (* mask)``, then ``weight += decay * weight (* mask)`` and
    ``weight = max(weight, min_value)``, in place, one pass; the mask is taken from the values before the update.
    ``keys`` (int64) and ``coefficients`` (float64) are on the weight's device (``update_arguments``). Returns the
    number of entries that took part (a tensor: no host sync) when ``threshold`` is given. ``pick_bits``: the z
    stream's (``counter_noise``: 16 under scheme 4, 8 under 5), as in ``fill_`` and ``perturbed_copy``."""
    numel = weight.numel()
    masked = threshold is not None
    if not numel:
        return torch.zeros((), dtype=torch.int64, device=weight.device) if masked else None
    if not keys.numel() and not decay and min_value is None and not masked:
        return None  # Nothing to change (every coefficient was 0): no pass over the weights.
    _, _, update = _kernels()
    grid = _grid(numel)
    counts = torch.empty(grid[0] if masked else 1, dtype=torch.int32, device=weight.device)
    update[grid](
        weight,
        numel,
        keys,
        coefficients,
        _table(weight.device, pick_bits, distribution),
        _rounded(threshold, weight.dtype) if masked else 0.0,
        decay,
        0.0 if min_value is None else min_value,
        counts,
        NUM_KEYS=keys.numel(),
        MASKED=masked,
        DECAY=bool(decay),
        CLAMP=min_value is not None,
        BLOCK=BLOCK,
        PICK_BITS=pick_bits,
    )
    return counts.sum(dtype=torch.int64) if masked else None
