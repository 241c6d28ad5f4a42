"""``zo-bench``: benchmarks of the ZO engine (speed, memory, accuracy, growth), written as JSON + PNG.

    zo-bench speed    [--quick] [--out benchmarks/results]   # ZO step time / two plain forwards
    zo-bench memory   [--quick] ...                          # peak RSS, one fresh subprocess per config
    zo-bench accuracy [--quick] ...                          # RTE accuracy vs steps (zo-train subprocesses)
    zo-bench growth   [--quick] ...                          # step time and peak RSS vs model size / batch
    zo-bench all      [--quick] ...
    zo-bench report   [--out benchmarks/results]             # markdown tables from the JSONs
    zo-bench study    [--quick] [--runs a,b] [--list] [--report]  # the RTE accuracy study (benchmarks/zo_bench/study.py)
    zo-bench scale    [--quick] [--sizes 7b] ...             # real Llama shapes (own flags: zo-bench scale --help)
    zo-bench qzo-step-time [--batch 16] [--out DIR] ...      # qzo through ZOTrainer.training_step (own flags)
    zo-bench engine   [--quick] [--shapes smollm2-135m] ...  # the engine's own work per step, z scheme 1 vs 2
    zo-bench cuda-passes [--layers 32] [--quick]             # GPU: perturbed copy / update passes, z scheme 3 vs 4
    python -m benchmarks.zo_bench memory-worker --config '{...}'   # internal: one memory measurement

Every figure is a ratio of two quantities measured in the same run (the CPU is shared, so absolute
times are noisy); measurements are interleaved and repeated and the median is reported. ``--quick``
runs everything on a tiny random model (CI-sized). Every JSON carries the machine, the library versions
and the git commit (``environment()``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from zo_trainer.cli.errors import run_console_script, usage_errors_in_one_line

from .accuracy import run_accuracy
from .common import default_rte_dir, log_line
from .growth import run_growth
from .memory import MEMORY_RESULT_PREFIX, memory_worker, run_memory
from .report import replot, report
from .speed import run_speed
from .worker import print_result

SUITES = ("speed", "memory", "accuracy", "growth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "suite",
        choices=[*SUITES, "all", "report", "study", "scale", "qzo-step-time", "engine", "cuda-passes", "memory-worker"],
    )
    p.add_argument("--quick", action="store_true", help="tiny random model, CI-sized (< 60 s for all suites)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG files")
    p.add_argument(
        "--data_dir",
        default=default_rte_dir(),
        help="RTE jsonl folder (default $ZO_BENCH_RTE, else ../shared/... beside the checkout)",
    )
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
    return run_console_script("zo-bench", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    if raw_argv[:1] == ["scale"]:  # real model shapes, own flags: benchmarks/zo_bench/scale.py
        from .scale import build_parser as scale_parser
        from .scale import main_scale

        scale_args = scale_parser()
        usage_errors_in_one_line(scale_args, "zo-bench scale")
        return main_scale(raw_argv[1:], parser=scale_args)
    if raw_argv[:1] == ["engine"]:  # the engine alone, z scheme 1 vs 2, own flags: engine_cost.py
        from .engine_cost import build_parser as engine_parser
        from .engine_cost import main_engine_cost

        engine_args = engine_parser()
        usage_errors_in_one_line(engine_args, "zo-bench engine")
        return main_engine_cost(raw_argv[1:], parser=engine_args)
    if raw_argv[:1] == ["cuda-passes"]:  # scheme 3 vs 4 passes on a GPU, own flags: cuda_passes.py
        from .cuda_passes import build_parser as passes_parser
        from .cuda_passes import main_cuda_passes

        passes_args = passes_parser()
        usage_errors_in_one_line(passes_args, "zo-bench cuda-passes")
        return main_cuda_passes(raw_argv[1:], parser=passes_args)
    if raw_argv[:1] == ["qzo-step-time"]:  # through ZOTrainer.training_step, own flags: speed.py
        from .speed import main_trainer_step, trainer_step_parser

        step_args = trainer_step_parser()
        usage_errors_in_one_line(step_args, "zo-bench qzo-step-time")
        return main_trainer_step(raw_argv[1:], parser=step_args)
    parser = build_parser()
    usage_errors_in_one_line(parser, "zo-bench")
    args = parser.parse_args(argv)
    if args.suite == "memory-worker":
        print_result(MEMORY_RESULT_PREFIX, memory_worker(json.loads(args.config)))
        return 0
    if args.suite == "study":
        from .study import main_study

        return main_study(
            Path(args.out),
            args.quick,
            args.runs,
            args.root,
            args.threads,
            args.nice,
            args.list,
            args.report,
            plan_file=args.plan,
            data_dir=args.data_dir,
        )
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
            run_speed(
                out,
                args.quick,
                args.data_dir,
                repeats=args.repeats,
                batch_size=args.batch_size,
                max_length=args.max_length,
            )
        elif suite == "memory":
            run_memory(out, args.quick, args.data_dir, batch_size=args.batch_size, max_length=args.max_length)
        elif suite == "accuracy":
            run_accuracy(
                out,
                args.quick,
                args.data_dir,
                log_dir=Path(args.log_dir) if args.log_dir else None,
                budget_minutes=args.budget_minutes,
                plan_overrides=json.loads(args.plan) if args.plan else None,
            )
        elif suite == "growth":
            run_growth(
                out,
                args.quick,
                args.data_dir,
                repeats=args.repeats,
                sizes=args.sizes.split(",") if args.sizes else None,
                batch_sizes=[int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None,
                size_batch=args.batch_size,
                batch_model=args.batch_model,
                max_length=args.max_length,
            )
    log_line(f"done in {time.time() - t0:.1f} s")
    return 0
