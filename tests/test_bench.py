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


# ----------------------------------------------------------------------------------------- accuracy study
def _zo_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("zo-bench")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "zo_trainer.bench"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*cmd, "study", "--data_dir", str(RTE), "--nice", "0", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow  # ~45 s: five zo-train subprocesses on a tiny random model
def test_study_quick_end_to_end_and_resume(tmp_path):
    """zo-bench study --quick: every kind of run, one JSON each, the table and plot; a cut-short run resumes."""
    out, root = tmp_path / "results", tmp_path / "runs"
    # q_mezo first trained to 2 of its 4 steps (as if stopped at its checkpoint), then asked for again.
    short = json.dumps({"runs": [{"name": "q_mezo", "args": {"optim": "mezo", "learning_rate": 1e-4, "max_steps": 2}}]})
    proc = _zo_bench("--quick", "--out", str(out), "--root", str(root), "--runs", "q_mezo", "--plan", short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _zo_bench("--quick", "--out", str(out), "--root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = out / "rte_study"
    assert {p.name for p in study.iterdir() if p.is_dir()} == {"q_sparse", "q_mezo", "q_overfit", "q_reference"}
    assert (study / "rte_study.png").stat().st_size > 0

    for name in ("q_sparse", "q_mezo"):
        r = json.loads((study / name / "study_result.json").read_text())
        assert (study / name / "zo_trajectory.json").exists()
        assert r["steps_completed"] == r["steps"] == 4 and r["trained"] and r["diverged"] is False
        assert r["command"].split()[0].endswith("zo-train") and "--max_steps 4" in r["command"]
        assert {"optim", "seed", "learning_rate", "zo_eps", "batch_size", "max_length", "data"} <= set(r)
        assert [p["step"] for p in r["dev_curve"]] == ([0, 2, 4] if name == "q_sparse" else [2, 4])
        assert all(p["wall_seconds"] >= 0 and math.isfinite(p["loss"]) for p in r["dev_curve"])
        assert [p["step"] for p in r["train_curve"]] == [1, 2, 3, 4]
        test = r["test"]
        assert test["n"] == len(test["predictions"]) == 8 and set(test["predictions"]) <= {0, 1}
        assert test["ci95"][0] <= test["accuracy"] <= test["ci95"][1]
        assert 0.5 <= r["majority_rate"] <= 1 and 0 <= r["zero_shot"]["accuracy"] <= 1
    resumed = json.loads((study / "q_mezo" / "study_result.json").read_text())
    assert [s["resumed_from_step"] for s in resumed["segments"]] == [0, 2]
    assert "--resume_from_checkpoint" in resumed["segments"][1]["command"]

    over = json.loads((study / "q_overfit" / "study_result.json").read_text())
    assert over["min_train_loss"] < math.log(2) / 2  # AdamW memorises 4 examples in 12 steps
    assert over["steps_to_train_loss_below"]["0.30"] is not None
    ref = json.loads((study / "q_reference" / "study_result.json").read_text())
    assert set(ref["reference"]) == {"ours", "reference"}
    for v in ref["reference"].values():
        assert [p["step"] for p in v["eval"]] == [0, 2]
    assert ref["reference"]["ours"]["eval"][0]["eval_loss"] == pytest.approx(ref["reference"]["reference"]["eval"][0]["eval_loss"])

    report = _zo_bench("--report", "--out", str(out))
    assert report.returncode == 0 and "| q_sparse | sparse_mezo |" in report.stdout and "Zero-shot test accuracy" in report.stdout


def test_study_log_parsing_resumed_run(tmp_path):
    """Steps and wall-clock of a run killed after its step-20 checkpoint and resumed later."""
    from zo_trainer import study

    log = tmp_path / "r.log"
    log.write_text("\n".join([
        "100.0 $ zo-train --optim mezo --eval_on_start true",
        "101.0 {'eval_loss': '0.8', 'eval_accuracy': '0.5', 'epoch': 0}",
        "110.0 {'loss': '0.7', 'learning_rate': '1e-05', 'epoch': '0.1'}",
        "120.0 {'loss': '0.6', 'learning_rate': '1e-05', 'epoch': '0.2'}",
        "125.0 {'eval_loss': '0.65', 'eval_accuracy': '0.6', 'epoch': '0.2'}",
        "130.0 {'loss': 'nan', 'learning_rate': '1e-05', 'epoch': '0.3'}",
        "500.0 $ zo-train --optim mezo --resume_from_checkpoint out/r/checkpoint-20",
        "510.0 {'loss': '0.5', 'learning_rate': '1e-05', 'epoch': '0.3'}",
        "520.0 {'loss': '0.4', 'learning_rate': '1e-05', 'epoch': '0.4'}",
        "525.0 {'eval_loss': '0.45', 'eval_accuracy': '0.7', 'epoch': '0.4'}",
        "530.0 {'train_runtime': '30.0', 'epoch': '0.4'}",
    ]) + "\n")
    (tmp_path / "r.log.pauses").write_text("512.0 517.0\n")  # stopped for 5 s between steps 30 and 40
    parsed = study.parse_log(log, logging_steps=10, eval_steps=20, max_steps=40)
    assert [(p["step"], p["loss"]) for p in parsed["train"]] == [(10, 0.7), (20, 0.6), (30, 0.5), (40, 0.4)]
    assert [(p["step"], p["eval_loss"]) for p in parsed["eval"]] == [(0, 0.8), (20, 0.65), (40, 0.45)]
    # the resumed segment continues from the wall-clock at step 20 (25 s), not from the kill or the pause
    assert parsed["train"][2]["wall_seconds"] == pytest.approx(25 + 10)
    assert parsed["eval"][2]["wall_seconds"] == pytest.approx(25 + 25 - 5)
    assert study._diverged([0.7, float("nan")]) and study._diverged([0.7, 2.2]) and not study._diverged([0.7, 2.0])
    lo, hi = study.bootstrap_ci([1] * 60 + [0] * 40)
    assert lo < 0.6 < hi and hi - lo == pytest.approx(0.19, abs=0.03)
