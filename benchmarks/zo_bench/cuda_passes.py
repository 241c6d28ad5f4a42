"""``zo-bench cuda-passes``: one perturbed-copy pass and one update over a model's matrices on a GPU, z scheme 3
(torch ops: ``normal_`` into a buffer, then ``add`` / ``addcmul``, and for a mask ``abs`` + ``le_``) against schemes 4
and 5 (``zo_trainer.triton_noise``: z drawn inside the Triton kernels that apply it; 16-bit and 8-bit picks), each
kernel both ways of drawing z (each entry mixing its own word, or each word mixed once), dense and masked.

The matrices are a Llama-2-7B layer's (4 x 4096x4096 attention, 3 x 11008x4096 MLP) times ``--layers``, random fp16
(or ``--dtype``) values of scale 0.02, built directly on the GPU. The masked rows give every tensor a fixed threshold
(0.016: ~58% of N(0, 0.02) entries take part) instead of Sparse-MeZO's quantiles. Each configuration is timed
``--repeats`` times after a warm-up, between ``torch.cuda.synchronize`` calls; the median is reported, with the bytes a
pass must move (read + write of the weights in their dtype) over its time. ``--quick``: tiny matrices on the CPU, the kernels in Triton's interpreter (a test of the
harness, not a timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import SCHEMA_VERSION, log_line, write_json
from .environment import environment

LAYER_SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 3  # Llama-2-7B: q, k, v, o; gate, up, down (transposed)
QUICK_SHAPES = [(32, 32)] * 4 + [(86, 32)] * 3
THRESHOLD = 0.016
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _timed(fn, repeats: int, sync) -> list[float]:
    fn()  # Warm-up: scratch buffers, Triton compilation.
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


# (z scheme, Triton: each word mixed once and its entries interleaved (True) or each entry mixing its word (False));
# scheme 3 is torch ops through the engine.
VARIANTS = [(3, None), (4, False), (4, True), (5, False), (5, True)]


def _label(scheme: int, word_at_once: bool | None) -> str:
    if word_at_once is None:
        return f"scheme {scheme} (torch ops)"
    return f"scheme {scheme} ({'per word' if word_at_once else 'per entry'})"


def _passes(holder: nn.Module, scheme: int, threshold: float | None, word_at_once: bool | None):
    """The perturbed-copy pass, the update over every matrix of ``holder``, and what releases them: scheme 3 through
    the engine (torch ops), schemes 4-5 by the Triton kernels with the given way of drawing z."""
    from zo_trainer import triton_noise
    from zo_trainer.engine import ZOEngine, parameter_targets

    key, eps, coefficient = 12345, 1e-3, 1e-12
    if word_at_once is None:
        engine = ZOEngine(parameter_targets(holder, lambda *_: True))
        engine.load_noise_config({**engine.noise_config(), "scheme": scheme})
        for target in engine.targets:
            target.threshold = threshold

        def perturb() -> None:
            for target in engine.targets:
                engine._perturbed_tensor(target, target.get(), key, eps)

        return perturb, lambda: engine.update([key], [coefficient]), engine.remove
    pick_bits = {4: 16, 5: 8}[scheme]
    weights = list(holder.weights)
    scratch = torch.empty(max(w.numel() for w in weights), dtype=weights[0].dtype, device=weights[0].device)
    keys, coefficients = triton_noise.update_arguments([[key]], [coefficient], weights[0].device)

    def perturb() -> None:
        for w in weights:
            triton_noise.perturbed_copy(
                w, scratch[: w.numel()].view_as(w), key, eps, threshold, pick_bits, word_at_once
            )

    def update() -> None:
        for w in weights:
            triton_noise.update_(w, keys[0], coefficients, threshold, pick_bits=pick_bits, word_at_once=word_at_once)

    return perturb, update, lambda: None


def run_cuda_passes(out: Path, layers: int, dtype_name: str, repeats: int, quick: bool) -> dict[str, Any]:
    from zo_trainer import triton_noise

    device = "cpu" if quick else "cuda"
    sync = (lambda: None) if quick else torch.cuda.synchronize
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device=device).manual_seed(0)
    holder = nn.Module()
    holder.weights = nn.ParameterList(
        nn.Parameter(torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype), requires_grad=False)
        for _ in range(layers)
        for shape in (QUICK_SHAPES if quick else LAYER_SHAPES)
    )
    numel = sum(p.numel() for p in holder.weights)
    moved = 2 * numel * torch.empty((), dtype=dtype).element_size()
    rows = []
    for masked in (False, True):
        threshold = THRESHOLD if masked else None
        for scheme, word_at_once in VARIANTS:
            perturb, update, release = _passes(holder, scheme, threshold, word_at_once)
            perturb_times, update_times = _timed(perturb, repeats, sync), _timed(update, repeats, sync)
            release()
            pick_bits = {4: 16, 5: 8}.get(scheme)
            row = {
                "scheme": scheme,
                "masked": masked,
                "fused": scheme != 3,
                "word_at_once": word_at_once,
                "engine_default": scheme == 3 or triton_noise.per_word(masked, pick_bits) == word_at_once,
                "perturb_pass_ms": 1e3 * statistics.median(perturb_times),
                "update_ms": 1e3 * statistics.median(update_times),
                "perturb_all_ms": [1e3 * t for t in perturb_times],
                "update_all_ms": [1e3 * t for t in update_times],
            }
            row["perturb_GBps"] = moved / row["perturb_pass_ms"] / 1e6
            row["update_GBps"] = moved / row["update_ms"] / 1e6
            rows.append(row)
            log_line(
                f"{_label(scheme, word_at_once)} {'masked' if masked else 'dense'}: perturbed copy "
                f"{row['perturb_pass_ms']:.2f} ms, update {row['update_ms']:.2f} ms"
            )
    payload = {
        "suite": "cuda-passes",
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "environment": environment(),
        "device": device if quick else torch.cuda.get_device_name(),
        "setup": {
            "tensors": f"{layers} x Llama-2-7B layer matrices {LAYER_SHAPES if not quick else QUICK_SHAPES}",
            "dtype": dtype_name,
            "entries": numel,
            "masked_threshold": THRESHOLD,
            "repeats": repeats,
            "statistic": "median of the timed passes after one warm-up; GBps = (read + write of the weights) / time",
            "interpreted": quick,
        },
        "rows": rows,
    }
    write_json(out / ("cuda_passes_quick.json" if quick else "cuda_passes.json"), payload)
    print(table(payload))
    return payload


def table(payload: dict[str, Any]) -> str:
    """ms per pass; the engine's choice of way for each scheme and pass is marked *."""
    columns = [(scheme, word) for scheme, word in VARIANTS]
    lines = [
        "| pass | " + " | ".join(f"{_label(s, w)} ms" for s, w in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    by_key = {(r["scheme"], r["word_at_once"], r["masked"]): r for r in payload["rows"]}
    for masked in (False, True):
        for field, name in (("perturb_pass_ms", "perturbed copy"), ("update_ms", "update")):
            cells = []
            for scheme, word in columns:
                row = by_key[(scheme, word, masked)]
                mark = "*" if row["engine_default"] and scheme != 3 else ""
                cells.append(f"{row[field]:.2f}{mark}")
            lines.append(f"| {name}, {'masked' if masked else 'dense'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-bench cuda-passes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=32, help="Llama-2-7B layers' matrices (32: the whole model's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--repeats", type=int, default=5, help="timed passes after the warm-up")
    p.add_argument("--quick", action="store_true", help="tiny matrices on the CPU, kernels interpreted: for a test")
    p.add_argument("--out", default="benchmarks/results", help="folder for cuda_passes.json (cuda_passes_quick.json)")
    return p


def main_cuda_passes(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``zo-bench cuda-passes``: 0 on success; bad flags or no GPU (without --quick) exit 2 with one line."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1:
        parser.error(f"--layers and --repeats must be at least 1, got {args.layers} and {args.repeats}")
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # Before the kernels are defined (they are, on first use).
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--quick runs the kernels in Triton's interpreter on the CPU)")
    from zo_trainer import triton_noise

    if not triton_noise.available():
        parser.error("needs triton (it comes with PyTorch's CUDA wheels; `pip install triton` for --quick)")
    run_cuda_passes(Path(args.out), 1 if args.quick else args.layers, args.dtype, args.repeats, args.quick)
    return 0
