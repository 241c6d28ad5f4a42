"""``zo-bench scale``: memory and time of the ZO methods at real model sizes, without real weights.

Llama-family shapes (TinyLlama-1.1B, open_llama_3b, Llama-2-7B, Llama-2-13B; the public configs, written here) are
built on the meta device and materialised one module at a time with random values: every projection of an int4
model is written directly as a 4-bit layer (bitsandbytes NF4 ``Linear4bit`` with fp32 ``absmax``, no double
quantization; or gptqmodel ``TorchLinear`` with random packed int4 ``qweight`` / ``qzeros`` and fp32 ``scales``), so
the model never exists in full precision. Memory and time do not depend on the values, so no calibration is needed.
Random NF4 codes stand in for quantized Gaussians by default (``--nf4_init quantize`` runs bitsandbytes'
``quantize_4bit`` on a random weight per layer instead: same tensors, ~90 s per billion parameters on 2 cores).

Each point (shape x weights x mode) runs in a fresh process (``python -m benchmarks.zo_bench.scale worker``), which
reports the RSS after building the model, the build's peak (``VmHWM``) and the peak RSS while running ``steps``
steps (sampled, and ``VmHWM`` at the end). Modes: ``inference`` (two no-grad forwards = the cost of one ZO step's
forwards), ``qzo`` / ``mezo`` / ``sparse_mezo`` (``zo_trainer.step.zo_step`` + ``ZOOptimizer.step``, the calls
``ZOTrainer`` makes, on the library's ``ZOEngine`` and methods) and ``adamw`` (first-order full fine-tuning).
Configurations that cannot run here are computed from measured bytes per parameter and labelled ``computed``.

    zo-bench scale --sizes 13b,7b --points inference_nf4,qzo_nf4 --out benchmarks/results
    zo-bench scale --quick          # tiny shape, every point, CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import SCHEMA_VERSION, log_line, write_json
from .environment import environment
from .scale_models import SCALE_SHAPES, build_model, param_count
from .worker import PeakSampler, malloc_trim, print_result, run_worker

SCALE_RESULT_PREFIX = "ZO_SCALE_RESULT"

POINTS: dict[str, tuple[str, str]] = {
    "inference_nf4": ("nf4", "inference"),
    "qzo_nf4": ("nf4", "qzo"),
    "inference_gptq": ("gptq", "inference"),
    "qzo_gptq": ("gptq", "qzo"),
    "inference_bf16": ("bf16", "inference"),
    "mezo_bf16": ("bf16", "mezo"),
    "sparse_mezo_bf16": ("bf16", "sparse_mezo"),
    "adamw_bf16": ("bf16", "adamw"),
}


# =====================================================================================================
# one point, in this (fresh) process
# =====================================================================================================
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def scale_worker(config: dict[str, Any]) -> dict[str, Any]:
    shape_name, weights, mode = config["shape"], config["weights"], config["mode"]
    steps, batch_size, seq_len = (
        int(config.get("steps", 1)),
        int(config.get("batch_size", 1)),
        int(config.get("seq_len", 128)),
    )
    torch.manual_seed(0)
    rss_start = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = build_model(SCALE_SHAPES[shape_name], weights, nf4_init=config.get("nf4_init", "random"))
    build_seconds = time.perf_counter() - t0
    malloc_trim()
    build_peak = _status_bytes("VmHWM")
    rss_after_build = _status_bytes("VmRSS")
    stored_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    input_ids = torch.randint(
        3, SCALE_SHAPES[shape_name]["vocab_size"], (batch_size, seq_len), generator=torch.Generator().manual_seed(1)
    )

    def loss_fn() -> torch.Tensor:
        return model(input_ids=input_ids, labels=input_ids).loss

    extra: dict[str, Any] = {}
    if mode == "inference":

        def run_step() -> None:
            with torch.no_grad():
                loss_fn()
                loss_fn()
    elif mode in ("qzo", "mezo", "sparse_mezo"):
        from zo_trainer.engine import ZOEngine
        from zo_trainer.methods import get_method
        from zo_trainer.optim import ZOOptimizer
        from zo_trainer.step import zo_step

        method = get_method(mode)({})
        for p in model.parameters():  # the methods pick the floating tensors that take part
            p.requires_grad_(p.is_floating_point())
        targets = method.targets(model)
        for p in model.parameters():  # as ZOTrainer does: nothing asks autograd for gradients
            p.requires_grad_(False)
        engine = ZOEngine(targets)
        t1 = time.perf_counter()
        if method.sparsity > 0:
            engine.set_thresholds(method.sparsity, select=method.is_sparsified)
        extra["thresholds_seconds"] = time.perf_counter() - t1
        optimizer = ZOOptimizer(engine, method, lr=1e-6, num_perturbations=1, max_skipped_steps=10)
        extra["zo_targets"] = len(targets)
        extra["zo_target_numel"] = engine.total_numel
        state = {"step": 0}

        def run_step() -> None:
            zo_step(engine, optimizer, loss_fn, eps=1e-3, num_perturbations=1, seed=42, step=state["step"])
            optimizer.step()
            state["step"] += 1
    elif mode == "adamw":
        model.train()
        params = [p for p in model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def run_step() -> None:
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    malloc_trim()
    rss_before_steps = _status_bytes("VmRSS")
    hwm_reset = _reset_hwm()
    times = []
    with PeakSampler(interval=0.005) as sampler:
        for _ in range(steps):
            t1 = time.perf_counter()
            run_step()
            times.append(time.perf_counter() - t1)
    step_peak = max(sampler.peak, _status_bytes("VmHWM") if hwm_reset else 0)
    if config.get("paired_timing") and mode != "inference":
        # Two plain forwards of this same model in this process, after the steps (memory already taken): a ratio
        # that does not mix two processes run at different machine loads. Interleaved with one more step.
        forwards = []
        for _ in range(2):
            t1 = time.perf_counter()
            with torch.no_grad():
                loss_fn()
                loss_fn()
            forwards.append(time.perf_counter() - t1)
            if len(forwards) == 1:
                t1 = time.perf_counter()
                run_step()
                times.append(time.perf_counter() - t1)
        extra["two_forwards_seconds"] = forwards
    return {
        "config": config,
        "param_count": param_count(SCALE_SHAPES[shape_name]),
        "stored_param_numel": sum(p.numel() for p in model.parameters()),  # int4: two codes per stored uint8
        "stored_bytes": stored_bytes,
        "rss_start_bytes": rss_start,
        "build_seconds": build_seconds,
        "build_peak_rss_bytes": build_peak,
        "rss_after_build_bytes": rss_after_build,
        "rss_before_steps_bytes": rss_before_steps,
        "step_peak_rss_bytes": step_peak,
        "step_peak_sampled_bytes": sampler.peak,
        "lifetime_peak_rss_bytes": _status_bytes("VmHWM") if not hwm_reset else max(build_peak, step_peak),
        "hwm_reset": hwm_reset,
        "step_seconds": times,
        **extra,
    }


def _spawn(config: dict[str, Any], timeout: float, nice: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(config.get("threads", 2))}
    proc, result = run_worker(
        ["benchmarks.zo_bench.scale", "worker", "--config", json.dumps(config)],
        SCALE_RESULT_PREFIX,
        timeout=timeout,
        nice=nice,
        env=env,
    )
    if result is not None:
        return result
    tail = (proc.stderr or proc.stdout)[-1500:]
    raise RuntimeError(f"scale worker failed (exit {proc.returncode}, {config}):\n{tail}")


# =====================================================================================================
# suite
# =====================================================================================================
def _point_key(size: str, point: str) -> str:
    return f"{size}/{point}"


def _derived(payload: dict[str, Any]) -> None:
    """Ratios, computed rows and the issue's goals from the measured points (in place)."""
    measured = payload["points"]
    sizes = payload["sizes"]
    for key, row in measured.items():  # the model's parameters, not the packed storage (rows of schema 1 drafts)
        row["param_count"] = param_count(SCALE_SHAPES[key.split("/")[0]])
        row.pop("param_count_config", None)

    def peak(size, point):
        row = measured.get(_point_key(size, point))
        return row["step_peak_rss_bytes"] if row and "error" not in row else None

    def seconds(size, point):
        row = measured.get(_point_key(size, point))
        return min(row["step_seconds"]) if row and "error" not in row else None

    ratios: dict[str, dict[str, Any]] = {}
    for size in sizes:
        r: dict[str, Any] = {}
        for weights, zo_points in (
            ("nf4", ["qzo_nf4"]),
            ("gptq", ["qzo_gptq"]),
            ("bf16", ["mezo_bf16", "sparse_mezo_bf16"]),
        ):
            base_peak, base_time = peak(size, f"inference_{weights}"), seconds(size, f"inference_{weights}")
            for point in zo_points:
                if base_peak and peak(size, point):
                    r[f"{point}_peak_over_inference"] = peak(size, point) / base_peak
                row = measured.get(_point_key(size, point)) or {}
                if row.get("two_forwards_seconds") and "error" not in row:  # same process: preferred
                    r[f"{point}_step_over_two_forwards"] = min(row["step_seconds"]) / min(row["two_forwards_seconds"])
                    r[f"{point}_step_over_two_forwards_source"] = "same process (--paired_timing)"
                elif base_time and seconds(size, point):
                    r[f"{point}_step_over_two_forwards"] = seconds(size, point) / base_time
                    r[f"{point}_step_over_two_forwards_source"] = "inference point (another process)"
        ratios[size] = r
    payload["ratios"] = ratios

    # Computed rows: the largest measured size of a point gives its bytes per parameter, (step peak - RSS of the
    # process before building: imports) / params; computed peak = that fixed RSS + bytes/param x params.
    computed: dict[str, dict[str, Any]] = {}
    for point in POINTS:
        have = [s for s in sizes if peak(s, point)]
        if not have:
            continue
        src = max(have, key=lambda s: param_count(SCALE_SHAPES[s]))
        fixed = measured[_point_key(src, point)]["rss_start_bytes"]
        per_param = (peak(src, point) - fixed) / param_count(SCALE_SHAPES[src])
        for size in SCALE_SHAPES:
            if size == "tiny" or peak(size, point):
                continue
            computed[_point_key(size, point)] = {
                "step_peak_rss_bytes": fixed + per_param * param_count(SCALE_SHAPES[size]),
                "computed_from": _point_key(src, point),
                "bytes_per_param": per_param,
                "fixed_bytes": fixed,
                "label": "computed",
            }
    payload["computed"] = computed

    def any_peak(size, point):
        p = peak(size, point)
        if p:
            return p, "measured"
        row = computed.get(_point_key(size, point))
        return (row["step_peak_rss_bytes"], "computed") if row else (None, "not measured")

    goals = []
    for size, limit in (("13b", 12), ("7b", 6)):
        options = [(peak(size, p), p) for p in ("qzo_nf4", "qzo_gptq") if peak(size, p)]
        if options:
            best, point = min(options)
            goals.append(
                {
                    "goal": f"{size} qzo int4 peak RSS < {limit} GB",
                    "value_gb": best / 1e9,
                    "point": point,
                    "status": "met" if best < limit * 1e9 else "not met",
                }
            )
        else:
            goals.append({"goal": f"{size} qzo int4 peak RSS < {limit} GB", "status": "not measured"})
    adamw, adamw_how = any_peak("7b", "adamw_bf16")
    qzo7 = peak("7b", "qzo_nf4") or peak("7b", "qzo_gptq")
    if adamw and qzo7:
        goals.append(
            {
                "goal": "7b (AdamW bf16 full FT) / (QZO int4) >= 18",
                "value": adamw / qzo7,
                "status": ("met" if adamw / qzo7 >= 18 else "not met") + f" (AdamW {adamw_how})",
            }
        )
    else:
        goals.append({"goal": "7b (AdamW bf16 full FT) / (QZO int4) >= 18", "status": "not measured"})
    worst = [(v, f"{s}:{k}") for s, r in ratios.items() for k, v in r.items() if k.endswith("peak_over_inference")]
    if worst:
        value, where = max(worst)
        goals.append(
            {
                "goal": "ZO step peak / inference peak <= 1.05 (every optim, every measured size)",
                "value": value,
                "worst": where,
                "status": "met" if value <= 1.05 else "not met",
            }
        )
    qzo_times = [
        (v, f"{s}:{k}")
        for s, r in ratios.items()
        for k, v in r.items()
        if k.startswith("qzo") and k.endswith("two_forwards")
    ]
    if qzo_times:
        value, where = max(qzo_times)
        goals.append(
            {
                "goal": "qzo step / two forwards <= 1.05 (batch 1 x 128 here, not 16 x 128)",
                "value": value,
                "worst": where,
                "status": "met" if value <= 1.05 else "not met",
            }
        )
    mezo = ratios.get("1b", {}).get("mezo_bf16_step_over_two_forwards")
    goals.append(
        {
            "goal": "1b mezo step / two forwards <= 1.15 (batch 1 x 128 here, not 16 x 128)",
            "value": mezo,
            "status": ("met" if mezo <= 1.15 else "not met") if mezo else "not measured",
        }
    )
    payload["goals"] = goals


def plot_scale(path: Path, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for point in POINTS:
        measured, computed = [], []
        for size in SCALE_SHAPES:
            row = payload["points"].get(_point_key(size, point))
            if row and "error" not in row:
                measured.append((param_count(SCALE_SHAPES[size]), row["step_peak_rss_bytes"] / 1e9))
            row = payload["computed"].get(_point_key(size, point))
            if row:
                computed.append((param_count(SCALE_SHAPES[size]), row["step_peak_rss_bytes"] / 1e9))
        if not measured and not computed:
            continue
        style = ":" if point.startswith("inference") else "-"
        marker = {"nf4": "o", "gptq": "s", "bf16": "^"}[POINTS[point][0]]
        if measured:
            (line,) = ax.plot(*zip(*measured), marker=marker, ls=style, label=point)
        else:
            (line,) = ax.plot([], [], marker=marker, ls=style, label=point)
        if computed:  # dashed, hollow: computed from the measured bytes per parameter, joined to the measured points
            joined = sorted(measured + computed)
            ax.plot(*zip(*joined), ls="--", color=line.get_color(), alpha=0.5)
            ax.plot(*zip(*computed), marker=marker, ls="none", mfc="none", color=line.get_color(), alpha=0.7)
    ax.axhline(24, color="red", lw=1)
    ax.annotate(
        "24 GB (this machine's RAM = the paper's GPU)",
        xy=(0.99, 24),
        xycoords=("axes fraction", "data"),
        ha="right",
        va="bottom",
        color="red",
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (Llama shapes: 1.1B, 3.4B, 6.7B, 13B)")
    ax.set_ylabel("peak RSS during the step (GB)")
    ax.set_title(
        f"Peak memory vs model size, CPU, batch {payload['batch_size']} x {payload['seq_len']}\n"
        "filled markers, solid: measured; hollow markers, dashed: computed from measured bytes/parameter",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_scale(
    out: Path,
    sizes: list[str],
    points: list[str],
    steps: int,
    batch_size: int,
    seq_len: int,
    threads: int,
    nice: int,
    timeout: float,
    name: str,
    nf4_init: str,
    merge: bool,
    paired_timing: bool = False,
) -> dict[str, Any]:
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    payload: dict[str, Any] = {"points": {}}
    if merge and json_path.exists():
        payload = json.loads(json_path.read_text())
    payload.update(
        {
            "suite": "scale",
            "schema_version": SCHEMA_VERSION,
            "environment": environment(),
            "load_average": os.getloadavg(),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "threads": threads,
            "nf4_init": nf4_init,
            "shapes": {s: {**SCALE_SHAPES[s], "param_count": param_count(SCALE_SHAPES[s])} for s in SCALE_SHAPES},
        }
    )
    commands = payload.setdefault("commands", [])
    commands.append("zo-bench scale " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["scale"] else sys.argv[1:]))
    for size in sizes:
        for point in points:
            weights, mode = POINTS[point]
            config = {
                "paired_timing": paired_timing,
                "shape": size,
                "weights": weights,
                "mode": mode,
                "steps": steps,
                "batch_size": batch_size,
                "seq_len": seq_len,
                "threads": threads,
                "nf4_init": nf4_init,
            }
            log_line(f"scale {size}/{point} ...")
            try:
                row = _spawn(config, timeout, nice)
                row["load_average_after"] = os.getloadavg()
                log_line(
                    f"  build peak {row['build_peak_rss_bytes'] / 1e9:.2f} GB, step peak "
                    f"{row['step_peak_rss_bytes'] / 1e9:.2f} GB, steps {row['step_seconds']}"
                )
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                row = {"config": config, "error": str(e)[-1500:]}
                log_line(f"  failed: {str(e)[-300:]}")
            payload["points"][_point_key(size, point)] = row
            payload["sizes"] = sorted(
                {k.split("/")[0] for k in payload["points"]}, key=lambda s: param_count(SCALE_SHAPES[s])
            )
            _derived(payload)
            write_json(json_path, payload)  # after every point: a long run keeps what it measured
    plot_scale(png_path, payload)
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-bench scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shape (--sizes ignored), every point unless --points")
    p.add_argument("--sizes", default="1b", help=f"comma-separated shapes from {list(SCALE_SHAPES)}")
    p.add_argument(
        "--points",
        default=None,
        help=f"comma-separated points from {list(POINTS)} (default inference_nf4,qzo_nf4; --quick: all)",
    )
    p.add_argument("--steps", type=int, default=1, help="steps per point (two forwards each)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each worker")
    p.add_argument("--nice", type=int, default=5, help="niceness of each worker")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    p.add_argument("--nf4_init", choices=["random", "quantize"], default="random")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="file stem of the JSON / PNG (default scale, scale_quick)")
    p.add_argument(
        "--paired_timing",
        action="store_true",
        help="ZO points also time two plain forwards in their own process (costs two forwards + one step more)",
    )
    p.add_argument("--merge", action="store_true", help="add to an existing JSON instead of replacing it")
    return p


def main_scale(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``zo-bench scale``: 0 when every point ran, 1 when one failed (its error is in the JSON)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    sizes = ["tiny"] if args.quick else args.sizes.split(",")
    points = args.points.split(",") if args.points else (list(POINTS) if args.quick else ["inference_nf4", "qzo_nf4"])
    bad = [s for s in sizes if s not in SCALE_SHAPES] + [p for p in points if p not in POINTS]
    if bad:
        parser.error(f"unknown size/point {bad}: sizes {list(SCALE_SHAPES)}, points {list(POINTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("scale_quick" if args.quick else "scale")
    payload = run_scale(
        out,
        sizes,
        points,
        args.steps,
        args.batch_size,
        args.seq_len,
        args.threads,
        args.nice,
        args.timeout,
        name,
        args.nf4_init,
        args.merge,
        args.paired_timing,
    )
    failed = [k for k, v in payload["points"].items() if "error" in v and k.split("/")[1] in points]
    for goal in payload["goals"]:
        print(f"{goal['goal']}: {goal['status']}" + (f" ({goal['value_gb']:.2f} GB)" if "value_gb" in goal else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        p = argparse.ArgumentParser(prog="benchmarks.zo_bench.scale worker")
        p.add_argument("worker")
        p.add_argument("--config", required=True)
        args = p.parse_args(argv)
        import transformers

        transformers.utils.logging.set_verbosity_error()
        result = scale_worker(json.loads(args.config))
        print_result(SCALE_RESULT_PREFIX, result)
        return 0
    if argv[:1] == ["scale"]:
        argv = argv[1:]
    return main_scale(argv)


if __name__ == "__main__":
    sys.exit(main())
