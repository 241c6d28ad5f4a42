"""``zo-bench scale``: real Llama shapes built without real weights; the --quick journey on a tiny shape.

The figures of a tiny model mean nothing (imports dominate the RSS); these tests check the pipeline (fresh worker
processes, JSON keys, positive numbers, plot) and the shapes' parameter counts against the public models.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks.zo_bench import scale as bench_scale
from conftest import zo_bench

HAS_DEPS = all(importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "matplotlib", "psutil"))
NEED_DEPS = pytest.mark.skipif(not HAS_DEPS, reason="needs bitsandbytes, matplotlib and psutil")


def test_shapes_have_the_public_parameter_counts():
    # Llama-2-7b-hf and Llama-2-13b-hf as published (safetensors metadata), TinyLlama-1.1B, open_llama_3b.
    assert bench_scale.param_count(bench_scale.SCALE_SHAPES["7b"]) == 6_738_415_616
    assert bench_scale.param_count(bench_scale.SCALE_SHAPES["13b"]) == 13_015_864_320
    assert bench_scale.param_count(bench_scale.SCALE_SHAPES["1b"]) == 1_100_048_384
    assert bench_scale.param_count(bench_scale.SCALE_SHAPES["3b"]) == 3_426_473_600


@NEED_DEPS
def test_nf4_build_never_holds_full_precision_projections():
    shape = bench_scale.SCALE_SHAPES["tiny"]
    model = bench_scale.build_model(shape, "nf4")
    import bitsandbytes as bnb

    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * shape["num_hidden_layers"]
    assert all(m.weight.dtype == torch.uint8 and m.quant_state.absmax.dtype == torch.float32 for m in quantized)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    dense = bench_scale.build_model(shape, "bf16")
    assert sum(p.numel() for p in dense.parameters()) == bench_scale.param_count(shape)
    ids = torch.randint(3, shape["vocab_size"], (1, 16))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


@NEED_DEPS
def test_quick_scale_through_the_console_script(tmp_path):
    out = tmp_path / "results"
    proc = zo_bench("scale", "--quick", "--points", "inference_nf4,qzo_nf4", "--out", out, "--threads", 1, "--nice", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "scale_quick.json").read_text())
    assert payload["suite"] == "scale" and payload["environment"]["git"] and len(payload["load_average"]) == 3
    assert set(payload["points"]) == {"tiny/inference_nf4", "tiny/qzo_nf4"}
    for row in payload["points"].values():
        assert "error" not in row, row.get("error")
        for key in ("build_peak_rss_bytes", "rss_after_build_bytes", "step_peak_rss_bytes", "stored_bytes"):
            assert row[key] > 0, key
        assert all(t > 0 for t in row["step_seconds"])
    assert payload["points"]["tiny/qzo_nf4"]["zo_targets"] == 7 * bench_scale.SCALE_SHAPES["tiny"]["num_hidden_layers"]
    assert payload["ratios"]["tiny"]["qzo_nf4_peak_over_inference"] > 0
    assert {g["goal"].split()[0] for g in payload["goals"]} >= {"13b", "7b"}
    assert (out / "scale_quick.png").stat().st_size > 0
    assert "13b qzo int4 peak RSS < 12 GB: not measured" in proc.stdout


def test_unknown_size_is_one_usage_line(tmp_path):
    proc = zo_bench("scale", "--sizes", "99b", "--out", tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "99b" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_scale_is_listed_in_zo_bench_help():
    from benchmarks.zo_bench.cli import build_parser

    assert "scale" in build_parser().format_help()
