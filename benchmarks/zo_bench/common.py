"""Shared helpers of the benchmark suites: where the checkout and the data are, logging, JSON files, timing
statistics, and zo-train command lines."""

from __future__ import annotations

import ast
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# The data sit beside the checkout, as tests/conftest.py expects them; ZO_BENCH_RTE or --data_dir point elsewhere.
RTE_DIR_DEFAULT = str(REPO_ROOT.parent / "shared" / "data" / "superglue" / "rte")
SCHEMA_VERSION = 1


def default_rte_dir() -> str:
    """The RTE jsonl folder: ``$ZO_BENCH_RTE`` if set, else ``<checkout>/../shared/data/superglue/rte``."""
    return os.environ.get("ZO_BENCH_RTE", RTE_DIR_DEFAULT)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=json_default) + "\n")
    tmp.replace(path)
    return path


def json_default(obj):
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def progress(iterable=None, total=None, desc=None, disable=False):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr)


def log_line(msg: str) -> None:
    print(f"[zo-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class EngineClock:
    """Seconds spent inside a ZO engine's forward hooks and update: the step's own work (perturbed copies, z, the
    update; on CUDA the host's time issuing it), less the module work the hooks do in a module's place (the vocab
    projection's matmuls over perturbed rows, ``ZOEngine.module_seconds``: forward work a plain forward does too),
    which ``last_module_seconds`` keeps apart. Wraps the methods on the instance and registers the hooks again, so
    the hooks and the update the optimizer calls are the timed ones; nothing else changes."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._seconds = 0.0
        self._module_start = engine.module_seconds
        self.last_module_seconds = 0.0  # The last lap's module work inside the hooks, left out of the lap.
        for name in ("_pre_forward", "_post_forward", "update"):
            setattr(engine, name, self._timed(getattr(engine, name)))
        if engine._hooks:
            engine.remove()
            engine.install()

    def _timed(self, fn):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._seconds += time.perf_counter() - start

        return timed_call

    def lap(self) -> float:
        """The engine's seconds since the last lap (or since wrapping), and start counting again."""
        module = self._engine.module_seconds - self._module_start
        self._module_start = self._engine.module_seconds
        seconds, self._seconds = self._seconds, 0.0
        self.last_module_seconds = module
        return seconds - module


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


def dict_line(text: str) -> dict[str, float] | None:
    """A dict line printed by HF's PrinterCallback (values may be strings) -> floats; None for any other line."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        d = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    row = {}
    for k, v in d.items():
        try:
            row[k] = float(v)
        except (TypeError, ValueError):
            pass
    return row


def run_args(run: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """A run's zo-train arguments: ``common`` updated with the run's ``args``, unset (None) ones left out."""
    args = dict(common)
    args.update(run.get("args", {}))
    return {k: v for k, v in args.items() if v is not None}


def to_argv(args: dict[str, Any]) -> list[str]:
    """zo-train flags for ``args``: booleans as true / false, lists as several words (``--lora_target_modules q_proj
    v_proj``, as HfArgumentParser reads a list field)."""
    argv: list[str] = []
    for k, v in args.items():
        if isinstance(v, (list, tuple)):
            argv += [f"--{k}", *(str(x) for x in v)]
        else:
            argv += [f"--{k}", ("true" if v else "false") if isinstance(v, bool) else str(v)]
    return argv
