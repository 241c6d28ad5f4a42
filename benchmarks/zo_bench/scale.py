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
``ZOTrainer`` makes, on the library's ``ZOEngine`` and methods), ``adamw`` (first-order full fine-tuning, everything
in the model's dtype: ``adamw_bf16`` = the QZO paper's pure-bf16 accounting) and ``adamw_amp`` (Hugging Face's
``--bf16``: fp32 model, grads and AdamW states, forward under ``torch.autocast(bfloat16)``, fused AdamW as the
Trainer's default ``adamw_torch_fused``; point ``adamw_amp``).
Configurations that cannot run here are computed from measured bytes per parameter and labelled ``computed``.

``--device cuda`` (same command otherwise): each fresh worker builds the model on meta and materialises it module by
module directly on the GPU (the int4 points straight into ``Linear4bit`` on CUDA with fp32 ``absmax``, as the QZO
backend's ``prepare`` wants; never the full-precision model, never on the CPU). Memory is the caching allocator's:
``cuda_allocated_after_build_bytes`` (the model), ``cuda_build_peak_*`` (the build's peak), then the peak is reset
and ``step_peak_cuda_allocated_bytes`` / ``step_peak_cuda_reserved_bytes`` cover the steps; times are taken between
``torch.cuda.synchronize`` calls. GPU rows never mix with CPU rows: they go to their own file stem ``scale_cuda``
(``scale_cuda_quick`` for --quick), whose payload says ``"device": "cuda"`` (its ratios, computed rows, goals and
plot use the GPU peak; ``--merge`` refuses a file of the other device) and whose rows carry ``config.device``.
GPU goals (issue 11): 7b QZO int4 <= 5 GB, 7b MeZO fp16 <= 14.5 GB (the QZO paper's figure), ZO step / two
forwards <= 1.10. fp16 points (``inference_fp16``, ``mezo_fp16``, ``sparse_mezo_fp16``) are meant for the GPU;
GPTQ points are skipped (with the reason) where gptqmodel is not installed. ``--deadline`` bounds a whole run.

    zo-bench scale --sizes 13b,7b --points inference_nf4,qzo_nf4 --out benchmarks/results
    zo-bench scale --quick          # tiny shape, every point, CI-sized
    zo-bench scale --device cuda --sizes 7b --points qzo_nf4,mezo_fp16 --steps 3 --paired_timing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zo_trainer.engine import ZOEngine

from .common import SCHEMA_VERSION, EngineClock, log_line, write_json
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
    # What `TrainingArguments(bf16=True)` runs: the model as loaded (fp32 master weights), fp32 grads and AdamW states,
    # forwards under torch.autocast(bfloat16). adamw_bf16 is the pure-bf16 accounting of the QZO paper.
    "adamw_amp": ("fp32", "adamw_amp"),
    "inference_fp16": ("fp16", "inference"),
    "mezo_fp16": ("fp16", "mezo"),
    "sparse_mezo_fp16": ("fp16", "sparse_mezo"),
    # NF4 as a GPU runs it: fp16 compute, norms, embeddings and head (``BnbNF4Backend`` keeps fp16 on CUDA).
    "inference_nf4_fp16": ("nf4_fp16", "inference"),
    "qzo_nf4_fp16": ("nf4_fp16", "qzo"),
}
GPU_WEIGHTS = ("fp16", "nf4_fp16")
# --quick's default points: the CPU runs all but the GPU formats; CUDA runs all.
QUICK_POINTS = {"cpu": [p for p in POINTS if POINTS[p][0] not in GPU_WEIGHTS], "cuda": list(POINTS)}
# The step's peak memory a point is judged by: process RSS on the CPU, the allocator's peak on CUDA.
PEAK_KEY = {"cpu": "step_peak_rss_bytes", "cuda": "step_peak_cuda_allocated_bytes"}
# What the process held before building (imports on the CPU; nothing on a fresh GPU): the computed rows' fixed part.
START_KEY = {"cpu": "rss_start_bytes", "cuda": "cuda_allocated_start_bytes"}


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


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on the CPU): a timer read after it covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``, synchronised before and after (CUDA kernels run asynchronously)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


class CudaMemoryProbe:
    """The caching allocator's counters of one CUDA device: what the model, the step's tensors and their peak take
    (``allocated``), and what the allocator holds from the driver (``reserved``)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def snapshot(self, prefix: str) -> dict[str, int]:
        synchronize(self.device)
        return {
            f"{prefix}_allocated_bytes": torch.cuda.memory_allocated(self.device),
            f"{prefix}_reserved_bytes": torch.cuda.memory_reserved(self.device),
            f"{prefix}_peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            f"{prefix}_peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
        }


def memory_probe(device: torch.device) -> CudaMemoryProbe | None:
    """The probe of ``device``'s memory: ``None`` for the CPU (RSS from /proc, measured inline), the allocator's
    counters for CUDA; an error for a device this suite cannot measure."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"--device {device} asked but torch.cuda.is_available() is False (torch {torch.__version__})"
            )
        return CudaMemoryProbe(device)
    raise ValueError(f"zo-bench scale measures cpu or cuda, not {device.type!r}")


def _process_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # extra information on CUDA only
        return 0


def _prepare_mode(
    model: torch.nn.Module, mode: str, loss_fn, zo_noise: str = "gaussian", noise_scheme: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The function one step of ``mode`` runs (the calls ZOTrainer / a first-order loop make) and its extra info;
    ``noise_scheme``: draw z as that z scheme (default: as new runs do)."""
    extra: dict[str, Any] = {}
    if mode == "inference":

        def run_step() -> None:
            with torch.no_grad():
                loss_fn()
                loss_fn()
    elif mode in ("qzo", "mezo", "sparse_mezo"):
        from zo_trainer.methods import get_method
        from zo_trainer.optim import ZOOptimizer
        from zo_trainer.step import zo_step

        method = get_method(mode)({})
        for p in model.parameters():  # the methods pick the floating tensors that take part
            p.requires_grad_(p.is_floating_point())
        targets = method.targets(model)
        for p in model.parameters():  # as ZOTrainer does: nothing asks autograd for gradients
            p.requires_grad_(False)
        engine = ZOEngine(targets, distribution=zo_noise)
        if noise_scheme:
            engine.load_noise_config({**engine.noise_config(), "scheme": noise_scheme})
        t1 = time.perf_counter()
        if method.sparsity > 0:
            engine.set_thresholds(method.sparsity, select=method.is_sparsified)
        extra["thresholds_seconds"] = time.perf_counter() - t1
        optimizer = ZOOptimizer(engine, method, lr=1e-6, num_perturbations=1, max_skipped_steps=10)
        extra["zo_targets"] = len(targets)
        extra["zo_noise"] = engine.distribution  # as the worker's engine drew it
        extra["noise_scheme"] = engine.noise_scheme
        extra["zo_target_numel"] = engine.total_numel
        state = {"step": 0}
        engine_seconds = extra["engine_seconds"] = []  # per step: the step's own work (``EngineClock``)
        module_seconds = extra["engine_module_seconds"] = []  # per step: forward work the hooks did (not in the above)
        clock = EngineClock(engine)

        def run_step() -> None:
            clock.lap()
            zo_step(engine, optimizer, loss_fn, eps=1e-3, num_perturbations=1, seed=42, step=state["step"])
            optimizer.step()
            state["step"] += 1
            engine_seconds.append(clock.lap())
            module_seconds.append(clock.last_module_seconds)
    elif mode == "adamw":
        model.train()
        params = [p for p in model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        if params[0].is_cuda:  # fused: no foreach temporaries the size of the model (7b bf16 must fit in 80 GB)
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
            extra["adamw_impl"] = "fused"
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-5)

        def run_step() -> None:
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif mode == "adamw_amp":
        run_step = _adamw_amp_step(model, loss_fn, extra)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return run_step, extra


def _adamw_amp_step(model: torch.nn.Module, loss_fn, extra: dict[str, Any]):
    """One step of Hugging Face's ``--bf16`` full fine-tuning: the forward under ``torch.autocast(bfloat16)`` (as
    accelerate wraps it, weight-cast cache on), the backward outside it, fused AdamW on the fp32 parameters (the
    Trainer's default ``adamw_torch_fused``, CPU and CUDA alike); the first step records the dtypes and bytes of
    what it holds in ``extra``."""
    model.train()
    params = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.dtype != torch.float32 for p in params):  # mixed precision keeps fp32 masters: a bf16 model is not it
        raise ValueError(f"adamw_amp needs an fp32 model, got {sorted({str(p.dtype) for p in params})}")
    for p in params:
        p.requires_grad_(True)
    device_type = params[0].device.type
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    extra.update({"adamw_impl": "fused", "autocast_dtype": str(torch.bfloat16)})
    head = model.get_output_embeddings()

    def record_head_dtype(module, args, output) -> None:  # proof that autocast ran the matmuls in bf16
        extra["autocast_lm_head_output_dtype"] = str(output.dtype)

    hook = head.register_forward_hook(record_head_dtype)

    def run_step() -> None:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        if "grad_dtypes" not in extra:
            hook.remove()
            extra["grad_dtypes"] = sorted({str(p.grad.dtype) for p in params if p.grad is not None})
        optimizer.step()
        if "adamw_state_dtypes" not in extra:
            moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
            extra["adamw_state_dtypes"] = sorted({str(t.dtype) for t in moments})
            extra["adamw_state_bytes"] = sum(t.numel() * t.element_size() for t in moments)
            extra["param_dtypes"] = sorted({str(p.dtype) for p in params})
        optimizer.zero_grad(set_to_none=True)

    return run_step


def _two_forwards_paired(
    run_step, loss_fn, device: torch.device, times: list[float], rounds: int = 1
) -> dict[str, list[float]]:
    """Two plain forwards of this same model in this process, after the steps (memory already taken): a ratio
    that does not mix two processes run at different machine loads. ``rounds`` more steps (appended to ``times``),
    each between two timings of the forwards (F S F S ... F); returns the forwards' times and each round's step / mean
    of its two neighbours, as the row's ``two_forwards_seconds`` and ``paired_round_ratios``."""

    def two_forwards() -> None:
        with torch.no_grad():
            loss_fn()
            loss_fn()

    forwards, ratios = [timed(two_forwards, device)], []
    for _ in range(rounds):
        times.append(timed(run_step, device))
        forwards.append(timed(two_forwards, device))
        ratios.append(times[-1] / ((forwards[-2] + forwards[-1]) / 2))
    return {"two_forwards_seconds": forwards, "paired_round_ratios": ratios}


def _language_model_loss(model: torch.nn.Module, config: dict[str, Any], device: torch.device):
    """The loss the steps take: a fixed random batch (``batch_size`` x ``seq_len`` tokens) as its own labels."""
    shape = SCALE_SHAPES[config["shape"]]
    batch = (int(config.get("batch_size", 1)), int(config.get("seq_len", 128)))
    input_ids = torch.randint(3, shape["vocab_size"], batch, generator=torch.Generator().manual_seed(1)).to(device)

    def loss_fn() -> torch.Tensor:
        return model(input_ids=input_ids, labels=input_ids).loss

    return loss_fn


def _model_sizes(model: torch.nn.Module, shape_name: str) -> dict[str, int]:
    return {
        "param_count": param_count(SCALE_SHAPES[shape_name]),
        "stored_param_numel": sum(p.numel() for p in model.parameters()),  # int4: two codes per stored uint8
        "stored_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    }


def scale_worker(config: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(config.get("device", "cpu"))
    if device.type == "cuda":
        return _scale_worker_cuda(config, device)
    shape_name, weights, mode, steps = config["shape"], config["weights"], config["mode"], int(config.get("steps", 1))
    # Every mode imports the package before its baseline: the ZO modes need it, and a ratio to inference must measure
    # the step, not the ~146 MB of imports (Trainer, peft, datasets) that an inference process would skip.
    import zo_trainer  # noqa: F401

    torch.manual_seed(0)
    rss_start = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = build_model(SCALE_SHAPES[shape_name], weights, nf4_init=config.get("nf4_init", "random"))
    build_seconds = time.perf_counter() - t0
    malloc_trim()
    build_peak = _status_bytes("VmHWM")
    rss_after_build = _status_bytes("VmRSS")
    loss_fn = _language_model_loss(model, config, device)
    run_step, extra = _prepare_mode(
        model, mode, loss_fn, config.get("zo_noise", "gaussian"), config.get("noise_scheme")
    )
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
        extra.update(_two_forwards_paired(run_step, loss_fn, device, times, int(config.get("paired_rounds", 1))))
    return {
        "config": config,
        **_model_sizes(model, shape_name),
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


def _scale_worker_cuda(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One point on a CUDA device: the model built on meta and materialised module by module on the GPU; memory from
    the caching allocator (peak reset after building), times between ``torch.cuda.synchronize`` calls."""
    probe = memory_probe(device)
    if device.index is None:  # set_device and the generators want the index
        device = probe.device = torch.device("cuda", torch.cuda.current_device())
    shape_name, weights, mode, steps = config["shape"], config["weights"], config["mode"], int(config.get("steps", 1))
    torch.manual_seed(0)
    torch.cuda.set_device(device)
    probe.reset_peak()
    start = probe.snapshot("start")
    t0 = time.perf_counter()
    model = build_model(SCALE_SHAPES[shape_name], weights, nf4_init=config.get("nf4_init", "random"), device=device)
    synchronize(device)
    build_seconds = time.perf_counter() - t0
    after_build = probe.snapshot("build")  # build_peak_*: the build's peak; build_allocated: the model
    off_device = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    if off_device:
        raise RuntimeError(f"tensors not on {device} after building: {off_device[:5]}")
    loss_fn = _language_model_loss(model, config, device)
    run_step, extra = _prepare_mode(
        model, mode, loss_fn, config.get("zo_noise", "gaussian"), config.get("noise_scheme")
    )
    before_steps = probe.snapshot("before_steps")
    torch.cuda.empty_cache()  # reserved then counts what the steps ask for, not the build's leftovers
    probe.reset_peak()
    times = [timed(run_step, device) for _ in range(steps)]
    step = probe.snapshot("step")
    if config.get("paired_timing") and mode != "inference":
        extra.update(_two_forwards_paired(run_step, loss_fn, device, times, int(config.get("paired_rounds", 1))))
    return {
        "config": config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device),
        "device_total_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
        **_model_sizes(model, shape_name),
        "build_seconds": build_seconds,
        "cuda_allocated_start_bytes": start["start_allocated_bytes"],
        "cuda_allocated_after_build_bytes": after_build["build_allocated_bytes"],
        "cuda_reserved_after_build_bytes": after_build["build_reserved_bytes"],
        "cuda_build_peak_allocated_bytes": after_build["build_peak_allocated_bytes"],
        "cuda_build_peak_reserved_bytes": after_build["build_peak_reserved_bytes"],
        "cuda_allocated_before_steps_bytes": before_steps["before_steps_allocated_bytes"],
        "step_peak_cuda_allocated_bytes": step["step_peak_allocated_bytes"],
        "step_peak_cuda_reserved_bytes": step["step_peak_reserved_bytes"],
        "rss_after_steps_bytes": _process_rss(),  # host memory, extra information
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


def derive_ratios_and_goals(payload: dict[str, Any]) -> None:
    """Ratios, computed rows and the issue's goals from the measured points (in place)."""
    measured = payload["points"]
    sizes = payload["sizes"]
    device = payload.get("device", "cpu")
    peak_key = PEAK_KEY[device]
    for key, row in measured.items():  # the model's parameters, not the packed storage (rows of schema 1 drafts)
        row["param_count"] = param_count(SCALE_SHAPES[key.split("/")[0]])
        row.pop("param_count_config", None)

    def ran(row) -> bool:
        return bool(row) and "error" not in row and "skipped" not in row

    def peak(size, point):
        row = measured.get(_point_key(size, point))
        return row[peak_key] if ran(row) else None

    def seconds(size, point):
        row = measured.get(_point_key(size, point))
        return min(row["step_seconds"]) if ran(row) else None

    ratios: dict[str, dict[str, Any]] = {}
    for size in sizes:
        r: dict[str, Any] = {}
        for weights, zo_points in (
            ("nf4", ["qzo_nf4"]),
            ("nf4_fp16", ["qzo_nf4_fp16"]),
            ("gptq", ["qzo_gptq"]),
            ("bf16", ["mezo_bf16", "sparse_mezo_bf16"]),
            ("fp16", ["mezo_fp16", "sparse_mezo_fp16"]),
        ):
            base_peak, base_time = peak(size, f"inference_{weights}"), seconds(size, f"inference_{weights}")
            for point in zo_points:
                if base_peak and peak(size, point):
                    r[f"{point}_peak_over_inference"] = peak(size, point) / base_peak
                row = measured.get(_point_key(size, point)) or {}
                rounds = row.get("paired_round_ratios") or []
                engine = row.get("engine_seconds") or []
                if rounds and len(engine) >= len(rounds) and ran(row) and device == "cpu":
                    # The paired rounds' steps (the last ones) against the median of their forwards.
                    r[f"{point}_engine_over_two_forwards"] = statistics.median(
                        engine[-len(rounds) :]
                    ) / statistics.median(row["two_forwards_seconds"])
                if len(rounds) >= 3 and ran(row):  # same process, interleaved: robust to a machine whose speed drifts
                    r[f"{point}_step_over_two_forwards"] = statistics.median(rounds)
                    r[f"{point}_step_over_two_forwards_source"] = (
                        f"same process, median of {len(rounds)} interleaved rounds (--paired_timing --paired_rounds)"
                    )
                elif row.get("two_forwards_seconds") and ran(row):  # same process: preferred
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
        fixed = measured[_point_key(src, point)][START_KEY[device]]
        per_param = (peak(src, point) - fixed) / param_count(SCALE_SHAPES[src])
        for size in SCALE_SHAPES:
            if size == "tiny" or peak(size, point):
                continue
            computed[_point_key(size, point)] = {
                peak_key: fixed + per_param * param_count(SCALE_SHAPES[size]),
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
        return (row[peak_key], "computed") if row else (None, "not measured")

    def stored_bytes(size, point):
        row = measured.get(_point_key(size, point))
        return row.get("stored_bytes") if ran(row) else None

    if device == "cuda":
        payload["goals"] = _goals_cuda(ratios, peak, any_peak, stored_bytes)
    else:
        shape = (payload.get("batch_size", 1), payload.get("seq_len", 128))
        payload["goals"] = _goals_cpu(ratios, peak, any_peak, stored_bytes, shape)


# Issue 11's "(AdamW bf16 full FT) / (QZO int4) at 7B >= the paper's 18x", judged in both meanings of "bf16 full FT".
ADAMW_ACCOUNTINGS = {
    "adamw_bf16": "pure bf16, the QZO paper's accounting: bf16 weights, grads, AdamW states",
    "adamw_amp": "HF --bf16 mixed precision: fp32 weights, grads, AdamW states; bf16 autocast",
}
QZO_INT4_POINTS = ("qzo_nf4", "qzo_gptq")  # the first one measured is the ratio's denominator
PAPER_RATIO = 18.0


def int4_codes_bytes(shape: dict[str, int]) -> float:
    """Bytes of the 4-bit codes of a Llama's projections alone (no scales, embeddings, head or norms): the least any
    int4 model of ``shape`` stores."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) / 2


def adamw_over_qzo_goals(peak, any_peak, stored_bytes, size: str = "7b", where: str = "") -> list[dict[str, Any]]:
    """The 18x goal for each AdamW accounting (``ADAMW_ACCOUNTINGS``), then the pure-bf16 ratio's upper bound: no QZO
    run holds less than its model, so (AdamW pure bf16) / (the QZO model's stored bytes) bounds that ratio from above.
    ``where`` names the device in the goal (" GPU"); the status says which figures were measured and which computed."""
    qzo_point = next((p for p in QZO_INT4_POINTS if peak(size, p)), None)
    goals = []
    for point, accounting in ADAMW_ACCOUNTINGS.items():
        goal = f"{size}{where} (AdamW full FT, {accounting}) / (QZO int4) >= {PAPER_RATIO:g}"
        adamw, adamw_how = any_peak(size, point)
        if adamw and qzo_point:
            value = adamw / peak(size, qzo_point)
            met = "met" if value >= PAPER_RATIO else "not met"
            goals.append(
                {
                    "goal": goal,
                    "value": value,
                    "adamw_point": point,
                    "adamw_gb": adamw / 1e9,
                    "qzo_point": qzo_point,
                    "qzo_gb": peak(size, qzo_point) / 1e9,
                    "status": f"{met} (AdamW {adamw_how}, QZO measured)",
                }
            )
        else:
            goals.append({"goal": goal, "adamw_point": point, "status": "not measured"})
    goal = f"{size}{where} upper bound of the pure-bf16 ratio: (AdamW pure bf16) / (QZO int4 model's stored bytes)"
    adamw, adamw_how = any_peak(size, "adamw_bf16")
    model = stored_bytes(size, qzo_point) if qzo_point else None
    if adamw and model:
        value = adamw / model
        codes = int4_codes_bytes(SCALE_SHAPES[size])
        reach = f"< {PAPER_RATIO:g}: unreachable by this model" if value < PAPER_RATIO else f">= {PAPER_RATIO:g}"
        goals.append(
            {
                "goal": goal,
                "value": value,
                "adamw_gb": adamw / 1e9,
                "qzo_point": qzo_point,
                "qzo_model_stored_gb": model / 1e9,
                "int4_codes_only_gb": codes / 1e9,
                "int4_codes_only_bound": adamw / codes,
                "status": f"bound {reach} (AdamW {adamw_how}, model bytes measured; int4 projection codes alone, "
                f"{codes / 1e9:.2f} GB: bound {adamw / codes:.1f})",
            }
        )
    else:
        goals.append({"goal": goal, "status": "not measured"})
    return goals


def _goals_cuda(ratios: dict[str, dict[str, Any]], peak, any_peak, stored_bytes) -> list[dict[str, Any]]:
    """Issue 11's GPU goals: peak = torch.cuda.max_memory_allocated during the step."""
    goals = []
    for goal, size, points, limit in (
        ("7b qzo int4 peak GPU memory <= 5 GB", "7b", ("qzo_nf4", "qzo_nf4_fp16", "qzo_gptq"), 5.0),
        ("7b mezo fp16 peak GPU memory <= 14.5 GB (QZO paper's MeZO figure)", "7b", ("mezo_fp16",), 14.5),
    ):
        options = [(peak(size, p), p) for p in points if peak(size, p)]
        if options:
            best, point = min(options)
            status = "met" if best <= limit * 1e9 else "not met"
            goals.append({"goal": goal, "value_gb": best / 1e9, "point": point, "status": status})
        else:
            goals.append({"goal": goal, "status": "not measured"})
    goals += adamw_over_qzo_goals(peak, any_peak, stored_bytes, where=" GPU")
    step_ratios = [
        (v, f"{s}:{k}") for s, r in ratios.items() for k, v in r.items() if k.endswith("_step_over_two_forwards")
    ]
    goal = "GPU ZO step / two forwards <= 1.10 (every optim, every measured size)"
    if step_ratios:
        value, where = max(step_ratios)
        goals.append({"goal": goal, "value": value, "worst": where, "status": "met" if value <= 1.10 else "not met"})
    else:
        goals.append({"goal": goal, "status": "not measured"})
    return goals


# The public checkpoints the shapes copy (their configs are in scale_models.SCALE_SHAPES), for tables.
SHAPE_NAMES = {"tiny": "tiny", "1b": "TinyLlama-1.1B", "3b": "open_llama_3b", "7b": "Llama-2-7B", "13b": "Llama-2-13B"}
AFTER_BUILD_KEY = {"cpu": "rss_after_build_bytes", "cuda": "cuda_allocated_after_build_bytes"}


def scale_table(payload: dict[str, Any]) -> str:
    """Markdown: one row per shape, one column per point measured at any size. A cell is the step's peak in GB
    (**bold: measured**, with the model after building in brackets and, for a ZO point timed with
    ``--paired_timing``, step / two forwards), or *italic: computed* from the largest measured size."""
    device = payload.get("device", "cpu")
    peak_key, built_key = PEAK_KEY[device], AFTER_BUILD_KEY[device]
    measured, computed = payload["points"], payload.get("computed", {})
    have = [k.split("/") for k, row in measured.items() if row.get(peak_key)]  # skipped / failed points: no peak
    points = [p for p in POINTS if any(point == p for _, point in have)]
    shown = {size for size, _ in have} | {key.split("/")[0] for key in computed}
    sizes = [s for s in SCALE_SHAPES if s in shown]
    head = ["shape", "params"] + [f"{POINTS[p][1]} {POINTS[p][0]}" for p in points]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        cells = [SHAPE_NAMES.get(size, size), f"{param_count(SCALE_SHAPES[size]) / 1e9:.2f}B"]
        ratio = payload.get("ratios", {}).get(size, {})
        for point in points:
            row, guess = measured.get(_point_key(size, point)), computed.get(_point_key(size, point))
            if row and row.get(peak_key):
                cell = f"**{row[peak_key] / 1e9:.2f}**" + (
                    f" ({row[built_key] / 1e9:.2f})" if row.get(built_key) else ""
                )
                if ratio.get(f"{point}_step_over_two_forwards_source", "").startswith("same process"):
                    cell += f", {ratio[f'{point}_step_over_two_forwards']:.2f}×"
            elif guess:
                cell = f"*{guess[peak_key] / 1e9:.1f}*"
            else:
                cell = ""
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    # "value", not "measured": a goal's status says which of its figures are computed
    lines += ["", "| goal (issue 11) | value | met? |", "|---|---|---|"]
    for goal in payload.get("goals", []):
        if "value_gb" in goal:
            value = f"{goal['value_gb']:.2f} GB"
        else:
            value = "n/a" if goal.get("value") is None else f"{goal['value']:.3g}"
        worst = f" (worst: {goal['worst']})" if goal.get("worst") else ""
        lines.append(f"| {goal['goal']} | {value}{worst} | {goal['status']} |")
    return "\n".join(lines) + "\n"


def _goals_cpu(
    ratios: dict[str, dict[str, Any]], peak, any_peak, stored_bytes, batch_shape: tuple[int, int]
) -> list[dict[str, Any]]:
    batch, seq = batch_shape  # the time goals are set at batch 16 x 128 (the SmolLM2 figures')
    timing = "(batch 16 x 128)" if batch_shape == (16, 128) else f"(batch {batch} x {seq} here, not 16 x 128)"
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
    goals += adamw_over_qzo_goals(peak, any_peak, stored_bytes)
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
                "goal": f"qzo step / two forwards <= 1.05 {timing}",
                "value": value,
                "worst": where,
                "status": "met" if value <= 1.05 else "not met",
            }
        )
    mezo = ratios.get("1b", {}).get("mezo_bf16_step_over_two_forwards")  # bf16: fp32 1B is not a point
    goals.append(
        {
            "goal": f"1b mezo step / two forwards <= 1.15 {timing}",
            "value": mezo,
            "status": ("met" if mezo <= 1.15 else "not met") if mezo else "not measured",
        }
    )
    return goals


def plot_scale(path: Path, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = payload.get("device", "cpu")
    peak_key = PEAK_KEY[device]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for point in POINTS:
        measured, computed = [], []
        for size in SCALE_SHAPES:
            row = payload["points"].get(_point_key(size, point))
            if row and "error" not in row and "skipped" not in row:
                measured.append((param_count(SCALE_SHAPES[size]), row[peak_key] / 1e9))
            row = payload["computed"].get(_point_key(size, point))
            if row:
                computed.append((param_count(SCALE_SHAPES[size]), row[peak_key] / 1e9))
        if not measured and not computed:
            continue
        style = ":" if point.startswith("inference") else "-"
        marker = {"nf4": "o", "nf4_fp16": "p", "gptq": "s", "bf16": "^", "fp16": "v", "fp32": "D"}[POINTS[point][0]]
        if measured:
            (line,) = ax.plot(*zip(*measured), marker=marker, ls=style, label=point)
        else:
            (line,) = ax.plot([], [], marker=marker, ls=style, label=point)
        if computed:  # dashed, hollow: computed from the measured bytes per parameter, joined to the measured points
            joined = sorted(measured + computed)
            ax.plot(*zip(*joined), ls="--", color=line.get_color(), alpha=0.5)
            ax.plot(*zip(*computed), marker=marker, ls="none", mfc="none", color=line.get_color(), alpha=0.7)
    if device == "cuda":
        total = max((r.get("device_total_memory_bytes", 0) for r in payload["points"].values()), default=0)
        lines = [(total / 1e9, f"{total / 1e9:.0f} GB (this GPU)")] if total else []
        lines += [(14.5, "14.5 GB (goal: 7b MeZO fp16)"), (5, "5 GB (goal: 7b QZO int4)")]
        ylabel, where = "peak GPU memory allocated during the step (GB)", "CUDA"
    else:
        lines = [(24, "24 GB (this machine's RAM = the paper's GPU)")]
        ylabel, where = "peak RSS during the step (GB)", "CPU"
    for y, text in lines:
        ax.axhline(y, color="red", lw=1)
        ax.annotate(
            text, xy=(0.99, y), xycoords=("axes fraction", "data"), ha="right", va="bottom", color="red", fontsize=8
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (Llama shapes: 1.1B, 3.4B, 6.7B, 13B)")
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"Peak memory vs model size, {where}, batch {payload['batch_size']} x {payload['seq_len']}\n"
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
    device: str = "cpu",
    deadline: float | None = None,
    zo_noise: str = "gaussian",
    noise_scheme: int | None = None,
    paired_rounds: int = 1,
) -> dict[str, Any]:
    """Every (size, point) in a fresh worker; ``deadline`` (seconds for the whole run) caps each point's timeout and
    leaves the points it does not reach unmeasured (``skipped``), so that a run cut short keeps what it measured."""
    end = time.monotonic() + deadline if deadline else None
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    payload: dict[str, Any] = {"points": {}}
    if merge and json_path.exists():
        payload = json.loads(json_path.read_text())
    payload.update(
        {
            "suite": "scale",
            "device": device,
            "schema_version": SCHEMA_VERSION,
            "environment": environment(),
            "load_average": os.getloadavg(),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "threads": threads,
            "nf4_init": nf4_init,
            "zo_noise": zo_noise,
            **({"noise_scheme": noise_scheme} if noise_scheme else {}),
            "shapes": {s: {**SCALE_SHAPES[s], "param_count": param_count(SCALE_SHAPES[s])} for s in SCALE_SHAPES},
        }
    )
    commands = payload.setdefault("commands", [])
    commands.append("zo-bench scale " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["scale"] else sys.argv[1:]))
    for size in sizes:
        for point in points:
            weights, mode = POINTS[point]
            config = {
                **({"device": device} if device != "cpu" else {}),  # the CPU rows keep their original layout
                "paired_timing": paired_timing,
                **({"paired_rounds": paired_rounds} if paired_rounds != 1 else {}),  # earlier rows: one round
                "shape": size,
                "weights": weights,
                "mode": mode,
                "steps": steps,
                "batch_size": batch_size,
                "seq_len": seq_len,
                "threads": threads,
                "nf4_init": nf4_init,
                **({"zo_noise": zo_noise} if zo_noise != "gaussian" else {}),  # earlier rows: Gaussian z
                **({"noise_scheme": noise_scheme} if noise_scheme else {}),  # absent: the engine's default
            }
            key = _point_key(size, point)
            log_line(f"scale {key} on {device} ...")
            left = end - time.monotonic() if end else timeout
            skip = _skip_reason(weights, left, device)
            if skip:
                log_line(f"  skipped: {skip}")
                if key not in payload["points"] or "skipped" in payload["points"][key]:  # never hide a measured row
                    payload["points"][key] = {"config": config, "skipped": skip}
                    _update(payload, json_path)
                continue
            try:
                row = _spawn(config, min(timeout, left), nice)
                row["load_average_after"] = os.getloadavg()
                build_peak = row.get("build_peak_rss_bytes", row.get("cuda_build_peak_allocated_bytes", 0))
                log_line(
                    f"  build peak {build_peak / 1e9:.2f} GB, step peak "
                    f"{row[PEAK_KEY[device]] / 1e9:.2f} GB, steps {row['step_seconds']}"
                )
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                row = {"config": config, "error": str(e)[-1500:]}
                log_line(f"  failed: {str(e)[-300:]}")
            payload["points"][key] = row
            _update(payload, json_path)
            if device != "cpu":  # a GPU run may be cut off from outside: its plot follows every point
                plot_scale(png_path, payload)
    plot_scale(png_path, payload)
    return payload


def _skip_reason(weights: str, seconds_left: float, device: str = "cpu") -> str | None:
    """Why a point is not run: its weights need a package this environment lacks or a GPU, or the run's deadline
    passed."""
    if weights == "gptq" and importlib.util.find_spec("gptqmodel") is None:
        return "gptqmodel is not installed"
    if weights == "nf4_fp16" and device == "cpu":
        return "nf4_fp16 is NF4 as a GPU runs it (on the CPU QZO computes NF4 in fp32: the point *_nf4)"
    if seconds_left < 5:
        return "the run's --deadline was reached before this point"
    return None


def _update(payload: dict[str, Any], json_path: Path) -> None:
    payload["sizes"] = sorted({k.split("/")[0] for k in payload["points"]}, key=lambda s: param_count(SCALE_SHAPES[s]))
    derive_ratios_and_goals(payload)
    write_json(json_path, payload)  # after every point: a long run keeps what it measured


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-bench scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shape (--sizes ignored), every point of the device unless --points"
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: peak RSS; cuda: the model built on the GPU, peak torch.cuda.max_memory_allocated (file stem "
        "scale_cuda)",
    )
    p.add_argument("--sizes", default="1b", help=f"comma-separated shapes from {list(SCALE_SHAPES)}")
    p.add_argument(
        "--points",
        default=None,
        help=f"comma-separated points from {list(POINTS)} (default inference_nf4,qzo_nf4; --quick: all, less fp16 on the CPU)",
    )
    p.add_argument("--steps", type=int, default=1, help="steps per point (two forwards each)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each worker")
    p.add_argument("--nice", type=int, default=5, help="niceness of each worker")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    p.add_argument(
        "--deadline", type=float, default=None, help="seconds for the whole run: later points are skipped, not run"
    )
    p.add_argument("--nf4_init", choices=["random", "quantize"], default="random")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--name", default=None, help="file stem of the JSON / PNG (default scale, scale_quick; scale_cuda[_quick])"
    )
    p.add_argument(
        "--paired_timing",
        action="store_true",
        help="ZO points also time two plain forwards in their own process (costs two forwards + one step more)",
    )
    p.add_argument(
        "--paired_rounds",
        type=int,
        default=1,
        help="with --paired_timing: this many more steps, each between two timings of the forwards; from 3 on, step / "
        "two forwards is the median of the rounds' ratios (else min step / min forwards)",
    )
    p.add_argument("--merge", action="store_true", help="add to an existing JSON instead of replacing it")
    p.add_argument(
        "--zo_noise",
        choices=["gaussian", "rademacher"],
        default="gaussian",
        help="z of the ZO points (zo_trainer's --zo_noise); a file holds one kind (name it with --name)",
    )
    p.add_argument(
        "--noise_scheme",
        type=int,
        choices=ZOEngine.NOISE_SCHEMES,
        default=None,
        help="draw z as this z scheme of the engine (default: as new runs do), e.g. 4 to time the engine before "
        "scheme 5's Gaussian draw on CPU, 3 before scheme 4's on CUDA, 5 with --zo_noise rademacher before scheme "
        "6's Rademacher draw; a file holds one scheme (name it with --name)",
    )
    return p


def main_scale(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``zo-bench scale``: 0 when every point ran, 1 when one failed (its error is in the JSON)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    sizes = ["tiny"] if args.quick else args.sizes.split(",")
    default_points = QUICK_POINTS[args.device] if args.quick else ["inference_nf4", "qzo_nf4"]
    points = args.points.split(",") if args.points else default_points
    bad = [s for s in sizes if s not in SCALE_SHAPES] + [p for p in points if p not in POINTS]
    if bad:
        parser.error(f"unknown size/point {bad}: sizes {list(SCALE_SHAPES)}, points {list(POINTS)}")
    if args.paired_rounds < 1 or (args.paired_rounds > 1 and not args.paired_timing):
        parser.error(f"--paired_rounds {args.paired_rounds}: give a count >= 1, with --paired_timing")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch.cuda.is_available() is False here (torch {torch.__version__})")
    out = Path(args.out)
    name = args.name or ("scale" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else ""))
    json_path = out / f"{name}.json"
    if args.merge and json_path.exists():
        merged_device = json.loads(json_path.read_text()).get("device", "cpu")
        if merged_device != args.device:
            parser.error(f"--merge: {json_path} holds {merged_device} rows, this run is --device {args.device}")
        merged_noise = json.loads(json_path.read_text()).get("zo_noise", "gaussian")
        if merged_noise != args.zo_noise:
            parser.error(f"--merge: {json_path} holds {merged_noise} z rows, this run is --zo_noise {args.zo_noise}")
        merged_scheme = json.loads(json_path.read_text()).get("noise_scheme")
        if merged_scheme != args.noise_scheme:
            held = f"z scheme {merged_scheme} rows" if merged_scheme else "rows of the default z scheme"
            parser.error(f"--merge: {json_path} holds {held}, this run is --noise_scheme {args.noise_scheme}")
    out.mkdir(parents=True, exist_ok=True)
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
        args.device,
        args.deadline,
        args.zo_noise,
        args.noise_scheme,
        paired_rounds=args.paired_rounds,
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
