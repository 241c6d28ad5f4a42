"""Speed suite: ZO step time / two plain forwards of the same model on the same batch (``zo-bench speed``), and the
same ratio through ``ZOTrainer.training_step`` itself on SmolLM2 in int4 (``zo-bench qzo-step-time``)."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zo_trainer.engine import ZOEngine

from .common import SCHEMA_VERSION, default_rte_dir, log_line, median, progress, timed, write_json
from .environment import environment
from .factories import bench_tokenizer, load_bench_model, rte_batch
from .plots import plot_bars
from .steppers import MeZOReferenceBaseline, ZOStepper, plain_forwards

# The z scheme whose Rademacher draw the *_rademacher_scheme rows time beside the default's: the last one that drew it
# from torch generator bits (the default's Gaussian z is this scheme's).
BEFORE_SCHEME = 5


def forwards_beside_idle_openmp_teams(model, batch, threads: int = 2) -> float:
    """Seconds of two plain forwards while ``threads`` idle Python threads exist that each once ran a parallel torch op
    (each keeps an OpenMP team): what every forward of a process paid while the ZO engine's noise threads lived on
    between steps (until f04e029; they now end with each update)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    values = torch.ones(1 << 22)
    pool = ThreadPoolExecutor(threads)
    try:
        list(pool.map(lambda _: torch.add(values, values), range(threads)))
        return timed(lambda: plain_forwards(model, batch))
    finally:
        pool.shutdown()


def run_speed(
    out: Path,
    quick: bool,
    data_dir: str | None,
    repeats: int | None = None,
    batch_size: int | None = None,
    max_length: int = 128,
    kinds: tuple[str, ...] = ("fp32", "gptq", "nf4"),
    plot: bool = True,
) -> dict:
    work = Path(tempfile.mkdtemp(prefix="zo_bench_"))
    repeats = repeats or (2 if quick else 4)
    batch_size = batch_size or (2 if quick else 16)
    env = environment()
    tok = bench_tokenizer()
    batch = rte_batch(tok, batch_size, max_length, data_dir)
    log_line(f"speed: batch {tuple(batch['input_ids'].shape)} (rows x tokens), {repeats} interleaved rounds + warm-up")

    models = {kind: load_bench_model(kind, quick, work) for kind in kinds}
    # config name -> (model kind, callable doing one step)
    configs: dict[str, tuple[str, Callable[[], Any]]] = {}
    if "fp32" in models:
        m = models["fp32"]
        configs["mezo"] = ("fp32", ZOStepper(m, "mezo").step)
        configs["sparse_mezo"] = ("fp32", ZOStepper(m, "sparse_mezo", zo_sparsity=0.8).step)
        # The same steps with Rademacher z (--zo_noise rademacher), in the same rounds: the before/after of one run.
        configs["mezo_rademacher"] = ("fp32", ZOStepper(m, "mezo", zo_noise="rademacher").step)
        configs["sparse_mezo_rademacher"] = (
            "fp32",
            ZOStepper(m, "sparse_mezo", zo_sparsity=0.8, zo_noise="rademacher").step,
        )
        # Rademacher z drawn as the previous z scheme did (torch generator bits turned into signs by torch ops; replay
        # of those runs): the before of the default scheme's Rademacher draw, in the same rounds.
        before = f"rademacher_scheme{BEFORE_SCHEME}"
        configs[f"mezo_{before}"] = (
            "fp32",
            ZOStepper(m, "mezo", zo_noise="rademacher", noise_scheme=BEFORE_SCHEME).step,
        )
        configs[f"sparse_mezo_{before}"] = (
            "fp32",
            ZOStepper(m, "sparse_mezo", zo_noise="rademacher", noise_scheme=BEFORE_SCHEME, zo_sparsity=0.8).step,
        )
        # Scheme 5's C passes on the engine's noise threads instead of torch's OpenMP team (the engine before
        # session 13), in the same rounds.
        configs["mezo_noise_threads"] = ("fp32", ZOStepper(m, "mezo", openmp_team=False).step)
        configs["sparse_mezo_noise_threads"] = (
            "fp32",
            ZOStepper(m, "sparse_mezo", openmp_team=False, zo_sparsity=0.8).step,
        )
        configs["mezo_reference_inplace"] = ("fp32", MeZOReferenceBaseline(m).step)
    if "gptq" in models:
        configs["qzo_gptq"] = ("gptq", ZOStepper(models["gptq"], "qzo").step)
    if "nf4" in models:
        configs["qzo_nf4"] = ("nf4", ZOStepper(models["nf4"], "qzo").step)

    # Each round times every model's floor (two plain forwards) and every configuration's step once, in a
    # shuffled order; round 0 is the warm-up (scratch buffers, kernels) and is discarded. The JSON is
    # rewritten after every round, so a run cut short still leaves its completed rounds.
    floors: dict[str, list[float]] = {k: [] for k in models}
    steps: dict[str, list[float]] = {k: [] for k in configs}
    per_round_ratio: dict[str, list[float]] = {k: [] for k in configs}
    # The ZOStepper configurations: each keeps the seconds inside its engine, one entry per step (round 0's first).
    steppers = {k: f.__self__ for k, (_, f) in configs.items() if isinstance(getattr(f, "__self__", None), ZOStepper)}
    teams_floors: list[float] = []  # fp32 floor beside idle OpenMP teams (what the engine's noise threads avoid)
    items = (
        [("floor", k) for k in models] + [("step", k) for k in configs] + [("teams", k) for k in models if k == "fp32"]
    )
    path = out / ("speed_quick.json" if quick else "speed.json")
    payload: dict[str, Any] = {}
    with progress(total=(repeats + 1) * len(items), desc="speed (round 0 = warm-up)") as bar:
        for r in range(repeats + 1):
            order = list(items)
            random.Random(r).shuffle(order)
            round_floor: dict[str, float] = {}
            round_step: dict[str, float] = {}
            for what, name in order:
                if what == "floor":
                    round_floor[name] = timed(lambda name=name: plain_forwards(models[name], batch))
                elif what == "teams":
                    round_teams = forwards_beside_idle_openmp_teams(models[name], batch)
                else:
                    round_step[name] = timed(lambda name=name: configs[name][1](batch))
                bar.update(1)
            if r == 0:
                continue
            for kind, t in round_floor.items():
                floors[kind].append(t)
            if "fp32" in round_floor:
                teams_floors.append(round_teams)
            for name, t in round_step.items():
                steps[name].append(t)
                per_round_ratio[name].append(t / round_floor[configs[name][0]])
            engine_times = {k: (st.engine_seconds[1:], st.module_seconds[1:]) for k, st in steppers.items()}
            payload = _speed_payload(
                env, quick, batch, batch_size, max_length, repeats, models, configs, floors, steps, per_round_ratio
            )
            _add_engine_times(payload["results"], engine_times)
            _add_same_round_ratios(payload)
            if teams_floors:
                payload["two_forwards_beside_idle_openmp_teams"] = {
                    "model": "fp32",
                    "what": "two plain forwards while two idle Python threads exist that each once ran a parallel "
                    "torch op (each keeps an OpenMP team); the ZO engine's noise threads end with each update so "
                    "that no such team outlives a step",
                    "seconds_median": median(teams_floors),
                    "seconds_all": list(teams_floors),
                    "over_plain_two_forwards": median(teams_floors) / median(floors["fp32"]),
                }
            write_json(path, payload)
    results = payload["results"]
    if plot:
        plot_bars(
            out / ("speed_quick.png" if quick else "speed.png"),
            {k: v["ratio_step_over_two_forwards"] for k, v in results.items()},
            "ZO step time / two plain forwards (same model, same batch)",
            goal=1.15,
        )
    shutil.rmtree(work, ignore_errors=True)
    log_line(
        f"speed -> {path}: " + ", ".join(f"{k} {v['ratio_step_over_two_forwards']:.3f}" for k, v in results.items())
    )
    return payload


def _add_engine_times(results: dict[str, dict], engine_times: dict[str, tuple[list[float], list[float]]]) -> None:
    """Each ZOStepper row's seconds inside the engine (forward hooks and update, less the module work the hooks do in
    a module's place, kept as ``engine_module_seconds_all``) per timed step (round 0, the warm-up, left out as for the
    steps), and their median over the median two forwards: the share of the floor the step's own work adds, whatever
    the host's drift."""
    for name, (times, module_times) in engine_times.items():
        row = results[name]
        row["engine_seconds_all"] = list(times)
        row["engine_module_seconds_all"] = list(module_times)
        row["engine_seconds_median"] = median(times)
        row["engine_over_two_forwards"] = median(times) / row["two_forwards_seconds_median"]


def _add_same_round_ratios(payload: dict) -> None:
    """Ratios of rows timed in the same rounds: the reference / ours, Rademacher / Gaussian, the previous scheme's
    Rademacher / the default's (step and engine seconds), noise threads / torch's team."""
    results = payload["results"]
    if "mezo_reference_inplace" in results and "mezo" in results:
        payload["reference_over_ours_mezo"] = (
            results["mezo_reference_inplace"]["step_seconds_median"] / results["mezo"]["step_seconds_median"]
        )
    for name in ("mezo", "sparse_mezo"):  # Step time with Rademacher z / with Gaussian z, same rounds.
        if f"{name}_rademacher" in results and name in results:
            payload[f"rademacher_over_gaussian_{name}"] = (
                results[f"{name}_rademacher"]["step_seconds_median"] / results[name]["step_seconds_median"]
            )
    for name in ("mezo", "sparse_mezo"):  # Rademacher step with the previous scheme's z / the default's, same rounds.
        before, after = f"{name}_rademacher_scheme{BEFORE_SCHEME}", f"{name}_rademacher"
        if before in results and after in results:
            payload[f"rademacher_scheme{BEFORE_SCHEME}_over_scheme{ZOEngine.NOISE_SCHEME}_{name}"] = (
                results[before]["step_seconds_median"] / results[after]["step_seconds_median"]
            )
            if results[after].get("engine_seconds_median"):
                payload[f"rademacher_scheme{BEFORE_SCHEME}_over_scheme{ZOEngine.NOISE_SCHEME}_engine_{name}"] = (
                    results[before]["engine_seconds_median"] / results[after]["engine_seconds_median"]
                )
    for name in ("mezo", "sparse_mezo"):  # Step time with the C passes on noise threads / on torch's team.
        if f"{name}_noise_threads" in results and name in results:
            payload[f"noise_threads_over_openmp_team_{name}"] = (
                results[f"{name}_noise_threads"]["step_seconds_median"] / results[name]["step_seconds_median"]
            )


def _speed_payload(
    env, quick, batch, batch_size, max_length, repeats, models, configs, floors, steps, per_round_ratio
) -> dict:
    results = {}
    for name, (kind, _) in configs.items():
        floor = median(floors[kind])
        step = median(steps[name])
        results[name] = {
            "model": kind,
            "ratio_step_over_two_forwards": step / floor,
            "ratio_median_of_rounds": median(per_round_ratio[name]),
            "step_seconds_median": step,
            "two_forwards_seconds_median": floor,
            "step_seconds_all": steps[name],
            "two_forwards_seconds_all": floors[kind],
            "per_round_ratios": per_round_ratio[name],
        }
    goals = {}
    for name in ("mezo", "sparse_mezo", "qzo_gptq", "qzo_nf4"):
        if name in results:
            goals[f"{name}_ratio_le_1.15"] = {
                "value": results[name]["ratio_step_over_two_forwards"],
                "goal": 1.15,
                "met": results[name]["ratio_step_over_two_forwards"] <= 1.15,
            }
    payload = {
        "suite": "speed",
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "environment": env,
        "setup": {
            "model": "tiny random Llama" if quick else "SmolLM2-135M-Instruct (fp32 / GPTQ int4 g64 / bnb NF4)",
            "batch_rows": int(batch["input_ids"].shape[0]),
            "batch_tokens": int(batch["input_ids"].shape[1]),
            "batch_size": batch_size,
            "max_length": max_length,
            "repeats": repeats,
            "rounds_completed": len(next(iter(floors.values()))),
            "floor": "two plain no-grad forward passes (candidate_loss) of the same model on the same batch",
            "step": "ZOEngine perturbed(+eps) forward, perturbed(-eps) forward, ZOOptimizer.accumulate + step "
            "(the calls ZOTrainer.training_step and HF's loop make)",
            "reference": "MeZO's zo_step/zo_update: 4 passes over weights, torch.manual_seed + torch.normal per parameter",
            "noise": f"z ~ N(0, 1) (the default; z scheme {ZOEngine.NOISE_SCHEME}: 8-bit picks of 256 quantiles from a "
            "counter-based stream) except in the *_rademacher rows: z entries +-1 (--zo_noise rademacher; the same "
            f"stream's signs), and the *_rademacher_scheme{BEFORE_SCHEME} rows: +-1 as z scheme {BEFORE_SCHEME} drew "
            "it (torch generator bits and torch ops, how runs before the default drew Rademacher z); "
            "*_noise_threads rows: the C passes on the engine's noise threads, not torch's OpenMP team (the engine "
            "before session 13)",
            "statistic": "median step time / median floor time over the timed rounds; each round runs every floor and "
            "step once in a shuffled order; round 0 (warm-up) discarded",
            "engine": "engine_*: seconds inside the ZO engine's forward hooks and update during each timed step "
            "(perturbed copies, z, the update), and their median over the median floor",
            "param_counts": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        },
        "results": results,
        "goals": goals,
    }
    return payload


# ----------------------------------------------------------------------------------------------------------------------
# qzo through ZOTrainer.training_step (formerly benchmarks/qzo_step_time.py): CPU time as well as wall time
# ----------------------------------------------------------------------------------------------------------------------
def trainer_step_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-bench qzo-step-time",
        description=(
            "QZO step time vs two plain forward passes of the same int4 model (SmolLM2-135M, RTE, CPU). A step is "
            "ZOTrainer.training_step (forwards at +eps z and -eps z on the scales, under the engine's hooks) plus "
            "ZOOptimizer.step(); the reference is candidate_loss twice on the same batch, same model, no hooks. Both "
            "are timed interleaved (order reversed every other round) after one warm-up of each; process CPU time is "
            "reported beside wall time."
        ),
    )
    p.add_argument(
        "--gptq_dir",
        default=None,
        help="a GPTQ group-64 checkpoint of SmolLM2 (default: the speed suite's, made with zo-quantize on first use)",
    )
    p.add_argument("--data_dir", default=default_rte_dir())
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed rounds after the warm-up")
    p.add_argument("--backends", default="gptq,nf4")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="folder for <name>.json (default: print only)")
    p.add_argument("--name", default="qzo_step_time", help="the JSON file's name in --out")
    return p


def main_trainer_step(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """``zo-bench qzo-step-time``: prints one JSON line per back-end, then a summary; with --out, also a JSON file
    (machine, versions, load) rewritten after each back-end."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    a = (parser or trainer_step_parser()).parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    from zo_trainer import ZOTrainer, ZOTrainingArguments
    from zo_trainer.data import CandidateCollator, candidate_loss, load_task_splits, prepare_dataset
    from zo_trainer.models import ensure_default_model, ensure_pad_token
    from zo_trainer.quant import load_quantized
    from zo_trainer.tasks import get_task

    from .factories import gptq_dir

    base = str(ensure_default_model())
    backends = a.backends.split(",")
    gptq = a.gptq_dir
    if gptq is None and "gptq" in backends:
        gptq = str(gptq_dir(False, Path(tempfile.gettempdir()), Path(base)))
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(base))
    tokenizer.padding_side = "left"
    task = get_task("rte")
    splits = load_task_splits(task, a.data_dir, num_train=a.batch, num_dev=4, num_eval=4, data_seed=0)
    train = prepare_dataset(tokenizer, task, splits["train"], a.max_length)
    batch = CandidateCollator(tokenizer)([train[i] for i in range(a.batch)])
    print(
        f"batch {tuple(batch['input_ids'].shape)} (rows x tokens), torch threads {torch.get_num_threads()}", flush=True
    )

    results: dict[str, Any] = {}
    payload: dict[str, Any] = {
        "suite": "qzo-step-time",
        "schema_version": SCHEMA_VERSION,
        "environment": environment(),
        "setup": {
            "step": "ZOTrainer.training_step (qzo: forwards at +eps z and -eps z on the scales) + ZOOptimizer.step()",
            "reference": "candidate_loss twice on the same batch and model, no_grad, no hooks",
            "batch_rows_tokens": list(batch["input_ids"].shape),
            "gptq_dir": gptq,
            "rounds": a.steps,
            "statistic": "one warm-up of each, then rounds of one step and one reference, order reversed every other "
            "round; ratio_median = median step / median reference; ratio_cpu = mean process CPU seconds over mean",
            "torch_num_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
        },
        "results": results,
    }
    for kind in backends:
        model = load_quantized(gptq if kind == "gptq" else base, kind)
        args = ZOTrainingArguments(
            output_dir=tempfile.gettempdir(), optim="qzo", learning_rate=1e-6, report_to="none", disable_tqdm=True
        )
        trainer = ZOTrainer(
            model=model, args=args, processing_class=tokenizer, data_collator=CandidateCollator(tokenizer)
        )
        optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by HF's train loop otherwise
        inputs = trainer._prepare_inputs(dict(batch))

        def qzo_step(trainer=trainer, model=model, inputs=inputs, optimizer=optimizer):
            trainer.training_step(model, inputs)
            optimizer.step()
            trainer.state.global_step += 1

        def two_forwards(model=model, inputs=inputs):
            model.eval()
            with torch.no_grad():
                candidate_loss(model, inputs)
                candidate_loss(model, inputs)

        times: dict[str, list[float]] = {"qzo_step": [], "two_forwards": []}
        cpu: dict[str, list[float]] = {"qzo_step": [], "two_forwards": []}  # process CPU s: robust to other load
        qzo_step(), two_forwards()  # warm-up
        order = [("qzo_step", qzo_step), ("two_forwards", two_forwards)]
        for round_index in range(a.steps):
            for name, fn in order if round_index % 2 == 0 else order[::-1]:  # neither always runs first
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        q, f = statistics.mean(times["qzo_step"]), statistics.mean(times["two_forwards"])
        qm, fm = median(times["qzo_step"]), median(times["two_forwards"])
        qc, fc = statistics.mean(cpu["qzo_step"]), statistics.mean(cpu["two_forwards"])
        per_round = [s / r for s, r in zip(times["qzo_step"], times["two_forwards"])]
        results[kind] = {
            "qzo_step_mean_s": q, "two_forwards_mean_s": f, "ratio_mean": q / f,
            "qzo_step_median_s": qm, "two_forwards_median_s": fm, "ratio_median": qm / fm,
            "median_of_round_ratios": median(per_round),
            "qzo_step_cpu_mean_s": qc, "two_forwards_cpu_mean_s": fc, "ratio_cpu": qc / fc,
            "raw_wall": times, "raw_cpu": cpu, "threads": torch.get_num_threads(), "loadavg_after": os.getloadavg(),
        }  # fmt: skip
        print(kind, json.dumps(results[kind]), flush=True)
        if a.out is not None:
            write_json(a.out / f"{a.name}.json", payload)
        trainer.zo_engine.remove()
        del trainer, model, optimizer
    summary = {k: {kk: v for kk, v in r.items() if not kk.startswith("raw")} for k, r in results.items()}
    print(json.dumps(summary, indent=1))
    if a.out is not None:
        log_line(f"qzo-step-time -> {a.out / f'{a.name}.json'}")
    return 0
