"""``zo-bench engine``: the ZO engine's own work per step, z schemes 1, 2, 3 and 5, with no model forward.

A step of the engine is what ``zo_step`` + ``ZOOptimizer.step()`` make it do besides the forwards: inside
``perturbed(seed, +eps)`` and ``perturbed(seed, -eps)`` every target's perturbed copy ``w +- eps z`` (built by the
engine's pre-forward hook of the module that reads it), then ``update([seed], [coefficient])``. Here the modules are
holders whose forward does nothing, so the hooks run and nothing else does: the time is the engine's alone.

Targets are the tensors of real models, built directly with torch (random values, no download): every tensor of
SmolLM2-135M (the tied 49152x576 embedding read by two modules, the 30 layers' matrices and norms), and the first
layers of Llama-3.2-1B (its 2048x8192 MLP and 2048x2048 / 2048x512 attention matrices; its tied 128256x2048 embedding
is left out). ``mezo`` perturbs every tensor; ``sparse_mezo`` the layers' matrices only (not the embedding, nor the
norms), with thresholds at sparsity 0.8, as the methods choose them.

Every configuration (method x scheme) runs once per round, in the same process, the order reversed every other
round; round 0 is a warm-up (scratch buffers) and is discarded. Wall time and process CPU time (all threads) are
recorded: the CPU may be shared, and CPU time is the less disturbed of the two. The figures are scheme 2 / scheme 1
(blocks drawn where they are used vs whole tensors), scheme 3 / scheme 2 (counter-based Gaussian z vs normal_) and
scheme 5 / scheme 3 (8-bit picks of 256 values vs 16-bit picks of 65,536), scheme 5 / "5f" (z applied as it is
drawn, in one C pass, vs drawn into a buffer and then applied by a torch op: the same bits), and scheme 5 / "5v" (the
C pass's bf16 loop with AVX512_BF16's conversion vs the AVX-512 loop without it, the loop before session 16: the same
bits; fp32 tensors have one loop, so there the two configurations time the same code). ``--dtype bfloat16`` builds
the tensors in bf16 (the dtype of the 1B+ scale points) and writes ``engine_bfloat16.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zo_trainer import counter_noise
from zo_trainer.engine import ZOEngine, ZOTarget, parameter_targets, perturbation_seed

from .common import SCHEMA_VERSION, log_line, median, write_json
from .environment import environment
from .factories import GROWTH_CONFIGS

# Config values of the models whose tensors are built (their Hugging Face config.json), and how many layers.
ENGINE_SHAPES: dict[str, dict[str, Any]] = {
    # The real SmolLM2-135M shapes are GROWTH_CONFIGS["135M"] (growth and memory build it too); vocab 49152, tied.
    "smollm2-135m": dict(
        source="HuggingFaceTB/SmolLM2-135M config: every tensor (tied embedding + 30 layers)",
        hidden_size=GROWTH_CONFIGS["135M"]["hidden_size"],
        intermediate_size=GROWTH_CONFIGS["135M"]["intermediate_size"],
        num_attention_heads=GROWTH_CONFIGS["135M"]["num_attention_heads"],
        num_key_value_heads=GROWTH_CONFIGS["135M"]["num_key_value_heads"],
        head_dim=GROWTH_CONFIGS["135M"]["hidden_size"] // GROWTH_CONFIGS["135M"]["num_attention_heads"],
        vocab_size=49152,
        layers=GROWTH_CONFIGS["135M"]["num_hidden_layers"],
        embedding=True,
    ),
    "llama-3.2-1b": dict(
        source="meta-llama/Llama-3.2-1B config: 2 of its 16 layers, no embedding (128256x2048, tied)",
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        layers=2,
        embedding=False,
    ),
    # --quick only: CI-sized, yet the embedding spans two z blocks of scheme 2.
    "tiny": dict(
        source="tiny Llama-like shapes (--quick)",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1024,
        layers=2,
        embedding=True,
    ),
}
DEFAULT_SHAPES = ("smollm2-135m", "llama-3.2-1b")
METHODS = ("mezo", "sparse_mezo")
SCHEMES = (1, 2, 3, 5)  # The CPU z schemes: 4 draws as 3 on CPU (it differs on CUDA only).
# Scheme 5 with z drawn into a buffer, then applied by torch ops (the engine before z was applied as drawn): the same
# bits, the before of ``ratio_5_over_5f``.
FILL_THEN_OP = "5f"
# Scheme 5 with the C apply's AVX-512 loop for bf16 (widening and rounding by integer ops), not the one with AVX512_BF16's
# conversion: the same bits, the before of ``ratio_5_over_5v`` (``counter_noise.APPLY_SIMD`` 1 during its steps).
AVX512_LOOP = "5v"
CONFIGS = (*SCHEMES, FILL_THEN_OP, AVX512_LOOP)
# Each ratio reported: its name, the config timed after over the config timed before, and its column in the table.
RATIOS = (
    ("ratio", 2, 1, "2 / 1"),
    ("ratio_3_over_2", 3, 2, "3 / 2"),
    ("ratio_5_over_3", 5, 3, "5 / 3"),
    ("ratio_5_over_5f", 5, FILL_THEN_OP, "5 / fill then op"),
    ("ratio_5_over_5v", 5, AVX512_LOOP, "5 / AVX-512 loop"),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SPARSITY = 0.8
EPS = 1e-3
COEFFICIENT = 1e-9  # lr * projected gradient: small, so the thresholds' masks stay what they were.


class _Holder(nn.Module):
    """Holds a tensor like the module that reads it; its forward computes nothing, so only the engine's hooks run.
    It says whether it saw a perturbed copy (a tensor other than the master), which checks that the hooks did run."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self._master = weight.data_ptr()  # The engine updates the master in place and rebinds only while perturbed.

    def forward(self) -> bool:
        return self.weight.data_ptr() != self._master


class ShapeModel(nn.Module):
    """The tensors of a Llama-like model, in the order a forward reads them; ``forward()`` calls every holder."""

    def __init__(self, shape: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        hidden, inner = shape["hidden_size"], shape["intermediate_size"]
        q_out = shape["num_attention_heads"] * shape["head_dim"]
        kv_out = shape["num_key_value_heads"] * shape["head_dim"]

        def matrix(rows: int, cols: int) -> nn.Parameter:  # nn.Linear's (out, in) layout, initializer_range 0.02
            return nn.Parameter((torch.randn(rows, cols, generator=generator) * 0.02).to(dtype))

        def norm() -> nn.Parameter:
            return nn.Parameter(torch.ones(hidden, dtype=dtype))

        self.embed_tokens = _Holder(weight=matrix(shape["vocab_size"], hidden)) if shape["embedding"] else None
        self.layers = nn.ModuleList()
        for _ in range(shape["layers"]):
            layer = nn.Module()
            layer.input_layernorm = _Holder(weight=norm())
            layer.q_proj = _Holder(weight=matrix(q_out, hidden))
            layer.k_proj = _Holder(weight=matrix(kv_out, hidden))
            layer.v_proj = _Holder(weight=matrix(kv_out, hidden))
            layer.o_proj = _Holder(weight=matrix(hidden, q_out))
            layer.post_attention_layernorm = _Holder(weight=norm())
            layer.gate_proj = _Holder(weight=matrix(inner, hidden))
            layer.up_proj = _Holder(weight=matrix(inner, hidden))
            layer.down_proj = _Holder(weight=matrix(hidden, inner))
            self.layers.append(layer)
        self.norm = _Holder(weight=norm())
        # Tied output embedding: a second module reading the same tensor (the engine keeps its copy for the forward).
        self.lm_head = _Holder(weight=self.embed_tokens.weight) if self.embed_tokens is not None else None
        self._order = [m for m in self.modules() if isinstance(m, _Holder)]

    def forward(self) -> int:
        """The number of modules that read a perturbed copy."""
        return sum(holder() for holder in self._order)


def method_targets(model: ShapeModel, method: str) -> list[ZOTarget]:
    """The targets ``method`` trains in a plain (non-PEFT) model: every tensor (mezo), or the layers' matrices
    without the embedding (sparse_mezo, see zo_trainer/methods/sparse_mezo.py)."""
    if method == "mezo":
        return parameter_targets(model, lambda name, owner, p: True)
    embedding = model.embed_tokens.weight if model.embed_tokens is not None else None
    return parameter_targets(model, lambda name, owner, p: p.dim() == 2 and p is not embedding)


def build_engine(model: ShapeModel, method: str, scheme: int | str) -> ZOEngine:
    engine = ZOEngine(method_targets(model, method))
    engine.load_noise_config({**engine.noise_config(), "scheme": 5 if isinstance(scheme, str) else scheme})
    if scheme == FILL_THEN_OP:
        engine.APPLY_AS_DRAWN = False
    if method == "sparse_mezo":
        engine.set_thresholds(SPARSITY)
    return engine


def engine_step(engine: ZOEngine, model: ShapeModel, step: int, apply_simd: int | None = None) -> list[int]:
    """Two perturbed passes over every target and the update, as a ZO step with one direction does them; returns
    how many modules read a perturbed copy in each pass. ``apply_simd``: the C apply's loop level for this step."""
    seed = perturbation_seed(0, step)
    default = counter_noise.APPLY_SIMD
    counter_noise.APPLY_SIMD = default if apply_simd is None else apply_simd
    try:
        with torch.no_grad():
            with engine.perturbed(seed, +EPS):
                plus = model()
            with engine.perturbed(seed, -EPS):
                minus = model()
        engine.update([seed], [COEFFICIENT])
    finally:
        counter_noise.APPLY_SIMD = default
    return [plus, minus]


def measure_shape(name: str, repeats: int, on_round=None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Interleaved rounds of every method x scheme on the tensors of ``name``; medians and scheme 2 / scheme 1."""
    shape = ENGINE_SHAPES[name]
    model = ShapeModel(shape, dtype=dtype)
    engines = {(method, scheme): build_engine(model, method, scheme) for method in METHODS for scheme in CONFIGS}
    for engine in engines.values():  # Only one engine's hooks are installed at a time.
        engine.remove()
    wall: dict[tuple[str, int], list[float]] = {key: [] for key in engines}
    perturbed_reads: dict[tuple[str, int], set[int]] = {key: set() for key in engines}
    cpu: dict[tuple[str, int], list[float]] = {key: [] for key in engines}
    order = list(engines)
    result: dict[str, Any] = {}
    for round_index in range(repeats + 1):
        for key in order if round_index % 2 == 0 else reversed(order):
            engine = engines[key]
            engine.install()
            w0, c0 = time.perf_counter(), time.process_time()
            reads = engine_step(engine, model, round_index, 1 if key[1] == AVX512_LOOP else None)
            w1, c1 = time.perf_counter(), time.process_time()
            engine.remove()
            perturbed_reads[key].update(reads)
            if round_index > 0:  # Round 0: warm-up (scratch buffers, thread pool), discarded.
                wall[key].append(w1 - w0)
                cpu[key].append(c1 - c0)
        if round_index > 0:
            result = _shape_result(name, shape, model, engines, wall, cpu, perturbed_reads)
            if on_round is not None:
                on_round(result)
        log_line(f"engine {name}: round {round_index}/{repeats}{' (warm-up)' if round_index == 0 else ''} done")
    return result


def _shape_result(name, shape, model, engines, wall, cpu, perturbed_reads) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method in METHODS:
        row: dict[str, Any] = {}
        for scheme in CONFIGS:
            engine = engines[(method, scheme)]
            row[f"scheme{scheme}"] = {
                "wall_seconds_median": median(wall[(method, scheme)]),
                "cpu_seconds_median": median(cpu[(method, scheme)]),
                "wall_seconds_all": wall[(method, scheme)],
                "cpu_seconds_all": cpu[(method, scheme)],
                "noise_config": engine.noise_config(),
                # Each pass, every module reading a target must have read its perturbed copy: the work was done.
                "modules_reading_targets": sum(len(t.modules) for t in engine.targets),
                "modules_perturbed_per_pass": sorted(perturbed_reads[(method, scheme)]),
            }
        for name, after, before, _ in RATIOS:
            for clock in ("wall", "cpu"):
                seconds = f"{clock}_seconds_median"
                row[f"{name}_{clock}"] = row[f"scheme{after}"][seconds] / row[f"scheme{before}"][seconds]
        first, second = row["scheme1"], row["scheme2"]
        row["per_round_ratio_cpu"] = [b / a for a, b in zip(first["cpu_seconds_all"], second["cpu_seconds_all"])]
        row["entries"] = engines[(method, SCHEMES[0])].total_numel
        row["tensors"] = len(engines[(method, SCHEMES[0])].targets)
        methods[method] = row
    return {
        "shape": {k: v for k, v in shape.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "largest_tensor": max(p.numel() for p in model.parameters()),
        "rounds_completed": len(next(iter(wall.values()))),
        "load_average_after": os.getloadavg(),
        "methods": methods,
    }


def run_engine_cost(out: Path, shapes: list[str], repeats: int, quick: bool, dtype: str = "float32") -> dict[str, Any]:
    suffix = "" if dtype == "float32" else f"_{dtype}"
    path = out / (f"engine_quick{suffix}.json" if quick else f"engine{suffix}.json")
    payload: dict[str, Any] = {
        "suite": "engine",
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "dtype": dtype,
        "environment": environment(),
        "setup": {
            "step": "engine.perturbed(seed, +eps) and (seed, -eps) around a forward of no-op modules (the engine's "
            "hooks build each target's perturbed copy), then engine.update([seed], [coefficient]); no model forward",
            "methods": {
                "mezo": "every tensor (tied embedding, matrices, norms)",
                "sparse_mezo": f"the layers' matrices, thresholds at sparsity {SPARSITY}",
            },
            "schemes": {
                "1": "z of a tensor drawn whole into a tensor-sized buffer, then applied",
                "2": f"z drawn in {ZOEngine.NOISE_BLOCK}-entry blocks right where it is used (cache-resident)",
                "3": "as 2, Gaussian z from a counter-based stream (zo_trainer.counter_noise) instead of normal_",
                "5": "as 3, the stream's 8-bit picks of 256 bf16-exact values (AVX-512 permutes) instead of 16-bit "
                "picks of 65,536 (a table in memory), applied as it is drawn (one C pass per chunk)",
                "5f": "scheme 5's z drawn into a chunk buffer, then applied by torch ops (the engine before session 12)",
                "5v": "scheme 5 with the C apply's AVX-512 loop for bf16, without AVX512_BF16's conversion (the loop "
                "before session 16; fp32 tensors: the same code as 5)",
            },
            "apply_simd_level": counter_noise.simd_level(),
            "repeats": repeats,
            "statistic": "median over rounds; each round runs every method x scheme once, order reversed every other "
            "round; round 0 (warm-up) discarded; ratio = scheme 2 median / scheme 1 median; ratio_3_over_2 = scheme 3 "
            "median / scheme 2 median; ratio_5_over_3, ratio_5_over_5f and ratio_5_over_5v likewise",
            "torch_num_threads": torch.get_num_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_start": os.getloadavg(),
        },
        "shapes": {},
    }
    for name in shapes:
        log_line(f"engine {name}: building the tensors ({ENGINE_SHAPES[name]['source']})")

        def save(result: dict[str, Any], name: str = name) -> None:  # After every round: a cut run keeps its rounds.
            payload["shapes"][name] = result
            payload["load_average_end"] = os.getloadavg()
            write_json(path, payload)

        measure_shape(name, repeats, on_round=save, dtype=DTYPES[dtype])
    print(table(payload))
    log_line(f"engine -> {path}")
    return payload


def table(payload: dict[str, Any]) -> str:
    """The results as a markdown table (median CPU seconds per engine step; scheme 2 / 1, 3 / 2, 5 / 3, 5 / fill then
    op and 5 / AVX-512 loop, CPU and wall). Files written before a configuration have "-" in its columns."""
    names = {FILL_THEN_OP: "scheme 5, fill then op", AVX512_LOOP: "scheme 5, AVX-512 loop"}
    header = ["shapes", "method", "entries"] + [f"{names.get(c, f'scheme {c}')} CPU s" for c in CONFIGS]
    header += [f"{label} (CPU)" for *_, label in RATIOS] + [f"{label} (wall)" for *_, label in RATIOS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(row: dict[str, Any], key: str, bold: bool = False, digits: int = 2) -> str:
        if key not in row:
            return "-"
        return f"**{row[key]:.{digits}f}**" if bold else f"{row[key]:.{digits}f}"

    for name, result in payload["shapes"].items():
        for method, row in result["methods"].items():
            seconds = {k: v["cpu_seconds_median"] for k, v in row.items() if k.startswith("scheme")}
            cells = [name, f"`{method}`", f"{row['entries'] / 1e6:.1f}M"]
            cells += [cell(seconds, f"scheme{c}", digits=3) for c in CONFIGS]
            cells += [cell(row, f"{key}_cpu", True) for key, *_ in RATIOS]
            cells += [cell(row, f"{key}_wall") for key, *_ in RATIOS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-bench engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; --quick: 1)")
    p.add_argument(
        "--shapes",
        default=",".join(DEFAULT_SHAPES),
        help=f"comma-separated tensor sets from {[s for s in ENGINE_SHAPES if s != 'tiny']}",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="the tensors' dtype (bfloat16: engine_bfloat16.json)"
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes (--shapes ignored), one round: for a test")
    p.add_argument("--out", default="benchmarks/results", help="folder for engine.json (engine_quick.json)")
    return p


def main_engine_cost(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``zo-bench engine``: 0 on success; bad flags exit 2 with one line (the parser's error)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    shapes = ["tiny"] if args.quick else [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in ENGINE_SHAPES]
    if unknown or not shapes:
        parser.error(f"unknown --shapes {unknown or args.shapes!r}: choose from {list(ENGINE_SHAPES)}")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_engine_cost(out, shapes, repeats, args.quick, args.dtype)
    return 0
