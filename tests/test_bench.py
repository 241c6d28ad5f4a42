"""``zo-bench --quick``: the harness runs on a tiny random model and writes valid JSON + PNG.

These tests check the harness (files, keys, environment record), not the figures: on a tiny model
the ratios mean nothing. The real runs are described in docs_snippets/results.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

bench = pytest.importorskip("zo_trainer.bench")

RTE = Path(os.environ.get("ZO_BENCH_RTE", bench.RTE_DIR_DEFAULT))
HAS_QUANT = all(importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "gptqmodel", "optimum"))
HAS_PLOT = all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "psutil"))

pytestmark = [
    pytest.mark.skipif(not (RTE / "train.jsonl").exists(), reason=f"RTE data not found in {RTE} (set ZO_BENCH_RTE)"),
    pytest.mark.skipif(not HAS_PLOT, reason="zo-bench needs matplotlib and psutil"),
]
NEED_QUANT = pytest.mark.skipif(not HAS_QUANT, reason="needs bitsandbytes + gptqmodel + optimum (scripts/install_quant.sh)")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _run(suite: str, out: Path) -> dict:
    rc = bench.main([suite, "--quick", "--out", str(out), "--data_dir", str(RTE), "--log_dir", str(out / "logs")])
    assert rc == 0
    path = out / f"{suite}_quick.json"
    assert path.exists() and (out / f"{suite}_quick.png").exists()
    payload = json.loads(path.read_text())
    assert payload["suite"] == suite and payload["quick"] is True
    _check_environment(payload["environment"])
    return payload


def _check_environment(env: dict) -> None:
    machine = env["machine"]
    assert machine["cpu_model"] and machine["torch_num_threads"] >= 1 and "gpu" in machine
    assert set(env["versions"]) >= {"torch", "transformers", "bitsandbytes", "gptqmodel"}
    assert env["versions"]["torch"]
    assert "commit" in env["git"] and "dirty" in env["git"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@NEED_QUANT
def test_speed_quick(out):
    payload = _run("speed", out)
    results = payload["results"]
    assert set(results) == {"mezo", "sparse_mezo", "mezo_reference_inplace", "qzo_gptq", "qzo_nf4"}
    for row in results.values():
        assert _finite(row["ratio_step_over_two_forwards"]) and _finite(row["two_forwards_seconds_median"])
        assert len(row["step_seconds_all"]) == payload["setup"]["repeats"]
    assert set(payload["goals"]) == {f"{m}_ratio_le_1.15" for m in ("mezo", "sparse_mezo", "qzo_gptq", "qzo_nf4")}
    assert _finite(payload["reference_over_ours_mezo"])


@NEED_QUANT
def test_memory_quick(out):
    payload = _run("memory", out)
    assert set(payload["results"]) == {name for name, _ in bench.MEMORY_CONFIGS}
    for row in payload["results"].values():
        assert _finite(row["peak_rss_during_steps_bytes"]) and _finite(row["rss_after_load_bytes"])
    assert set(payload["ratios"]) >= {"adamw_over_mezo", "mezo_over_inference_fp32", "mezo_fp32_over_qzo_nf4_int4",
                                      "mezo_fp32_over_qzo_gptq_int4", "qzo_nf4_over_inference_nf4"}
    assert all(_finite(v) for v in payload["ratios"].values())
    assert all("met" in g and "value" in g for g in payload["goals"].values())


def test_memory_worker_subprocess(tmp_path):
    """The real memory suite runs each configuration in a fresh ``memory-worker`` process."""
    config = {"mode": "mezo", "model": "fp32", "quick": True, "batch_size": 2, "max_length": 64, "steps": 1,
              "data_dir": str(RTE), "work": str(tmp_path)}
    result = bench._spawn_memory_worker(config, timeout=600)
    assert result["peak_rss_during_steps_bytes"] >= result["rss_after_load_bytes"] * 0.5
    assert result["ru_maxrss_lifetime_bytes"] > 0 and len(result["step_seconds"]) == 1


@NEED_QUANT
def test_accuracy_quick(out):
    payload = _run("accuracy", out)
    assert payload["sweep"] and all("dev_loss" in s for s in payload["sweep"])
    assert set(payload["runs"]) == {"mezo", "sparse_mezo", "qzo_nf4"}
    for run in payload["runs"].values():
        assert run["status"] == "ok"
        assert run["dev_accuracy_curve"] and run["dev_accuracy_curve"][0][0] == 0  # eval_on_start
        assert 0.0 <= run["test_accuracy"] <= 1.0
    assert set(payload["zero_shot"]) == {"fp32", "nf4"}


def test_growth_quick(out):
    payload = _run("growth", out)
    assert payload["by_size"] and payload["by_batch"]
    assert set(payload["loglog_slopes"]) >= {"step_time_vs_params", "step_time_vs_batch"}
    for row in list(payload["by_size"].values()) + list(payload["by_batch"].values()):
        assert _finite(row["step_seconds_median"]) and row["param_count"] > 0


def test_loglog_slope_and_log_parsing():
    assert bench._loglog_slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    assert bench._loglog_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    rows = bench._parse_log_lines("noise\n{'eval_loss': '0.69', 'eval_accuracy': '0.5', 'step': 3}\n{'x': 'y'}\n")
    assert rows[0] == {"eval_loss": 0.69, "eval_accuracy": 0.5, "step": 3.0}


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "zo_trainer.bench", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "speed" in proc.stdout and "--quick" in proc.stdout
