"""``zo-bench --quick``: the harness (``benchmarks/zo_bench``) runs on a tiny random model and writes valid JSON + PNG.

These tests check the harness (files, keys, environment record), not the figures: on a tiny model
the ratios mean nothing. The real runs are in the README's Results section. Also: the ``zo-bench`` console script
finds the checkout's benchmarks, and says in one line where there is none.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.zo_bench import accuracy, cli, common, growth, memory, study
from benchmarks.zo_bench.common import default_rte_dir
from conftest import HAS_GPTQ, zo_bench
from zo_trainer import counter_noise

RTE = Path(default_rte_dir())
HAS_QUANT = all(importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "gptqmodel", "optimum"))
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_PLOT = all(importlib.util.find_spec(m) is not None for m in ("matplotlib", "psutil"))


def needs_run(test):
    """The suites read RTE prompts and write plots."""
    test = pytest.mark.skipif(
        not (RTE / "train.jsonl").exists(), reason=f"RTE data not found in {RTE} (set ZO_BENCH_RTE)"
    )(test)
    return pytest.mark.skipif(not HAS_PLOT, reason="zo-bench needs matplotlib and psutil")(test)


NEED_QUANT = pytest.mark.skipif(
    not HAS_QUANT, reason="needs bitsandbytes + gptqmodel + optimum (scripts/install_quant.sh)"
)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def quick_flags(out: Path, *extra: str) -> list[str]:
    """The flags every --quick run here takes: tiny model, results in ``out``, the RTE data found above."""
    return ["--quick", "--out", str(out), "--data_dir", str(RTE), *extra]


def _run(suite: str, out: Path) -> dict:
    rc = cli.main([suite, *quick_flags(out, "--log_dir", str(out / "logs"))])
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


@needs_run
@NEED_QUANT
def test_speed_quick(out, tmp_path):
    payload = _run("speed", out)
    results = payload["results"]
    assert set(results) == {
        "mezo",
        "sparse_mezo",
        "mezo_rademacher",
        "sparse_mezo_rademacher",
        "mezo_rademacher_scheme5",
        "sparse_mezo_rademacher_scheme5",
        "mezo_noise_threads",
        "sparse_mezo_noise_threads",
        "mezo_reference_inplace",
        "qzo_gptq",
        "qzo_nf4",
    }
    for name, row in results.items():
        assert _finite(row["ratio_step_over_two_forwards"]) and _finite(row["two_forwards_seconds_median"])
        assert len(row["step_seconds_all"]) == payload["setup"]["repeats"]
        if name == "mezo_reference_inplace":  # Not our engine: no engine time.
            assert "engine_seconds_all" not in row
            continue
        # Time inside the engine is part of each step's time, and more than nothing (it perturbs and updates).
        assert len(row["engine_seconds_all"]) == len(row["step_seconds_all"]) == len(row["engine_module_seconds_all"])
        assert all(0 < e < s for e, s in zip(row["engine_seconds_all"], row["step_seconds_all"])), name
        assert 0 < row["engine_over_two_forwards"] < row["step_seconds_median"] / row["two_forwards_seconds_median"]
    assert set(payload["goals"]) == {f"{m}_ratio_le_1.15" for m in ("mezo", "sparse_mezo", "qzo_gptq", "qzo_nf4")}
    assert _finite(payload["reference_over_ours_mezo"])
    assert all(_finite(payload[f"rademacher_over_gaussian_{name}"]) for name in ("mezo", "sparse_mezo"))
    for name in ("mezo", "sparse_mezo"):  # Rademacher z as scheme 5 drew it / as 6 draws it, step and engine time.
        assert _finite(payload[f"rademacher_scheme5_over_scheme6_{name}"])
        assert _finite(payload[f"rademacher_scheme5_over_scheme6_engine_{name}"])
    assert all(_finite(payload[f"noise_threads_over_openmp_team_{name}"]) for name in ("mezo", "sparse_mezo"))
    teams = payload["two_forwards_beside_idle_openmp_teams"]  # the same floor beside idle OpenMP teams, same rounds
    assert len(teams["seconds_all"]) == payload["setup"]["repeats"] and _finite(teams["over_plain_two_forwards"])
    # zo-bench report prints the Rademacher rows and their ratio to the Gaussian steps; and still reads a speed.json
    # written before they existed (the committed one, less its Rademacher rows and ratios).
    from benchmarks.zo_bench.report import report

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "speed.json").write_text((out / "speed_quick.json").read_text())
    text = report(tmp_path / "new")
    assert "| mezo_rademacher | fp32 |" in text and "| sparse_mezo_rademacher | fp32 |" in text
    engine_share = payload["results"]["mezo"]["engine_over_two_forwards"]
    assert "engine / two forwards" in text and f" | {engine_share:.3f} | <= 1.15 |" in text
    assert "mezo step with Rademacher z / with Gaussian z" in text
    assert "| mezo_rademacher_scheme5 | fp32 | " in text
    assert "mezo step with z scheme 5's Rademacher / with scheme 6's, same rounds: " in text
    assert re.search(r"\| mezo_rademacher_scheme5 \| fp32 \| .* \| \(baseline\) \|", text)
    assert re.search(r"\| mezo_noise_threads \| fp32 \| .* \| \(baseline\) \|", text)
    assert "mezo step with the C passes on noise threads / on torch's OpenMP team, same rounds: " in text
    assert "two forwards beside two idle OpenMP teams / plain two forwards (same rounds): " in text
    (tmp_path / "old").mkdir()
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "speed.json"
    older = json.loads(committed.read_text())
    older["results"] = {
        k: v for k, v in older["results"].items() if "rademacher" not in k and "_scheme" not in k and "threads" not in k
    }
    dropped = ("rademacher_", "two_forwards_beside", "scheme", "noise_threads")
    older = {k: v for k, v in older.items() if not k.startswith(dropped)}
    (tmp_path / "old" / "speed.json").write_text(json.dumps(older))
    text = report(tmp_path / "old")
    assert "| mezo | fp32 |" in text and "rademacher" not in text.lower() and "OpenMP" not in text
    assert "z scheme" not in text
    # A speed.json of z scheme 3 (before scheme 5) names its scheme-2 rows as it did.
    (tmp_path / "scheme3").mkdir()
    scheme3 = {**older, "scheme2_over_scheme3_mezo": 1.25}
    scheme3["results"] = {**older["results"], "mezo_scheme2": older["results"]["mezo"]}
    (tmp_path / "scheme3" / "speed.json").write_text(json.dumps(scheme3))
    text = report(tmp_path / "scheme3")
    assert "mezo step with z scheme 2's Gaussian / with scheme 3's, same rounds: 1.250" in text
    assert re.search(r"\| mezo_scheme2 \| fp32 \| .* \| \(baseline\) \|", text)


@needs_run
@NEED_QUANT
def test_qzo_step_time_through_the_trainer(tmp_path):
    """zo-bench qzo-step-time: qzo through ZOTrainer.training_step on a GPTQ model (here the tiny one), wall and CPU."""
    from benchmarks.zo_bench.factories import gptq_dir, tiny_model_dir

    gptq = gptq_dir(True, tmp_path, tiny_model_dir(tmp_path))
    proc = zo_bench(
        "qzo-step-time", "--gptq_dir", gptq, "--backends", "gptq", "--steps", 2, "--batch", 2, "--max_length", 64,
        "--threads", 1, "--data_dir", RTE, "--out", tmp_path / "out", "--name", "qzo_tiny",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("gptq "))[len("gptq ") :])
    assert _finite(row["ratio_median"]) and _finite(row["ratio_cpu"]) and len(row["raw_wall"]["qzo_step"]) == 2
    assert _finite(row["median_of_round_ratios"])
    # The file says what ran where: the same row, the batch's shape, the machine and the rounds.
    payload = json.loads((tmp_path / "out" / "qzo_tiny.json").read_text())
    assert payload["suite"] == "qzo-step-time" and payload["results"]["gptq"] == row
    assert payload["setup"]["batch_rows_tokens"][0] == 2 and payload["setup"]["rounds"] == 2
    assert payload["setup"]["torch_num_threads"] == 1
    _check_environment(payload["environment"])
    from benchmarks.zo_bench.report import report

    text = report(tmp_path / "out")
    assert re.search(r"\| gptq \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| <= 1.05 \|", text), text


@needs_run
@NEED_QUANT
def test_memory_quick(out):
    payload = _run("memory", out)
    assert set(payload["results"]) == {name for name, _ in memory.MEMORY_CONFIGS}
    for row in payload["results"].values():
        assert _finite(row["peak_rss_during_steps_bytes"]) and _finite(row["rss_after_load_bytes"])
    assert set(payload["ratios"]) >= {
        "adamw_over_mezo",
        "mezo_over_inference_fp32",
        "mezo_fp32_over_qzo_nf4_int4",
        "mezo_fp32_over_qzo_gptq_int4",
        "qzo_nf4_over_inference_nf4",
    }
    assert all(_finite(v) for v in payload["ratios"].values())
    assert all("met" in g and "value" in g for g in payload["goals"].values())


@needs_run
def test_memory_worker_subprocess(tmp_path):
    """The real memory suite runs each configuration in a fresh ``memory-worker`` process."""
    config = {
        "mode": "mezo",
        "model": "fp32",
        "quick": True,
        "batch_size": 2,
        "max_length": 64,
        "steps": 1,
        "data_dir": str(RTE),
        "work": str(tmp_path),
    }
    result = memory.spawn_memory_worker(config, timeout=600)
    assert result["peak_rss_during_steps_bytes"] >= result["rss_after_load_bytes"] * 0.5
    assert result["ru_maxrss_lifetime_bytes"] > 0 and len(result["step_seconds"]) == 1


@needs_run
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


@needs_run
def test_growth_quick(out):
    payload = _run("growth", out)
    assert payload["by_size"] and payload["by_batch"]
    assert set(payload["loglog_slopes"]) >= {"step_time_vs_params", "step_time_vs_batch"}
    for row in list(payload["by_size"].values()) + list(payload["by_batch"].values()):
        assert _finite(row["step_seconds_median"]) and row["param_count"] > 0


def test_engine_quick_times_every_z_scheme_through_the_console_script(tmp_path):
    """zo-bench engine --quick: the engine's own work per step (no forward), z schemes 1, 2, 3, 5 (and 5 drawn into a
    buffer then applied by torch ops: "5f"; 5 with the C apply's AVX-512 loop for bf16: "5v"), dense and sparse, in
    fp32 and (``--dtype bfloat16``, its own file) bf16.

    Checks the harness, not the figures: every scheme of both methods timed (wall and CPU), every module reading a
    target saw its perturbed copy in both passes (the engine's hooks did the work), and one error line for a bad flag.
    """
    for dtype, name in (("float32", "engine_quick.json"), ("bfloat16", "engine_quick_bfloat16.json")):
        proc = zo_bench("engine", "--quick", "--dtype", dtype, "--out", tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        payload = json.loads((tmp_path / name).read_text())
        assert payload["suite"] == "engine" and payload["quick"] is True and payload["dtype"] == dtype
        _check_environment(payload["environment"])
        assert payload["setup"]["torch_num_threads"] == 1  # conftest's zo_bench sets OMP_NUM_THREADS=1
        assert payload["setup"]["apply_simd_level"] == counter_noise.simd_level()
        methods = payload["shapes"]["tiny"]["methods"]
        assert set(methods) == {"mezo", "sparse_mezo"}
        assert methods["mezo"]["entries"] > methods["sparse_mezo"]["entries"] > 0  # sparse: no embedding, no norms
        for row in methods.values():
            for scheme in (1, 2, 3, 5, "5f", "5v"):
                timed = row[f"scheme{scheme}"]
                assert timed["noise_config"]["scheme"] == (5 if isinstance(scheme, str) else scheme)
                assert _finite(timed["wall_seconds_median"]) and _finite(timed["cpu_seconds_median"])
                assert len(timed["cpu_seconds_all"]) == payload["setup"]["repeats"] == 1
                assert timed["modules_perturbed_per_pass"] == [timed["modules_reading_targets"]]
            assert _finite(row["ratio_cpu"]) and _finite(row["ratio_wall"]) and _finite(row["ratio_3_over_2_cpu"])
            assert _finite(row["ratio_5_over_3_cpu"]) and _finite(row["ratio_5_over_3_wall"])
            assert _finite(row["ratio_5_over_5f_cpu"]) and _finite(row["ratio_5_over_5f_wall"])
            assert _finite(row["ratio_5_over_5v_cpu"]) and _finite(row["ratio_5_over_5v_wall"])
        assert "| tiny | `sparse_mezo` |" in proc.stdout and "5 / AVX-512 loop (CPU)" in proc.stdout
    # An engine.json written before scheme 3 (the committed one, less its scheme-3 figures) still makes a table.
    from benchmarks.zo_bench.engine_cost import table

    older = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/engine.json").read_text())
    for result in older["shapes"].values():
        for row in result["methods"].values():
            for key in (
                "scheme3",
                "ratio_3_over_2_cpu",
                "ratio_3_over_2_wall",
                "scheme5",
                "ratio_5_over_3_cpu",
                "scheme5f",
            ):
                row.pop(key, None)
    assert "| - | **" in table(older)
    bad = zo_bench("engine", "--shapes", "llama-70b", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "llama-70b" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_loglog_slope_and_log_parsing():
    assert growth.loglog_slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    assert growth.loglog_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    rows = accuracy.parse_log_lines("noise\n{'eval_loss': '0.69', 'eval_accuracy': '0.5', 'step': 3}\n{'x': 'y'}\n")
    assert rows[0] == {"eval_loss": 0.69, "eval_accuracy": 0.5, "step": 3.0}


# ----------------------------------------------------------------------------------------- the console script
def test_zo_bench_runs_the_checkouts_benchmarks_from_any_directory(tmp_path):
    """The installed script finds benchmarks/ beside the (editable) zo_trainer package, wherever it is started."""
    proc = zo_bench("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for suite in ("speed", "memory", "accuracy", "growth", "study", "scale", "qzo-step-time", "report"):
        assert suite in proc.stdout, suite
    scale = zo_bench("scale", "--help", cwd=tmp_path)
    assert scale.returncode == 0 and "--points" in scale.stdout


def test_zo_bench_without_a_checkout_says_so_in_one_line(tmp_path):
    """Installed from a wheel there is no benchmarks/: exit 2 and one line saying where zo-bench runs from."""
    proc = zo_bench("speed", "--quick", cwd=tmp_path, env={"ZO_BENCH_CHECKOUT": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zo-bench: error: ") and "source checkout" in lines[0], lines
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- accuracy study
def _study(out: Path, *args: str) -> subprocess.CompletedProcess:
    return zo_bench("study", *quick_flags(out, "--nice", "0", *args))


@needs_run
@pytest.mark.slow  # ~45 s: five zo-train subprocesses on a tiny random model
def test_study_quick_end_to_end_and_resume(tmp_path):
    """zo-bench study --quick: every kind of run, one JSON each, the table and plot; a cut-short run resumes."""
    out, root = tmp_path / "results", tmp_path / "runs"
    # q_mezo first trained to 2 of its 4 steps (as if stopped at its checkpoint), then asked for again.
    short = json.dumps({"runs": [{"name": "q_mezo", "args": {"optim": "mezo", "learning_rate": 1e-4, "max_steps": 2}}]})
    proc = _study(out, "--root", str(root), "--runs", "q_mezo", "--plan", short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _study(out, "--root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = out / "rte_study"
    assert {p.name for p in study.iterdir() if p.is_dir()} == {
        "q_sparse",
        "q_mezo",
        "q_overfit",
        "q_reference",
    } | ({"q_lora_mezo"} if HAS_PEFT else set())
    assert (study / "rte_study.png").stat().st_size > 0
    assert not (study / "rte_study_gpu.png").exists()  # GPU runs get their own figure; there are none here

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
    assert ref["reference"]["ours"]["eval"][0]["eval_loss"] == pytest.approx(
        ref["reference"]["reference"]["eval"][0]["eval_loss"]
    )

    report = zo_bench("study", "--report", "--out", str(out))
    assert (
        report.returncode == 0
        and "| q_sparse | CPU | sparse_mezo |" in report.stdout
        and "Zero-shot test accuracy" in report.stdout
    )
    if not HAS_PEFT:
        return
    # the LoRA run: list flags passed as several words, an adapter saved, scored on its base model
    lora = json.loads((study / "q_lora_mezo" / "study_result.json").read_text())
    assert lora["trained"] and lora["steps_completed"] == 2 and lora["diverged"] is False
    assert "--use_peft true --lora_r 8 --lora_alpha 16" in lora["command"]
    assert "--lora_target_modules q_proj v_proj --" in lora["command"]
    assert (root / "q_lora_mezo" / "adapter_config.json").exists()
    assert not (root / "q_lora_mezo" / "config.json").exists()  # an adapter, not a full model
    assert lora["test"]["n"] == len(lora["test"]["predictions"]) == 8
    mezo = json.loads((study / "q_mezo" / "study_result.json").read_text())
    assert lora["zero_shot"]["accuracy"] == mezo["zero_shot"]["accuracy"]  # same base model, same test split

    assert "| q_lora_mezo | CPU | mezo LoRA r8 |" in report.stdout


@needs_run
@pytest.mark.skipif(not HAS_GPTQ, reason="needs gptqmodel (scripts/install_quant.sh)")
@pytest.mark.slow  # ~40 s: zo-quantize and two zo-train runs on a tiny random model
def test_study_quantizes_a_named_base_once_and_trains_qzo_on_it(tmp_path):
    """A plan entry with ``base``: zo-quantize makes the GPTQ base under the root once; qzo trains and is scored on it,
    its zero-shot is the quantized base's own, and the report labels both."""
    out, root = tmp_path / "results", tmp_path / "runs"
    plan = {
        "runs": [
            {
                "name": f"q_qzo_gptq_{i}",
                "base": "gptq4",
                "args": {"optim": "qzo", "learning_rate": 1e-4, "max_steps": 2},
            }
            for i in (0, 1)
        ]
    }
    proc = _study(out, "--root", str(root), "--plan", json.dumps(plan))
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = root / "bases" / "gptq4"
    assert json.loads((base / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert not (root / "bases" / "gptq4.partial").exists()
    assert (root / "bases" / "gptq4.log").read_text().count(" $ ") == 1  # quantized once, reused by the second run
    for i in (0, 1):
        r = json.loads((out / "rte_study" / f"q_qzo_gptq_{i}" / "study_result.json").read_text())
        assert r["trained"] and r["quantization"] == "gptq" and r["optim"] == "qzo"
        assert r["base"]["path"] == str(base) and r["base"]["command"].split()[0].endswith("zo-quantize")
        assert f"--model_name_or_path {base} " in r["command"]
        assert r["test"]["n"] == 8
    # scored zero-shot on the GPTQ base (not on the fp model the quick plan starts from): its own cache entry
    table = json.loads((root / "zero_shot.json").read_text())
    assert list(table) == [f"{base}|None|8|64"]
    report = zo_bench("study", "--report", "--out", str(out))
    assert report.returncode == 0 and "| q_qzo_gptq_0 | CPU | qzo (gptq) |" in report.stdout
    assert "Zero-shot test accuracy: the gptq base " in report.stdout


@pytest.mark.skipif(not HAS_PEFT, reason="needs peft (pip install -e '.[peft]')")
def test_study_scoring_loads_a_lora_adapter_on_its_base_model(tmp_path):
    """A --use_peft output (adapter_config.json, no config.json) is scored as PeftModel(base, adapter); the
    adapter's weights are the ones saved, so its scores differ from the base model's."""
    import torch
    from peft import PeftModel

    from benchmarks.zo_bench.factories import tiny_model_dir
    from benchmarks.zo_bench.study_scoring import is_adapter_dir, load_scored_model
    from zo_trainer.models import ModelArguments, load_model

    base_dir = str(tiny_model_dir(tmp_path))
    args = dict(model_name_or_path=base_dir, use_peft=True, lora_r=8, lora_target_modules=["q_proj", "v_proj"])
    model, _ = load_model(ModelArguments(**args), init_seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.fill_(0.05)  # lora_B starts at zero: make the adapter change the output
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    assert is_adapter_dir(str(adapter)) and not is_adapter_dir(base_dir) and not is_adapter_dir(None)

    scored, tokenizer = load_scored_model(str(adapter), args)
    base, _ = load_scored_model(base_dir, args)
    assert isinstance(scored, PeftModel) and not isinstance(base, PeftModel)
    saved = {k: v for k, v in model.state_dict().items() if ".lora_B." in k}
    loaded = scored.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())
    ids = tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(scored.eval()(ids).logits, base.eval()(ids).logits)


def test_to_argv_passes_lists_as_several_words():
    argv = common.to_argv({"use_peft": True, "lora_target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0})
    assert argv == ["--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0.0"]


def test_study_log_parsing_resumed_run(tmp_path):
    """Steps and wall-clock of a run killed after its step-20 checkpoint and resumed later."""
    log = tmp_path / "r.log"
    log.write_text(
        "\n".join(
            [
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
            ]
        )
        + "\n"
    )
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


# ----------------------------------------------------------------------------------------- one training step
@pytest.mark.parametrize(
    "optim,extra",
    [("mezo", {}), ("sparse_mezo", {"zo_sparsity": 0.8}), ("mezo", {"zo_noise": "rademacher"})],
)
def test_the_benchmarks_step_is_the_trainers_step(tmp_path, tiny_tokenizer, rte_small, optim, extra):
    """ZOStepper (what speed / memory / growth / the study time) moves the weights exactly as ZOTrainer does."""
    import torch

    from benchmarks.zo_bench.steppers import ZOStepper
    from conftest import make_tiny_llama, make_trainer, state
    from zo_trainer.data import CandidateCollator

    batch = CandidateCollator(tiny_tokenizer)([rte_small["train"][i] for i in range(4)])
    settings = dict(optim=optim, learning_rate=1e-3, zo_eps=1e-3, seed=7, **extra)
    trained, benched = make_tiny_llama(), make_tiny_llama()
    trainer = make_trainer(tmp_path, tiny_tokenizer, rte_small, trained, **settings)
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # HF's train loop sets it, and fixes sparse_mezo's thresholds:
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    stepper = ZOStepper(benched, **settings)
    for _ in range(2):
        trainer.training_step(trained, trainer._prepare_inputs(dict(batch)))
        optimizer.step()
        trainer.state.global_step += 1
        stepper.step(dict(batch))
    before, after, benched_state = state(make_tiny_llama()), state(trained), state(benched)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(after[k], benched_state[k]) for k in after)


# ----------------------------------------------------------------------------------------- import structure
def test_the_library_never_imports_the_benchmarks_or_a_program(tmp_path):
    """scripts/import_graph.py (run by CI): no import cycle, no library module importing zo_trainer.cli or benchmarks;
    and it does catch one (a copy of the package with a library module importing the benchmarks)."""
    import shutil
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = [sys.executable, str(repo / "scripts" / "import_graph.py")]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "cycles: 0" in proc.stdout and "importing a program (zo_trainer.cli, benchmarks): 0" in proc.stdout
    assert "benchmarks.zo_bench.steppers -> " in proc.stdout and "zo_trainer.step" in proc.stdout

    shutil.copytree(repo / "zo_trainer", tmp_path / "zo_trainer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "benchmarks" / "zo_bench", tmp_path / "benchmarks" / "zo_bench")
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    engine = tmp_path / "zo_trainer" / "engine.py"
    engine.write_text(engine.read_text() + "\n\ndef _timing():\n    from benchmarks.zo_bench import speed  # noqa\n")
    bad = subprocess.run(
        [*script, str(tmp_path / "zo_trainer"), str(tmp_path / "benchmarks")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert (
        "importing a program (zo_trainer.cli, benchmarks): 1\n  zo_trainer.engine -> benchmarks.zo_bench.speed"
        in bad.stdout
    )


def test_study_report_tells_gpu_runs_apart_and_plots_them_on_their_own(tmp_path):
    """Committed results of one H100 run and one CPU run: the table names each run's device, and the two kinds
    of run never share a wall-clock axis (rte_study.png holds the CPU runs, rte_study_gpu.png the GPU runs)."""
    import shutil

    from benchmarks.zo_bench.study_report import plot_studies, study_report

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "rte_study"
    for name in ("gpu_adamw_lr1e-5_500", "main_mezo_lr3e-5_s0"):
        (tmp_path / name).mkdir()
        shutil.copy(committed / name / "study_result.json", tmp_path / name)
    report = study_report(tmp_path)
    assert "| gpu_adamw_lr1e-5_500 | GPU (H100) | adamw_torch |" in report
    assert "| main_mezo_lr3e-5_s0 | CPU | mezo |" in report
    plot_studies(tmp_path)
    assert (tmp_path / "rte_study.png").stat().st_size > 0 and (tmp_path / "rte_study_gpu.png").stat().st_size > 0
    (tmp_path / "gpu_adamw_lr1e-5_500" / "study_result.json").unlink()
    (tmp_path / "rte_study_gpu.png").unlink()
    plot_studies(tmp_path)
    assert not (tmp_path / "rte_study_gpu.png").exists()


def test_overfit_table_shows_a_run_that_diverged_after_its_minimum(tmp_path):
    """gpu_overfit32_mezo_lr3e-5_2k reached 0.481 at step 624 and ended at loss ~470: the minimum alone would read
    as a success, so the table carries the final training loss and the divergence flag (committed H200 results)."""
    import shutil

    from benchmarks.zo_bench.study_report import study_report

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "rte_study"
    for name in ("gpu_overfit32_mezo_lr3e-5_2k", "gpu_overfit32_sparse_lr3e-4_2k"):
        (tmp_path / name).mkdir()
        shutil.copy(committed / name / "study_result.json", tmp_path / name)
    rows = {line.split(" | ")[0].strip("| "): line for line in study_report(tmp_path).splitlines()}
    mezo, sparse = rows["gpu_overfit32_mezo_lr3e-5_2k"], rows["gpu_overfit32_sparse_lr3e-4_2k"]
    assert " | 0.481 | 208 / 624 / None | 468 | yes |" in mezo
    assert " | 0.507 | 496 / None / None | 0.507 | no |" in sparse


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_cuda_passes_quick_times_both_schemes_through_the_console_script(tmp_path):
    """zo-bench cuda-passes --quick: the harness of the GPU passes benchmark, its kernels in Triton's interpreter on CPU
    tensors. Every (scheme, mask) configuration is timed, schemes 4-5 through the kernels and scheme 3 not; bad flags,
    and a GPU run asked for where there is none, are one line each with nothing written."""
    proc = zo_bench("cuda-passes", "--quick", "--repeats", 1, "--out", tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "cuda_passes_quick.json").read_text())
    assert payload["suite"] == "cuda-passes" and payload["quick"] is True and payload["setup"]["interpreted"]
    _check_environment(payload["environment"])
    rows = {(row["scheme"], row["masked"]): row for row in payload["rows"]}
    assert set(rows) == {(scheme, masked) for scheme in (3, 4, 5) for masked in (False, True)}
    for (scheme, _), row in rows.items():
        assert row["fused"] is (scheme != 3)
        assert _finite(row["perturb_pass_ms"]) and _finite(row["update_ms"]) and len(row["update_all_ms"]) == 1
    table_lines = [line for line in proc.stdout.splitlines() if line.startswith("| update, masked |")]
    assert len(table_lines) == 1 and len(table_lines[0].split("|")) == 8
    bad = zo_bench("cuda-passes", "--layers", 0, "--out", tmp_path / "bad", timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--layers" in bad.stderr
    if not torch.cuda.is_available():
        no_gpu = zo_bench("cuda-passes", "--out", tmp_path / "none", timeout=120)
        assert no_gpu.returncode == 2 and "needs a CUDA GPU" in no_gpu.stderr and "Traceback" not in no_gpu.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "none").exists()
