"""Memory suite: peak RSS of inference, the ZO methods and AdamW, one fresh subprocess per configuration
(``zo-bench memory``; the worker is ``python -m benchmarks.zo_bench memory-worker``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .common import SCHEMA_VERSION, log_line, median, progress, timed, write_json
from .environment import environment
from .factories import GROWTH_CONFIGS, bench_tokenizer, load_bench_model, random_model, rte_batch
from .plots import plot_memory
from .steppers import ZOStepper
from .worker import PeakSampler, malloc_trim, run_worker

MEMORY_RESULT_PREFIX = "ZO_BENCH_RESULT"


def memory_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: RSS after load, peak RSS during ``steps`` steps, ru_maxrss."""
    import resource

    mode = config["mode"]  # inference | mezo | sparse_mezo | adamw | qzo
    kind = config.get("model", "fp32")  # fp32 | nf4 | gptq | random:<size>
    steps = int(config.get("steps", 3))
    quick = bool(config.get("quick", False))
    own_work = not config.get("work")
    work = Path(config.get("work") or tempfile.mkdtemp(prefix="zo_bench_mem_"))
    torch.manual_seed(0)
    tok = bench_tokenizer()
    batch = rte_batch(tok, int(config["batch_size"]), int(config.get("max_length", 128)), config.get("data_dir"))
    if kind.startswith("random:"):
        shape = GROWTH_CONFIGS[kind.split(":", 1)[1]]
        model = random_model(shape)
    else:
        model = load_bench_model(kind, quick, work)
    n_params = sum(p.numel() for p in model.parameters())
    malloc_trim()
    import psutil

    rss_after_load = psutil.Process().memory_info().rss

    from zo_trainer.data import candidate_loss

    if mode == "inference":
        for p in model.parameters():
            p.requires_grad_(False)

        def run_step():
            with torch.no_grad():
                candidate_loss(model, batch)
    elif mode in ("mezo", "sparse_mezo", "qzo"):
        stepper = ZOStepper(model, mode)
        run_step = lambda: stepper.step(batch)  # noqa: E731
    elif mode == "adamw":
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def run_step():
            loss, _ = candidate_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(mode)

    times = []
    with PeakSampler() as sampler:
        for _ in range(steps):
            times.append(timed(run_step))
    peak_rss_steps = sampler.peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "config": config,
        "param_count": n_params,
        "batch_rows": int(batch["input_ids"].shape[0]),
        "batch_tokens": int(batch["input_ids"].shape[1]),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_during_steps_bytes": peak_rss_steps,
        "ru_maxrss_lifetime_bytes": maxrss,
        "step_seconds": times,
    }


def spawn_memory_worker(config: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """``memory_worker(config)`` in a fresh ``python -m benchmarks.zo_bench memory-worker`` process."""
    proc, result = run_worker(
        ["benchmarks.zo_bench", "memory-worker", "--config", json.dumps(config)], MEMORY_RESULT_PREFIX, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed ({config}):\n{proc.stderr[-4000:]}")
    if result is not None:
        return result
    raise RuntimeError(f"memory worker printed no result ({config}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


MEMORY_CONFIGS = [
    ("inference_fp32", {"mode": "inference", "model": "fp32"}),
    ("mezo_fp32", {"mode": "mezo", "model": "fp32"}),
    ("sparse_mezo_fp32", {"mode": "sparse_mezo", "model": "fp32"}),
    ("adamw_fp32", {"mode": "adamw", "model": "fp32"}),
    ("inference_gptq_int4", {"mode": "inference", "model": "gptq"}),
    ("qzo_gptq_int4", {"mode": "qzo", "model": "gptq"}),
    ("inference_nf4_int4", {"mode": "inference", "model": "nf4"}),
    ("qzo_nf4_int4", {"mode": "qzo", "model": "nf4"}),
]


def run_memory(
    out: Path,
    quick: bool,
    data_dir: str | None,
    batch_size: int | None = None,
    max_length: int = 128,
    steps: int | None = None,
    repeats: int = 1,
) -> dict:
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="zo_bench_"))
    batch_size = batch_size or (2 if quick else 16)
    steps = steps or 2
    runs: dict[str, list[dict]] = {name: [] for name, _ in MEMORY_CONFIGS}
    jobs = [(name, cfg) for _ in range(repeats) for name, cfg in MEMORY_CONFIGS]
    for name, cfg in progress(jobs, desc="memory"):
        config = dict(
            cfg,
            batch_size=batch_size,
            max_length=max_length,
            steps=steps,
            quick=quick,
            data_dir=data_dir,
            work=str(work),
        )
        if quick:  # CI-sized: in this process (not fresh; figures meaningless), the subprocess path is tested apart
            result = memory_worker(config)
            result["fresh_process"] = False
        else:
            result = spawn_memory_worker(config)
            result["fresh_process"] = True
        runs[name].append(result)

    def peak(name):
        return median(r["peak_rss_during_steps_bytes"] for r in runs[name])

    def base(name):
        return median(r["rss_after_load_bytes"] for r in runs[name])

    results = {
        name: {
            "peak_rss_during_steps_bytes": peak(name),
            "rss_after_load_bytes": base(name),
            "peak_above_after_load_bytes": peak(name) - base(name),
            "ru_maxrss_lifetime_bytes": median(r["ru_maxrss_lifetime_bytes"] for r in runs[name]),
            "param_count": runs[name][0]["param_count"],
            "runs": runs[name],
        }
        for name in runs
    }
    ratios = {
        "mezo_over_inference_fp32": peak("mezo_fp32") / peak("inference_fp32"),
        "sparse_mezo_over_inference_fp32": peak("sparse_mezo_fp32") / peak("inference_fp32"),
        "qzo_gptq_over_inference_gptq": peak("qzo_gptq_int4") / peak("inference_gptq_int4"),
        "qzo_nf4_over_inference_nf4": peak("qzo_nf4_int4") / peak("inference_nf4_int4"),
        "adamw_over_mezo": peak("adamw_fp32") / peak("mezo_fp32"),
        "mezo_fp32_over_qzo_gptq_int4": peak("mezo_fp32") / peak("qzo_gptq_int4"),
        "mezo_fp32_over_qzo_nf4_int4": peak("mezo_fp32") / peak("qzo_nf4_int4"),
    }

    def above(name):
        return max(1.0, results[name]["peak_above_after_load_bytes"])

    ratios_above_load = {  # increments over each process's own RSS after model load (NOT absolute)
        "adamw_over_mezo": above("adamw_fp32") / above("mezo_fp32"),
        "mezo_over_inference_fp32": above("mezo_fp32") / above("inference_fp32"),
    }
    goals = {
        "mezo_over_inference_le_1.05": {"value": ratios["mezo_over_inference_fp32"], "goal": 1.05},
        "sparse_mezo_over_inference_le_1.05": {"value": ratios["sparse_mezo_over_inference_fp32"], "goal": 1.05},
        "qzo_gptq_over_inference_le_1.05": {"value": ratios["qzo_gptq_over_inference_gptq"], "goal": 1.05},
        "qzo_nf4_over_inference_le_1.05": {"value": ratios["qzo_nf4_over_inference_nf4"], "goal": 1.05},
        "adamw_over_mezo_ge_4": {"value": ratios["adamw_over_mezo"], "goal": 4.0},
        "mezo_fp32_over_qzo_gptq_ge_3": {"value": ratios["mezo_fp32_over_qzo_gptq_int4"], "goal": 3.0},
        "mezo_fp32_over_qzo_nf4_ge_3": {"value": ratios["mezo_fp32_over_qzo_nf4_int4"], "goal": 3.0},
    }
    for key, g in goals.items():
        g["met"] = g["value"] <= g["goal"] if "_le_" in key else g["value"] >= g["goal"]
    payload = {
        "suite": "memory",
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "environment": env,
        "setup": {
            "model": "tiny random Llama" if quick else "SmolLM2-135M-Instruct (fp32 / GPTQ int4 g64 / bnb NF4)",
            "batch_size": batch_size,
            "max_length": max_length,
            "steps_per_process": steps,
            "repeats": repeats,
            "method": "one fresh `python -m benchmarks.zo_bench memory-worker` process per configuration; RSS after "
            "model load (after gc + malloc_trim) and peak RSS sampled every 2 ms by a thread during the "
            "steps (psutil); ru_maxrss (lifetime peak, includes loading) also recorded. Ratios use "
            "ABSOLUTE peak RSS during the steps (nothing subtracted); `ratios_above_after_load` use "
            "increments over each process's RSS after load and are labelled as such.",
            "adamw": "one real backward + torch.optim.AdamW step per step (full fine-tuning, fp32, no checkpointing)",
        },
        "results": results,
        "ratios": ratios,
        "ratios_above_after_load": ratios_above_load,
        "goals": goals,
    }
    path = write_json(out / ("memory_quick.json" if quick else "memory.json"), payload)
    plot_memory(out / ("memory_quick.png" if quick else "memory.png"), results)
    shutil.rmtree(work, ignore_errors=True)
    log_line(f"memory -> {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return payload
