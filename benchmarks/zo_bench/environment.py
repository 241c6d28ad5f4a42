"""What every result JSON records about where it ran: machine, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import REPO_ROOT


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
    root = REPO_ROOT
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
        "versions": {
            name: _version(name) for name in ("torch", "transformers", "bitsandbytes", "gptqmodel", "zo_trainer")
        },
        "git": _git(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        # settings that move the figures (allocator policy, threads, the engine's switches), as they were set
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("MALLOC_", "OMP_", "GPTQMODEL_", "ZO_"))},
    }
