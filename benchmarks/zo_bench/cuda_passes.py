"""``zo-bench cuda-passes``: one perturbed-copy pass and one update over a model's matrices on a GPU, z scheme 3
(torch ops: ``normal_`` into a buffer, then ``add`` / ``addcmul``, and for a mask ``abs`` + ``le_``) against schemes 4
and 5 (``zo_trainer.triton_noise``: z drawn inside the Triton kernels that apply it; 16-bit and 8-bit picks), dense and
masked.

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


SCHEMES = (3, 4, 5)


def _passes(holder: nn.Module, scheme: int, threshold: float | None):
    """The perturbed-copy pass over every matrix of ``holder`` and the update, through the engine: scheme 3 by torch
    ops, schemes 4-5 by the Triton kernels."""
    from zo_trainer.engine import ZOEngine, parameter_targets

    key, eps = 12345, 1e-3
    engine = ZOEngine(parameter_targets(holder, lambda *_: True))
    engine.load_noise_config({**engine.noise_config(), "scheme": scheme})
    for target in engine.targets:
        target.threshold = threshold

    def perturb() -> None:
        for target in engine.targets:
            engine._perturbed_tensor(target, target.get(), key, eps)

    return engine, perturb, lambda: engine.update([key], [1e-12])


def run_cuda_passes(out: Path, layers: int, dtype_name: str, repeats: int, quick: bool) -> dict[str, Any]:
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
        for scheme in SCHEMES:
            engine, perturb, update = _passes(holder, scheme, THRESHOLD if masked else None)
            perturb_times, update_times = _timed(perturb, repeats, sync), _timed(update, repeats, sync)
            row = {
                "scheme": scheme,
                "masked": masked,
                "fused": all(engine._fused(t.get()) for t in engine.targets),
                "perturb_pass_ms": 1e3 * statistics.median(perturb_times),
                "update_ms": 1e3 * statistics.median(update_times),
                "perturb_all_ms": [1e3 * t for t in perturb_times],
                "update_all_ms": [1e3 * t for t in update_times],
            }
            row["perturb_GBps"] = moved / row["perturb_pass_ms"] / 1e6
            row["update_GBps"] = moved / row["update_ms"] / 1e6
            rows.append(row)
            log_line(
                f"scheme {scheme} {'masked' if masked else 'dense'}: perturbed copy {row['perturb_pass_ms']:.2f} ms, "
                f"update {row['update_ms']:.2f} ms"
            )
            engine.remove()
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
    lines = [
        "| pass | scheme 3 (torch ops) ms | scheme 4 (Triton) ms | scheme 5 (Triton) ms | 3 / 5 | 4 / 5 |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(r["scheme"], r["masked"]): r for r in payload["rows"]}
    for masked in (False, True):
        for field, name in (("perturb_pass_ms", "perturbed copy"), ("update_ms", "update")):
            ms = [by_key[(scheme, masked)][field] for scheme in SCHEMES]
            lines.append(
                f"| {name}, {'masked' if masked else 'dense'} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | "
                f"{ms[0] / ms[2]:.2f} | {ms[1] / ms[2]:.2f} |"
            )
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
