"""Growth suite: step time and peak RSS vs model size and batch size, with log-log slopes (``zo-bench growth``)."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

from .common import SCHEMA_VERSION, log_line, median, progress, timed, write_json
from .environment import environment
from .factories import GROWTH_CONFIGS, TINY_CONFIG, bench_tokenizer, random_model, rte_batch
from .memory import spawn_memory_worker
from .plots import plot_growth
from .steppers import ZOStepper, plain_forwards


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def _time_model(model, batch, repeats: int) -> dict[str, Any]:
    stepper = ZOStepper(model, "mezo")
    plain_forwards(model, batch)
    stepper.step(batch)
    floors, steps = [], []
    for _ in range(repeats):
        floors.append(timed(lambda: plain_forwards(model, batch)))
        steps.append(timed(lambda: stepper.step(batch)))
    return {
        "two_forwards_seconds": floors,
        "step_seconds": steps,
        "step_seconds_median": median(steps),
        "two_forwards_seconds_median": median(floors),
        "ratio": median(steps) / median(floors),
    }


def run_growth(
    out: Path,
    quick: bool,
    data_dir: str | None,
    sizes: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    size_batch: int | None = None,
    batch_model: str | None = None,
    repeats: int | None = None,
    memory: bool = True,
    max_length: int = 128,
) -> dict:
    env = environment()
    tok = bench_tokenizer()
    if quick:
        shapes = {"tiny": TINY_CONFIG, "tiny2x": dict(TINY_CONFIG, num_hidden_layers=4)}
        sizes = sizes or list(shapes)
        batch_sizes = batch_sizes or [1, 2]
        size_batch, batch_model, repeats, max_length = size_batch or 2, batch_model or "tiny", repeats or 1, 64
    else:
        shapes = GROWTH_CONFIGS
        sizes = sizes or list(shapes)
        batch_sizes = batch_sizes or [1, 2, 4, 8, 16]
        size_batch, batch_model, repeats = size_batch or 4, batch_model or "35M", repeats or 3
    by_size, by_batch = {}, {}
    # Batch axis first (small model), then sizes in increasing order; the JSON is rewritten after each row.
    jobs = [("batch", batch_model, b) for b in batch_sizes] + [("size", s, size_batch) for s in sizes]
    path = out / ("growth_quick.json" if quick else "growth.json")
    for axis, size, bs in progress(jobs, desc="growth"):
        batch = rte_batch(tok, bs, max_length, data_dir)
        model = random_model(shapes[size])
        n = sum(p.numel() for p in model.parameters())
        timing = _time_model(model, batch, repeats)
        del model
        gc.collect()
        row = {
            "model": size,
            "param_count": n,
            "batch_size": bs,
            "batch_tokens": int(batch["input_ids"].shape[1]),
            **timing,
        }
        if memory and not quick:
            for mode in ("inference", "mezo"):
                r = spawn_memory_worker(
                    {
                        "mode": mode,
                        "model": f"random:{size}",
                        "batch_size": bs,
                        "max_length": max_length,
                        "steps": 1,
                        "data_dir": data_dir,
                    }
                )
                row[f"{mode}_peak_rss_bytes"] = r["peak_rss_during_steps_bytes"]
                row[f"{mode}_rss_after_load_bytes"] = r["rss_after_load_bytes"]
        (by_size if axis == "size" else by_batch)[f"{size}_b{bs}"] = row
        payload = _growth_payload(
            env, quick, shapes, sizes, size_batch, batch_model, max_length, repeats, by_size, by_batch
        )
        write_json(path, payload)
    plot_growth(out / ("growth_quick.png" if quick else "growth.png"), payload)
    log_line(f"growth -> {path}: slopes {payload['loglog_slopes']}")
    return payload


def _growth_payload(env, quick, shapes, sizes, size_batch, batch_model, max_length, repeats, by_size, by_batch) -> dict:
    def slope(rows, xkey, ykey):
        rows = [r for r in rows if ykey in r]
        return loglog_slope([r[xkey] for r in rows], [r[ykey] for r in rows])

    fits = {
        "step_time_vs_params": slope(by_size.values(), "param_count", "step_seconds_median"),
        "two_forwards_time_vs_params": slope(by_size.values(), "param_count", "two_forwards_seconds_median"),
        "step_time_vs_batch": slope(by_batch.values(), "batch_size", "step_seconds_median"),
        "mezo_peak_rss_vs_params": slope(by_size.values(), "param_count", "mezo_peak_rss_bytes"),
        "mezo_peak_rss_vs_batch": slope(by_batch.values(), "batch_size", "mezo_peak_rss_bytes"),
    }
    payload = {
        "suite": "growth",
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "environment": env,
        "setup": {
            "shapes": {k: shapes[k] for k in sizes},
            "vocab_size": 49152,
            "tied_embeddings": True,
            "size_axis_batch": size_batch,
            "batch_axis_model": batch_model,
            "max_length": max_length,
            "repeats": repeats,
            "init": "random (AutoModelForCausalLM.from_config, seed 0), fp32",
            "step": "mezo step via ZOEngine (same calls as the trainer)",
            "memory": "peak RSS during 1 step in a fresh subprocess (absolute RSS)",
            "fit": "least-squares slope of log(y) vs log(x)",
        },
        "by_size": by_size,
        "by_batch": by_batch,
        "loglog_slopes": fits,
    }
    return payload
