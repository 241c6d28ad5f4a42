"""The subprocess worker protocol: a fresh Python process measures one configuration and prints one result line
(``<PREFIX> <json>``) that the parent reads back; and the RSS measurement the workers use."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from .common import REPO_ROOT, json_default


def run_worker(
    module_args: list[str], prefix: str, *, timeout: float, nice: int = 0, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, dict[str, Any] | None]:
    """Run ``python -m <module_args>`` (niced by ``nice``) with this checkout importable; the finished process and
    its result (``None`` if it printed no ``prefix`` line)."""
    cmd = [sys.executable, "-m", *module_args]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    env = dict(os.environ if env is None else env)
    # benchmarks/ is not installed: the child finds it through the checkout's root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(prefix + " "):
            return proc, json.loads(line[len(prefix) + 1 :])
    return proc, None


def print_result(prefix: str, result: dict[str, Any]) -> None:
    """The worker's side: its one result line."""
    print(f"{prefix} " + json.dumps(result, default=json_default), flush=True)


class PeakSampler:
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


def malloc_trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
