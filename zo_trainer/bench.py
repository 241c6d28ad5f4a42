"""``zo-bench``: benchmarks of the ZO engine (speed, memory, accuracy, growth), written as JSON + PNG.

    zo-bench speed    [--quick] [--out benchmarks/results]   # ZO step time / two plain forwards
    zo-bench memory   [--quick] ...                          # peak RSS, one fresh subprocess per config
    zo-bench accuracy [--quick] ...                          # RTE accuracy vs steps (zo-train subprocesses)
    zo-bench growth   [--quick] ...                          # step time and peak RSS vs model size / batch
    zo-bench all      [--quick] ...
    zo-bench study    [--quick] [--runs a,b] [--list] [--report]  # the RTE accuracy study (zo_trainer/study.py)
    python -m zo_trainer.bench memory-worker --config '{...}'   # internal: one memory measurement

Every figure is a ratio of two quantities measured in the same run (the CPU is shared, so absolute
times are noisy); measurements are interleaved and repeated and the median is reported. ``--quick``
runs everything on a tiny random model (CI-sized). Every JSON carries the machine, the library versions
and the git commit (``environment()``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch

RTE_DIR_DEFAULT = "/work/shared/data/superglue/rte"
SCHEMA_VERSION = 1

# SmolLM2-family Llama shapes (vocab 49152, tied embeddings). 135M and 360M are the real SmolLM2 shapes.
GROWTH_CONFIGS: dict[str, dict[str, int]] = {
    "10M": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384),
    "35M": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024),
    "135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560),
}
TINY_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


# =====================================================================================================
# environment
# =====================================================================================================
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=20, check=True
        ).stdout
        out["dirty"] = bool(status.strip())
        out["dirty_files"] = [line[3:] for line in status.splitlines()][:50]
    except Exception as exc:  # not a checkout, or no git
        out["error"] = str(exc)
    return out


def environment() -> dict[str, Any]:
    try:
        import psutil

        mem_total = psutil.virtual_memory().total
        load = os.getloadavg()
    except Exception:
        mem_total, load = None, None
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "machine": {
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(),
            "memory_total_bytes": mem_total,
            "gpu": gpu,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": load,
        },
        "versions": {name: _version(name) for name in ("torch", "transformers", "bitsandbytes", "gptqmodel", "zo_trainer")},
        "git": _git(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(obj):
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def _progress(iterable=None, total=None, desc=None, disable=False):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr)


def _log(msg: str) -> None:
    print(f"[zo-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =====================================================================================================
# models and batches
# =====================================================================================================
def _tokenizer():
    from transformers import AutoTokenizer

    from .models import ensure_default_model, ensure_pad_token

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    ensure_pad_token(tok)
    tok.padding_side = "left"
    return tok


def llama_config(shape: dict[str, int], vocab_size: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **shape,
    )


def random_model(shape: dict[str, int], seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.float32)
    model.eval()
    return model


def tiny_model_dir(root: Path) -> Path:
    """A tiny random SmolLM2-shaped Llama (with the real tokenizer) saved to ``root``: for --quick runs."""
    path = root / "tiny-llama"
    if (path / "config.json").exists():
        return path
    model = random_model(TINY_CONFIG)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def rte_batch(tokenizer, batch_size: int, max_length: int, data_dir: str | None, seed: int = 0):
    """A collated batch of real RTE train prompts (candidate scoring), as the trainer sees it."""
    from .data import CandidateCollator, tokenize_example
    from .tasks import get_task

    task = get_task("rte")
    data_dir = data_dir or RTE_DIR_DEFAULT
    lines = Path(data_dir, "train.jsonl").read_text().splitlines()
    rng = random.Random(seed)
    rows = [json.loads(lines[i]) for i in rng.sample(range(len(lines)), batch_size)]
    features = [tokenize_example(tokenizer, task, row, max_length) for row in rows]
    for f in features:
        f["labels"] = f.pop("label")
    return CandidateCollator(tokenizer)(features)


def load_bench_model(kind: str, quick: bool, work: Path):
    """kind: fp32 | nf4 | gptq -> model (eval mode). quick: a tiny random model (GPTQ quantized on the fly)."""
    from .models import ensure_default_model
    from .quant import load_quantized

    src = tiny_model_dir(work) if quick else ensure_default_model()
    if kind == "fp32":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        model.eval()
        return model
    if kind == "nf4":
        return load_quantized(str(src), "nf4")
    if kind == "gptq":
        return load_quantized(str(gptq_dir(quick, work, src)), "gptq")
    raise ValueError(kind)


def gptq_dir(quick: bool, work: Path, src: Path) -> Path:
    """A GPTQ int4 (group 64) checkpoint of ``src``, made once with zo-quantize and cached."""
    cache = Path(os.environ.get("ZO_BENCH_CACHE", Path.home() / ".cache" / "zo_trainer_bench"))
    out = cache / ("tiny-gptq4-g64" if quick else "smol-gptq4-g64")
    if (out / "quantize_config.json").exists():
        return out
    from .cli.quantize import quantize

    lines = Path(RTE_DIR_DEFAULT, "train.jsonl").read_text().splitlines()
    texts = [json.loads(line)["premise"] for line in lines[: (8 if quick else 32)]]
    _log(f"quantizing {src} to GPTQ int4 (group 64) -> {out}")
    quantize(str(src), str(out), texts, bits=4, group_size=64, max_length=128)
    return out


def _zo_args(optim: str, **overrides):
    from .training_args import ZOTrainingArguments

    kwargs = dict(output_dir=tempfile.gettempdir(), optim=optim, learning_rate=1e-6, zo_eps=1e-3, report_to="none", use_cpu=True)
    kwargs.update(overrides)
    return ZOTrainingArguments(**kwargs)


class ZOStepper:
    """The exact calls ZOTrainer.training_step + ZOOptimizer.step make, on one batch (no Trainer loop)."""

    def __init__(self, model, optim: str, **args_overrides):
        from .engine import ZOEngine
        from .methods import get_method
        from .optim import ZOOptimizer

        self.args = _zo_args(optim, **args_overrides)
        self.model = model
        self.method = get_method(optim)(self.args)
        for p in model.parameters():  # as loaded by from_pretrained (another stepper may have frozen them)
            p.requires_grad_(p.is_floating_point())
        targets = self.method.targets(model)
        for p in model.parameters():  # as ZOTrainer does: nothing asks autograd for gradients
            p.requires_grad_(False)
        self.engine = ZOEngine(targets)
        if self.method.sparsity > 0:
            self.engine.set_thresholds(self.method.sparsity, select=self.method.is_sparsified)
        self.optimizer = ZOOptimizer(self.engine, self.method, lr=self.args.learning_rate, num_perturbations=1, max_skipped_steps=10)
        self.step_index = 0
        self.engine.remove()  # hooks only while this stepper runs (so other measurements see a plain model)

    @torch.no_grad()
    def step(self, batch) -> float:
        from .data import candidate_loss
        from .engine import perturbation_seed, projected_gradient

        self.engine.install()
        try:
            eps = self.args.zo_eps
            seed = perturbation_seed(self.args.seed, self.step_index, 0)
            with self.engine.perturbed(seed, +eps):
                loss_plus, _ = candidate_loss(self.model, batch)
            with self.engine.perturbed(seed, -eps):
                loss_minus, _ = candidate_loss(self.model, batch)
            self.optimizer.accumulate(0, seed, projected_gradient(loss_plus, loss_minus, eps))
            self.optimizer.step()
            self.step_index += 1
            return float(loss_plus + loss_minus) / 2
        finally:
            self.engine.remove()


class ReferenceMeZO:
    """MeZO's reference implementation (Malladi et al. 2023, ``trainer.py``: ``zo_step`` + ``zo_update``).

    Four passes over the weights per step, each regenerating z with ``torch.manual_seed(seed)`` and one
    ``torch.normal`` per parameter: w += eps z; forward; w -= 2 eps z; forward; w += eps z; w -= lr (g z + wd w).
    As in MeZO's code, ``param.data = param.data + ...`` allocates a new tensor per parameter and pass.
    """

    def __init__(self, model, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0):
        self.model, self.lr, self.eps, self.weight_decay = model, lr, eps, weight_decay
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or True]
        for _, p in self.params:
            p.requires_grad_(False)
        self.rng = random.Random(0)

    def _perturb(self, seed: int, scaling: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling * z * self.eps

    @torch.no_grad()
    def step(self, batch) -> float:
        from .data import candidate_loss

        seed = self.rng.randint(0, 1_000_000_000)
        self._perturb(seed, 1)
        loss1, _ = candidate_loss(self.model, batch)
        self._perturb(seed, -2)
        loss2, _ = candidate_loss(self.model, batch)
        self._perturb(seed, 1)
        projected_grad = float((loss1 - loss2) / (2 * self.eps))
        torch.manual_seed(seed)
        for name, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "norm" not in name:
                param.data = param.data - self.lr * (projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)
        return float(loss1 + loss2) / 2


@torch.no_grad()
def plain_forwards(model, batch, n: int = 2) -> float:
    from .data import candidate_loss

    total = 0.0
    for _ in range(n):
        loss, _ = candidate_loss(model, batch)
        total += float(loss)
    return total


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


# =====================================================================================================
# suite 1: speed
# =====================================================================================================
def run_speed(out: Path, quick: bool, data_dir: str | None, repeats: int | None = None, batch_size: int | None = None,
              max_length: int = 128, kinds: tuple[str, ...] = ("fp32", "gptq", "nf4"), plot: bool = True) -> dict:
    work = Path(tempfile.mkdtemp(prefix="zo_bench_"))
    repeats = repeats or (2 if quick else 4)
    batch_size = batch_size or (2 if quick else 16)
    env = environment()
    tok = _tokenizer()
    batch = rte_batch(tok, batch_size, max_length, data_dir)
    _log(f"speed: batch {tuple(batch['input_ids'].shape)} (rows x tokens), {repeats} interleaved rounds + warm-up")

    models = {kind: load_bench_model(kind, quick, work) for kind in kinds}
    # config name -> (model kind, callable doing one step)
    configs: dict[str, tuple[str, Callable[[], Any]]] = {}
    if "fp32" in models:
        m = models["fp32"]
        configs["mezo"] = ("fp32", ZOStepper(m, "mezo").step)
        configs["sparse_mezo"] = ("fp32", ZOStepper(m, "sparse_mezo", zo_sparsity=0.8).step)
        configs["mezo_reference_inplace"] = ("fp32", ReferenceMeZO(m).step)
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
    items = [("floor", k) for k in models] + [("step", k) for k in configs]
    path = out / ("speed_quick.json" if quick else "speed.json")
    payload: dict[str, Any] = {}
    with _progress(total=(repeats + 1) * len(items), desc="speed (round 0 = warm-up)") as bar:
        for r in range(repeats + 1):
            order = list(items)
            random.Random(r).shuffle(order)
            round_floor: dict[str, float] = {}
            round_step: dict[str, float] = {}
            for what, name in order:
                if what == "floor":
                    round_floor[name] = _timed(lambda: plain_forwards(models[name], batch))
                else:
                    round_step[name] = _timed(lambda: configs[name][1](batch))
                bar.update(1)
            if r == 0:
                continue
            for kind, t in round_floor.items():
                floors[kind].append(t)
            for name, t in round_step.items():
                steps[name].append(t)
                per_round_ratio[name].append(t / round_floor[configs[name][0]])
            payload = _speed_payload(env, quick, batch, batch_size, max_length, repeats, models, configs, floors,
                                     steps, per_round_ratio)
            write_json(path, payload)
    results = payload["results"]
    if plot:
        _plot_bars(out / ("speed_quick.png" if quick else "speed.png"),
                   {k: v["ratio_step_over_two_forwards"] for k, v in results.items()},
                   "ZO step time / two plain forwards (same model, same batch)", goal=1.15)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"speed -> {path}: " + ", ".join(f"{k} {v['ratio_step_over_two_forwards']:.3f}" for k, v in results.items()))
    return payload


def _speed_payload(env, quick, batch, batch_size, max_length, repeats, models, configs, floors, steps,
                   per_round_ratio) -> dict:
    results = {}
    for name, (kind, _) in configs.items():
        floor = _median(floors[kind])
        step = _median(steps[name])
        results[name] = {
            "model": kind,
            "ratio_step_over_two_forwards": step / floor,
            "ratio_median_of_rounds": _median(per_round_ratio[name]),
            "step_seconds_median": step,
            "two_forwards_seconds_median": floor,
            "step_seconds_all": steps[name],
            "two_forwards_seconds_all": floors[kind],
            "per_round_ratios": per_round_ratio[name],
        }
    goals = {}
    for name in ("mezo", "sparse_mezo", "qzo_gptq", "qzo_nf4"):
        if name in results:
            goals[f"{name}_ratio_le_1.15"] = {"value": results[name]["ratio_step_over_two_forwards"], "goal": 1.15,
                                              "met": results[name]["ratio_step_over_two_forwards"] <= 1.15}
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
            "statistic": "median step time / median floor time over the timed rounds; each round runs every floor and "
                         "step once in a shuffled order; round 0 (warm-up) discarded",
            "param_counts": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        },
        "results": results,
        "goals": goals,
    }
    if "mezo_reference_inplace" in results and "mezo" in results:
        payload["reference_over_ours_mezo"] = (
            results["mezo_reference_inplace"]["step_seconds_median"] / results["mezo"]["step_seconds_median"]
        )
    return payload


def _plot_bars(path: Path, values: dict[str, float], title: str, goal: float | None = None, ylabel: str = "ratio") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="tab:blue")
    for b, n in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{values[n]:.2f}", ha="center", va="bottom", fontsize=9)
    if goal is not None:
        ax.axhline(goal, color="tab:red", ls="--", lw=1, label=f"goal {goal}")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =====================================================================================================
# suite 2: memory (one fresh subprocess per configuration)
# =====================================================================================================
class _PeakSampler:
    """Samples this process's RSS every ``interval`` s in a thread; ``peak`` since the last ``reset``."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.rss()
            if rss > self.peak:
                self.peak = rss
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self.rss()

    def __enter__(self):
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _malloc_trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


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
    tok = _tokenizer()
    batch = rte_batch(tok, int(config["batch_size"]), int(config.get("max_length", 128)), config.get("data_dir"))
    if kind.startswith("random:"):
        shape = GROWTH_CONFIGS[kind.split(":", 1)[1]]
        model = random_model(shape)
    else:
        model = load_bench_model(kind, quick, work)
    n_params = sum(p.numel() for p in model.parameters())
    _malloc_trim()
    import psutil

    rss_after_load = psutil.Process().memory_info().rss

    from .data import candidate_loss

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
    with _PeakSampler() as sampler:
        for _ in range(steps):
            times.append(_timed(run_step))
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


def _spawn_memory_worker(config: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "zo_trainer.bench", "memory-worker", "--config", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed ({config}):\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ZO_BENCH_RESULT "):
            return json.loads(line[len("ZO_BENCH_RESULT "):])
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


def run_memory(out: Path, quick: bool, data_dir: str | None, batch_size: int | None = None, max_length: int = 128,
               steps: int | None = None, repeats: int = 1) -> dict:
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="zo_bench_"))
    batch_size = batch_size or (2 if quick else 16)
    steps = steps or 2
    runs: dict[str, list[dict]] = {name: [] for name, _ in MEMORY_CONFIGS}
    jobs = [(name, cfg) for _ in range(repeats) for name, cfg in MEMORY_CONFIGS]
    for name, cfg in _progress(jobs, desc="memory"):
        config = dict(cfg, batch_size=batch_size, max_length=max_length, steps=steps, quick=quick,
                      data_dir=data_dir, work=str(work))
        if quick:  # CI-sized: in this process (not fresh; figures meaningless), the subprocess path is tested apart
            result = memory_worker(config)
            result["fresh_process"] = False
        else:
            result = _spawn_memory_worker(config)
            result["fresh_process"] = True
        runs[name].append(result)

    def peak(name):
        return _median(r["peak_rss_during_steps_bytes"] for r in runs[name])

    def base(name):
        return _median(r["rss_after_load_bytes"] for r in runs[name])

    results = {
        name: {
            "peak_rss_during_steps_bytes": peak(name),
            "rss_after_load_bytes": base(name),
            "peak_above_after_load_bytes": peak(name) - base(name),
            "ru_maxrss_lifetime_bytes": _median(r["ru_maxrss_lifetime_bytes"] for r in runs[name]),
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
            "method": "one fresh `python -m zo_trainer.bench memory-worker` process per configuration; RSS after "
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
    _plot_memory(out / ("memory_quick.png" if quick else "memory.png"), results)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"memory -> {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return payload


def _plot_memory(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    base = [results[n]["rss_after_load_bytes"] / 2**20 for n in names]
    peak = [results[n]["peak_rss_during_steps_bytes"] / 2**20 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="RSS after load")
    ax.bar([i + 0.2 for i in x], peak, width=0.4, label="peak RSS during steps")
    for i, v in zip(x, peak):
        ax.text(i + 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=25, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Process RSS (one fresh process per configuration)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =====================================================================================================
# suite 3: accuracy (zo-train subprocesses; curves from the trainer's log history)
# =====================================================================================================
def _parse_log_lines(text: str) -> list[dict[str, float]]:
    """Dict lines printed by HF's PrinterCallback (values may be strings) -> floats."""
    history = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            d = ast.literal_eval(line)
        except Exception:
            continue
        if not isinstance(d, dict):
            continue
        row = {}
        for k, v in d.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                pass
        history.append(row)
    return history


def _train_argv(run: dict[str, Any], common: dict[str, Any], output_dir: Path) -> list[str]:
    args = dict(common)
    args.update(run.get("args", {}))
    argv = []
    for k, v in args.items():
        if isinstance(v, bool):
            argv += [f"--{k}", "true" if v else "false"]
        elif v is not None:
            argv += [f"--{k}", str(v)]
    return argv + ["--output_dir", str(output_dir)]


def _run_train(name: str, argv: list[str], log_path: Path, in_process: bool, timeout: float | None) -> dict[str, Any]:
    """Run zo-train; returns log_history (trainer_state.json, else parsed from the log) and final metrics."""
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    t0 = time.time()
    status = "ok"
    if in_process:
        from .cli.train import run as train_run

        metrics = train_run(argv)
        log_text = ""
    else:
        cmd = [sys.executable, "-m", "zo_trainer.train", *argv]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
                status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"stopped at the time limit ({timeout:.0f} s)"
        log_text = log_path.read_text(errors="replace")
        metrics = {}
    history = []
    state = output_dir / "trainer_state.json"
    if state.exists():
        history = json.loads(state.read_text()).get("log_history", [])
    elif log_text:
        history = _parse_log_lines(log_text)
        # Printed lines carry the epoch, not the step: step = epoch * optimizer steps per epoch.
        try:
            n_train = int(argv[argv.index("--num_train") + 1])
            bs = int(argv[argv.index("--per_device_train_batch_size") + 1])
            per_epoch = math.ceil(n_train / bs)
            for row in history:
                if "epoch" in row and "step" not in row:
                    row["step"] = int(round(row["epoch"] * per_epoch))
        except (ValueError, IndexError):
            pass
    for fname in ("test_results.json", "zero_shot_results.json", "train_results.json"):
        f = output_dir / fname
        if f.exists():
            metrics.update(json.loads(f.read_text()))
    if not metrics and log_text:  # killed: take what was printed
        for row in _parse_log_lines(log_text):
            metrics.update({k: v for k, v in row.items() if k.startswith(("test_", "zero_shot_"))})
    return {"name": name, "argv": argv, "status": status, "wall_seconds": time.time() - t0,
            "log_history": history, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def _curve(history: list[dict], key: str = "eval_accuracy") -> list[tuple[int, float]]:
    return [(int(row.get("step", 0)), float(row[key])) for row in history if key in row]


def accuracy_plan(quick: bool, data_dir: str, model_dir: str | None) -> dict[str, Any]:
    if quick:
        common = dict(task="rte", data_dir=data_dir, num_train=8, num_dev=4, num_eval=4, max_length=64,
                      per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=2,
                      eval_strategy="steps", eval_steps=1, logging_steps=1, save_strategy="no",
                      report_to="none", seed=0, data_seed=0, lr_scheduler_type="constant", disable_tqdm=True,
                      model_name_or_path=model_dir, eval_on_start=True)
        sweep_lrs, sweep_eps, sweep_steps = [1e-5], [1e-3], 1
        main_steps, eval_steps, min_eval_steps = 2, 1, 1
        lrs = {"mezo": None, "sparse_mezo": 1e-5, "qzo": 1e-5}
    else:
        common = dict(task="rte", data_dir=data_dir, num_train=500, num_dev=64, num_eval=277, max_length=128,
                      per_device_train_batch_size=8, per_device_eval_batch_size=16, lr_scheduler_type="constant",
                      logging_steps=5, save_strategy="no", report_to="none", seed=0, data_seed=0,
                      disable_tqdm=True, model_name_or_path=model_dir)
        sweep_lrs, sweep_eps, sweep_steps = [1e-6, 1e-5, 1e-4], [1e-3], 15
        main_steps, eval_steps, min_eval_steps = 200, 50, 10
        lrs = {"mezo": None, "sparse_mezo": None, "qzo": None}
    return dict(common=common, sweep_lrs=sweep_lrs, sweep_eps=sweep_eps, sweep_steps=sweep_steps,
                main_steps=main_steps, eval_steps=eval_steps, min_eval_steps=min_eval_steps, lrs=lrs)


def run_accuracy(out: Path, quick: bool, data_dir: str | None, log_dir: Path | None = None,
                 budget_minutes: float | None = None, plan_overrides: dict | None = None) -> dict:
    env = environment()
    data_dir = data_dir or RTE_DIR_DEFAULT
    work = Path(tempfile.mkdtemp(prefix="zo_bench_acc_"))
    model_dir = str(tiny_model_dir(work)) if quick else None
    plan = accuracy_plan(quick, data_dir, model_dir)
    overrides = dict(plan_overrides or {})
    plan["common"].update(overrides.pop("common", {}))
    plan.update(overrides)
    common = {k: v for k, v in plan["common"].items() if v is not None}
    log_dir = log_dir or (out.parent / "logs")
    deadline = time.time() + budget_minutes * 60 if budget_minutes else None
    suffix = ("_quick" if quick else "") + (f"_{plan['tag']}" if plan.get("tag") else "")
    result_path = out / f"accuracy{suffix}.json"

    payload: dict[str, Any] = {
        "suite": "accuracy", "schema_version": SCHEMA_VERSION, "quick": quick, "environment": env,
        "setup": {"common_args": common, "plan": {k: v for k, v in plan.items() if k != "common"},
                  "protocol": "MeZO's: num_train train examples and num_dev dev examples sampled from RTE train "
                              "(data_seed 0); test = RTE validation (num_eval). Sweep judged on final dev loss "
                              "(then dev accuracy). One seed (seed 0).",
                  "budget_minutes": budget_minutes},
        "sweep": [], "runs": {}, "zero_shot": {},
    }

    def remaining():
        return None if deadline is None else max(60.0, deadline - time.time())

    def save():
        write_json(result_path, payload)

    # --- sweep (mezo; lr x eps; short) ---
    sweep_runs = [(lr, eps) for lr in plan["sweep_lrs"] for eps in plan["sweep_eps"]]
    for lr, eps in _progress(sweep_runs, desc="accuracy sweep"):
        name = f"sweep_mezo_lr{lr:g}_eps{eps:g}"
        run = {"args": dict(optim="mezo", learning_rate=lr, zo_eps=eps, max_steps=plan["sweep_steps"],
                            eval_strategy="steps", eval_steps=plan["sweep_steps"], do_eval=False, do_train=True)}
        argv = _train_argv(run, common, work / name)
        if quick:
            argv = [a for a in argv]
        res = _run_train(name, argv, log_dir / f"accuracy_{name}.log", in_process=quick, timeout=remaining())
        dev = [row for row in res["log_history"] if "eval_loss" in row]
        train_rt = res["metrics"].get("train_runtime")
        eval_rt = sum(row.get("eval_runtime", 0.0) for row in res["log_history"])
        payload["sweep"].append({"optim": "mezo", "learning_rate": lr, "zo_eps": eps, "steps": plan["sweep_steps"],
                                 "status": res["status"], "wall_seconds": res["wall_seconds"],
                                 "seconds_per_step": (train_rt - eval_rt) / plan["sweep_steps"] if train_rt else None,
                                 "dev_eval_seconds": eval_rt or None,
                                 "dev_loss": dev[-1]["eval_loss"] if dev else None,
                                 "dev_accuracy": dev[-1].get("eval_accuracy") if dev else None,
                                 "train_loss_history": _curve(res["log_history"], "loss")})
        shutil.rmtree(work / name, ignore_errors=True)
        save()
    ok = [s for s in payload["sweep"] if s["dev_loss"] is not None and math.isfinite(s["dev_loss"])]
    best_lr = min(ok, key=lambda s: (s["dev_loss"], -(s["dev_accuracy"] or 0)))["learning_rate"] if ok else 1e-6
    payload["sweep_best"] = ({"learning_rate": best_lr, "criterion": "lowest final dev loss"} if ok else
                             {"learning_rate": None, "criterion": "no sweep run: learning rates from plan['lrs']"})

    # --- main runs, same data sample, same budget: steps fitted to the remaining wall budget ---
    main_steps, eval_steps = plan["main_steps"], plan["eval_steps"]
    per_step = _median(s["seconds_per_step"] for s in payload["sweep"] if s.get("seconds_per_step"))
    per_dev = _median(s["dev_eval_seconds"] for s in payload["sweep"] if s.get("dev_eval_seconds"))
    if deadline is not None and math.isfinite(per_step) and math.isfinite(per_dev):
        n_test = min(int(common.get("num_eval", 277)), 277)
        per_example = per_dev / max(1, int(common.get("num_dev", 64)))
        left = (deadline - time.time()) / 3 - 60  # per run; 60 s for loading
        # qzo on NF4 runs ~1.5x slower per forward on CPU (dequantize); 3 dev evals; test + zero-shot test.
        fixed = 3 * per_dev * 1.5 + 2 * n_test * per_example * 1.5
        fitted = int((left - fixed) / (per_step * 1.5))
        fitted = max(2 * plan["min_eval_steps"], min(main_steps, fitted))
        eval_steps = max(plan["min_eval_steps"], fitted // 2)
        main_steps = 2 * eval_steps
        payload["setup"]["fitted_budget"] = {"seconds_per_step_mezo": per_step, "dev_eval_seconds": per_dev,
                                             "main_steps": main_steps, "eval_steps": eval_steps}
        _log(f"accuracy: {per_step:.1f} s/step, dev eval {per_dev:.0f} s -> main runs of {main_steps} steps")
    payload["setup"]["main_steps"], payload["setup"]["eval_steps"] = main_steps, eval_steps
    main = {
        "mezo": dict(optim="mezo", eval_zero_shot=True),
        "sparse_mezo": dict(optim="sparse_mezo", zo_sparsity=0.8),
        "qzo_nf4": dict(optim="qzo", quantization="nf4", eval_zero_shot=True),
    }
    if plan.get("runs"):  # a subset, e.g. to run one method in a second process
        main = {k: v for k, v in main.items() if k in plan["runs"]}
    for i, (name, args) in enumerate(_progress(list(main.items()), desc="accuracy runs")):
        timeout = None if deadline is None else min(remaining(), 1.25 * remaining() / (len(main) - i))
        lr = plan["lrs"].get(args["optim"]) or best_lr
        run_args = dict(args, learning_rate=lr, zo_eps=plan["sweep_eps"][0], max_steps=main_steps,
                        eval_strategy="steps", eval_steps=eval_steps, eval_on_start=True,
                        do_train=True, do_eval=True)  # eval_strategy alone turns do_eval on and do_train off
        argv = _train_argv({"args": run_args}, common, work / name)
        res = _run_train(name, argv, log_dir / f"accuracy_{name}.log", in_process=quick, timeout=timeout)
        payload["runs"][name] = {
            "args": run_args, "status": res["status"], "wall_seconds": res["wall_seconds"],
            "dev_accuracy_curve": _curve(res["log_history"], "eval_accuracy"),
            "dev_loss_curve": _curve(res["log_history"], "eval_loss"),
            "train_loss_curve": _curve(res["log_history"], "loss"),
            "test_accuracy": res["metrics"].get("test_accuracy"),
            "zero_shot_test_accuracy": res["metrics"].get("zero_shot_accuracy"),
            "train_runtime": res["metrics"].get("train_runtime"),
        }
        if res["metrics"].get("zero_shot_accuracy") is not None:
            payload["zero_shot"]["fp32" if name != "qzo_nf4" else "nf4"] = res["metrics"]["zero_shot_accuracy"]
        shutil.rmtree(work / name, ignore_errors=True)
        save()
    save()
    _plot_accuracy(out / f"accuracy{suffix}.png", payload)
    shutil.rmtree(work, ignore_errors=True)
    _log(f"accuracy -> {result_path}")
    return payload


def _plot_accuracy(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in payload["runs"].items():
        for ax, key in zip(axes, ("dev_accuracy_curve", "dev_loss_curve")):
            pts = run.get(key) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    zero_shot = payload.get("zero_shot", {})
    for acc in set(zero_shot.values()):
        axes[0].axhline(acc, ls=":", lw=1, color="gray")
    if zero_shot:
        text = ", ".join(f"{label} {acc:.3f}" for label, acc in zero_shot.items())
        axes[0].text(0, min(zero_shot.values()), f"zero-shot test accuracy: {text}", fontsize=7, va="bottom")
    axes[0].set_title("RTE dev accuracy vs ZO steps", fontsize=10)
    axes[1].set_title("RTE dev loss vs ZO steps", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =====================================================================================================
# suite 4: growth (model size and batch size)
# =====================================================================================================
def _loglog_slope(xs: list[float], ys: list[float]) -> float | None:
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
        floors.append(_timed(lambda: plain_forwards(model, batch)))
        steps.append(_timed(lambda: stepper.step(batch)))
    return {"two_forwards_seconds": floors, "step_seconds": steps,
            "step_seconds_median": _median(steps), "two_forwards_seconds_median": _median(floors),
            "ratio": _median(steps) / _median(floors)}


def run_growth(out: Path, quick: bool, data_dir: str | None, sizes: list[str] | None = None,
               batch_sizes: list[int] | None = None, size_batch: int | None = None, batch_model: str | None = None,
               repeats: int | None = None, memory: bool = True, max_length: int = 128) -> dict:
    env = environment()
    tok = _tokenizer()
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
    for axis, size, bs in _progress(jobs, desc="growth"):
        batch = rte_batch(tok, bs, max_length, data_dir)
        model = random_model(shapes[size])
        n = sum(p.numel() for p in model.parameters())
        timing = _time_model(model, batch, repeats)
        del model
        gc.collect()
        row = {"model": size, "param_count": n, "batch_size": bs, "batch_tokens": int(batch["input_ids"].shape[1]),
               **timing}
        if memory and not quick:
            for mode in ("inference", "mezo"):
                r = _spawn_memory_worker({"mode": mode, "model": f"random:{size}", "batch_size": bs,
                                          "max_length": max_length, "steps": 1, "data_dir": data_dir})
                row[f"{mode}_peak_rss_bytes"] = r["peak_rss_during_steps_bytes"]
                row[f"{mode}_rss_after_load_bytes"] = r["rss_after_load_bytes"]
        (by_size if axis == "size" else by_batch)[f"{size}_b{bs}"] = row
        payload = _growth_payload(env, quick, shapes, sizes, size_batch, batch_model, max_length, repeats, by_size, by_batch)
        write_json(path, payload)
    _plot_growth(out / ("growth_quick.png" if quick else "growth.png"), payload)
    _log(f"growth -> {path}: slopes {payload['loglog_slopes']}")
    return payload


def _growth_payload(env, quick, shapes, sizes, size_batch, batch_model, max_length, repeats, by_size, by_batch) -> dict:
    def slope(rows, xkey, ykey):
        rows = [r for r in rows if ykey in r]
        return _loglog_slope([r[xkey] for r in rows], [r[ykey] for r in rows])

    fits = {
        "step_time_vs_params": slope(by_size.values(), "param_count", "step_seconds_median"),
        "two_forwards_time_vs_params": slope(by_size.values(), "param_count", "two_forwards_seconds_median"),
        "step_time_vs_batch": slope(by_batch.values(), "batch_size", "step_seconds_median"),
        "mezo_peak_rss_vs_params": slope(by_size.values(), "param_count", "mezo_peak_rss_bytes"),
        "mezo_peak_rss_vs_batch": slope(by_batch.values(), "batch_size", "mezo_peak_rss_bytes"),
    }
    payload = {
        "suite": "growth", "schema_version": SCHEMA_VERSION, "quick": quick, "environment": env,
        "setup": {"shapes": {k: shapes[k] for k in sizes}, "vocab_size": 49152, "tied_embeddings": True,
                  "size_axis_batch": size_batch, "batch_axis_model": batch_model, "max_length": max_length,
                  "repeats": repeats, "init": "random (AutoModelForCausalLM.from_config, seed 0), fp32",
                  "step": "mezo step via ZOEngine (same calls as the trainer)",
                  "memory": "peak RSS during 1 step in a fresh subprocess (absolute RSS)",
                  "fit": "least-squares slope of log(y) vs log(x)"},
        "by_size": by_size, "by_batch": by_batch, "loglog_slopes": fits,
    }
    return payload


def _plot_growth(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, xkey, xlabel in ((axes[0], "by_size", "param_count", "parameters"),
                                  (axes[1], "by_batch", "batch_size", "batch size")):
        rows = sorted(payload[key].values(), key=lambda r: r[xkey])
        xs = [r[xkey] for r in rows]
        ax.loglog(xs, [r["step_seconds_median"] for r in rows], "o-", label="mezo step (s)")
        ax.loglog(xs, [r["two_forwards_seconds_median"] for r in rows], "s--", label="two plain forwards (s)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        if rows and "mezo_peak_rss_bytes" in rows[0]:
            ax2 = ax.twinx()
            ax2.loglog(xs, [r["mezo_peak_rss_bytes"] / 2**20 for r in rows], "^-", color="tab:green", label="mezo peak RSS (MiB)")
            ax2.loglog(xs, [r["inference_peak_rss_bytes"] / 2**20 for r in rows], "v:", color="tab:olive", label="inference peak RSS (MiB)")
            ax2.set_ylabel("MiB")
            ax2.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="upper left")
    slopes = payload["loglog_slopes"]
    axes[0].set_title(f"vs model size (slope time {_fmt(slopes['step_time_vs_params'])}, "
                      f"RSS {_fmt(slopes['mezo_peak_rss_vs_params'])})", fontsize=9)
    axes[1].set_title(f"vs batch (slope time {_fmt(slopes['step_time_vs_batch'])}, "
                      f"RSS {_fmt(slopes['mezo_peak_rss_vs_batch'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# =====================================================================================================
# report: markdown tables from the JSON files
# =====================================================================================================
def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def replot(out: Path) -> None:
    """Redraw the PNGs from the JSON files (e.g. after a speed run cut short between rounds)."""
    for name, draw in (
        ("speed", lambda d, png: _plot_bars(png, {k: v["ratio_step_over_two_forwards"] for k, v in d["results"].items()},
                                            "ZO step time / two plain forwards (same model, same batch)", goal=1.15)),
        ("memory", lambda d, png: _plot_memory(png, d["results"])),
        ("accuracy", lambda d, png: _plot_accuracy(png, d)),
        ("growth", lambda d, png: _plot_growth(png, d)),
    ):
        f = out / f"{name}.json"
        if f.exists():
            draw(json.loads(f.read_text()), out / f"{name}.png")


def report(out: Path) -> str:
    """Markdown tables of whatever result files ``out`` holds (for the README's Results section)."""
    lines: list[str] = []

    def load(name):
        f = out / name
        return json.loads(f.read_text()) if f.exists() else None

    for name in ("speed.json", "memory.json", "accuracy.json", "growth.json"):
        d = load(name)
        if d is None:
            continue
        m, g = d["environment"]["machine"], d["environment"]["git"]
        lines.append(f"<!-- {name}: {d['environment']['timestamp_utc']}, commit {g.get('commit')} "
                     f"(dirty {g.get('dirty')}), {m['cpu_model']}, {m['torch_num_threads']} torch threads -->")
    speed = load("speed.json")
    if speed:
        st = speed["setup"]
        lines += ["", f"Speed (batch {st['batch_rows']} x {st['batch_tokens']} tokens, {st['repeats']} interleaved rounds, median):", "",
                  "| configuration | model | ZO step / two plain forwards | median of per-round ratios | goal |",
                  "|---|---|---|---|---|"]
        for k, v in speed["results"].items():
            goal = "<= 1.15" if k != "mezo_reference_inplace" else "(baseline)"
            lines.append(f"| {k} | {v['model']} | {v['ratio_step_over_two_forwards']:.3f} | {v['ratio_median_of_rounds']:.3f} | {goal} |")
        if "reference_over_ours_mezo" in speed:
            lines.append(f"\nReference in-place MeZO step / our MeZO step: {speed['reference_over_ours_mezo']:.2f}x")
    mem = load("memory.json")
    if mem:
        st = mem["setup"]
        lines += ["", f"Memory (batch {st['batch_size']}, max_length {st['max_length']}, {st['steps_per_process']} steps per fresh process):", "",
                  "| configuration | RSS after load (MiB) | peak RSS during steps (MiB) | peak - after load (MiB) | ru_maxrss incl. load (MiB) |",
                  "|---|---|---|---|---|"]
        for k, v in mem["results"].items():
            lines.append(f"| {k} | {_mib(v['rss_after_load_bytes'])} | {_mib(v['peak_rss_during_steps_bytes'])} | "
                         f"{_mib(v['peak_above_after_load_bytes'])} | {_mib(v['ru_maxrss_lifetime_bytes'])} |")
        lines += ["", "| ratio (absolute peak RSS) | value | goal | met |", "|---|---|---|---|"]
        for k, v in mem["goals"].items():
            lines.append(f"| {k} | {v['value']:.2f} | {v['goal']} | {'yes' if v['met'] else 'no'} |")
        for k, v in mem.get("ratios_above_after_load", {}).items():
            lines.append(f"| {k} (increments above after-load RSS, not absolute) | {v:.2f} | | |")
    acc = load("accuracy.json")
    for extra in sorted(out.glob("accuracy_*.json")):
        if "quick" in extra.name:
            continue
        more = json.loads(extra.read_text())
        if acc is None:
            acc = more
        else:
            acc = dict(acc, runs={**acc["runs"], **{f"{k} ({extra.stem})": v for k, v in more["runs"].items()}})
    if acc:
        lines += ["", "Accuracy (RTE):", "", "| run | lr | steps | status | dev acc curve (step: acc) | test acc | zero-shot test acc |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in acc["runs"].items():
            curve = ", ".join(f"{s}: {a:.3f}" for s, a in v["dev_accuracy_curve"])
            ta = "n/a" if v.get("test_accuracy") is None else f"{v['test_accuracy']:.3f}"
            zs = "" if v.get("zero_shot_test_accuracy") is None else f"{v['zero_shot_test_accuracy']:.3f}"
            done = v.get("steps_completed")
            steps = v["args"]["max_steps"] if done in (None, v["args"]["max_steps"]) else f"{done} of {v['args']['max_steps']}"
            lines.append(f"| {k} | {v['args']['learning_rate']:g} | {steps} | {v['status']} | {curve} | {ta} | {zs} |")
        lines += ["", "| sweep (mezo) lr | eps | steps | dev loss | dev acc | status |", "|---|---|---|---|---|---|"]
        for s_ in acc["sweep"]:
            dl = "n/a" if s_["dev_loss"] is None else f"{s_['dev_loss']:.4f}"
            da = "n/a" if s_["dev_accuracy"] is None else f"{s_['dev_accuracy']:.3f}"
            lines.append(f"| {s_['learning_rate']:g} | {s_['zo_eps']:g} | {s_['steps']} | {dl} | {da} | {s_['status']} |")
    if (out / "rte_study").is_dir():
        from .study import study_report

        lines += ["", "Accuracy study (RTE, `zo-bench study`):", "", study_report(out / "rte_study")]
    gr = load("growth.json")
    if gr:
        lines += ["", "Growth:", "", "| model | params | batch | tokens | mezo step (s) | two forwards (s) | ratio | mezo peak RSS (MiB) | inference peak RSS (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in list(gr["by_size"].values()) + list(gr["by_batch"].values()):
            lines.append(f"| {v['model']} | {v['param_count'] / 1e6:.1f}M | {v['batch_size']} | {v['batch_tokens']} | "
                         f"{v['step_seconds_median']:.2f} | {v['two_forwards_seconds_median']:.2f} | {v['ratio']:.3f} | "
                         f"{_mib(v.get('mezo_peak_rss_bytes'))} | {_mib(v.get('inference_peak_rss_bytes'))} |")
        lines.append("")
        lines.append("log-log slopes: " + ", ".join(f"{k} {_fmt(v)}" for k, v in gr["loglog_slopes"].items()))
    return "\n".join(lines) + "\n"


# =====================================================================================================
# CLI
# =====================================================================================================
SUITES = ("speed", "memory", "accuracy", "growth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=[*SUITES, "all", "report", "study", "scale", "memory-worker"])
    p.add_argument("--quick", action="store_true", help="tiny random model, CI-sized (< 60 s for all suites)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG files")
    p.add_argument("--data_dir", default=os.environ.get("ZO_BENCH_RTE", RTE_DIR_DEFAULT), help="RTE jsonl folder")
    p.add_argument("--log_dir", default=None, help="accuracy: zo-train logs (default: <out>/../logs)")
    p.add_argument("--budget_minutes", type=float, default=None, help="accuracy: stop runs at this wall budget")
    p.add_argument("--repeats", type=int, default=None, help="speed/growth: interleaved rounds")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--plan", default=None, help="accuracy: JSON overriding the plan (e.g. main_steps)")
    p.add_argument("--sizes", default=None, help="growth: comma-separated model sizes (10M,35M,135M,360M)")
    p.add_argument("--batch_sizes", default=None, help="growth: comma-separated batch sizes")
    p.add_argument("--batch_model", default=None, help="growth: model size of the batch axis (default 35M)")
    p.add_argument("--config", default=None, help="memory-worker: JSON configuration")
    p.add_argument("--runs", default=None, help="study: comma-separated run names (default: the whole plan, in order)")
    p.add_argument("--root", default=None, help="study: run folders and logs (default out/study, gitignored)")
    p.add_argument("--threads", type=int, default=1, help="study: torch threads per run")
    p.add_argument("--nice", type=int, default=10, help="study: niceness of the harness and its zo-train runs")
    p.add_argument("--list", action="store_true", help="study: print the plan and what is done")
    p.add_argument("--report", action="store_true", help="study: only the table and plots of <out>/rte_study")
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``zo-bench`` console script: the suite's exit status (0 on success), 2 for bad flags, 1 for a failed run."""
    from .cli.errors import run_console_script

    return run_console_script("zo-bench", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    from .cli.errors import usage_errors_in_one_line

    raw_argv = sys.argv[1:] if argv is None else list(argv)
    if raw_argv[:1] == ["scale"]:  # real model shapes, own flags: zo_trainer/bench_scale.py
        from .bench_scale import build_parser as scale_parser, main_scale

        scale_args = scale_parser()
        usage_errors_in_one_line(scale_args, "zo-bench scale")
        return main_scale(raw_argv[1:], parser=scale_args)
    parser = build_parser()
    usage_errors_in_one_line(parser, "zo-bench")
    args = parser.parse_args(argv)
    if args.suite == "memory-worker":
        result = memory_worker(json.loads(args.config))
        print("ZO_BENCH_RESULT " + json.dumps(result, default=_json_default), flush=True)
        return 0
    if args.suite == "study":
        from .study import main_study

        return main_study(Path(args.out), args.quick, args.runs, args.root, args.threads, args.nice, args.list,
                          args.report, plan_file=args.plan, data_dir=args.data_dir)
    if args.suite == "report":
        replot(Path(args.out))
        print(report(Path(args.out)), end="")
        return 0
    import transformers

    transformers.utils.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suites = SUITES if args.suite == "all" else (args.suite,)
    t0 = time.time()
    for suite in suites:
        if suite == "speed":
            run_speed(out, args.quick, args.data_dir, repeats=args.repeats, batch_size=args.batch_size, max_length=args.max_length)
        elif suite == "memory":
            run_memory(out, args.quick, args.data_dir, batch_size=args.batch_size, max_length=args.max_length)
        elif suite == "accuracy":
            run_accuracy(out, args.quick, args.data_dir, log_dir=Path(args.log_dir) if args.log_dir else None,
                         budget_minutes=args.budget_minutes, plan_overrides=json.loads(args.plan) if args.plan else None)
        elif suite == "growth":
            run_growth(out, args.quick, args.data_dir, repeats=args.repeats,
                       sizes=args.sizes.split(",") if args.sizes else None,
                       batch_sizes=[int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None,
                       size_batch=args.batch_size, batch_model=args.batch_model, max_length=args.max_length)
    _log(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
