"""QZO step time vs two plain forward passes of the same int4 model (SmolLM2-135M, RTE, CPU).

    GPTQMODEL_CPU_WORKERS=2 TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/qzo_step_time.py \
        --gptq_dir <GPTQ group-64 dir> [--batch 8 --max_length 128 --steps 5]

A QZO step is ``ZOTrainer.training_step`` (forward at +eps z and at -eps z on the scales, under the engine's
hooks) plus ``ZOOptimizer.step()`` (regenerate z, update the scales, clamp > 0). The reference is
``candidate_loss`` twice on the same batch, same model, no hooks active. Both are timed interleaved (after one
warm-up of each) so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gptq_dir", required=True)
    p.add_argument("--data_dir", default="/work/shared/data/superglue/rte")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backends", default="gptq,nf4")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    from zo_trainer import ZOTrainer, ZOTrainingArguments
    from zo_trainer.data import CandidateCollator, candidate_loss, load_task_splits, prepare_dataset
    from zo_trainer.models import ensure_default_model, ensure_pad_token
    from zo_trainer.quant import load_quantized
    from zo_trainer.tasks import get_task

    base = str(ensure_default_model())
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(base))
    tokenizer.padding_side = "left"
    task = get_task("rte")
    splits = load_task_splits(task, a.data_dir, num_train=a.batch, num_dev=4, num_eval=4, data_seed=0)
    train = prepare_dataset(tokenizer, task, splits["train"], a.max_length)
    batch = CandidateCollator(tokenizer)([train[i] for i in range(a.batch)])
    print(f"batch {tuple(batch['input_ids'].shape)} (rows x tokens), torch threads {torch.get_num_threads()}", flush=True)

    results = {}
    for kind in a.backends.split(","):
        model = load_quantized(a.gptq_dir if kind == "gptq" else base, kind)
        args = ZOTrainingArguments(output_dir="/tmp/qzo_bench_out", optim="qzo", learning_rate=1e-6,
                                   report_to="none", disable_tqdm=True)
        trainer = ZOTrainer(model=model, args=args, processing_class=tokenizer,
                            data_collator=CandidateCollator(tokenizer))
        optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by HF's train loop otherwise
        inputs = trainer._prepare_inputs(dict(batch))

        def qzo_step():
            trainer.training_step(model, inputs)
            optimizer.step()
            trainer.state.global_step += 1

        def two_forwards():
            model.eval()
            with torch.no_grad():
                candidate_loss(model, inputs)
                candidate_loss(model, inputs)

        times = {"qzo_step": [], "two_forwards": []}
        cpu = {"qzo_step": [], "two_forwards": []}  # process CPU seconds: robust to other load at 1 thread
        qzo_step(), two_forwards()  # warm-up
        for _ in range(a.steps):
            for name, fn in (("qzo_step", qzo_step), ("two_forwards", two_forwards)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        q, f = statistics.mean(times["qzo_step"]), statistics.mean(times["two_forwards"])
        qm, fm = statistics.median(times["qzo_step"]), statistics.median(times["two_forwards"])
        qc, fc = statistics.mean(cpu["qzo_step"]), statistics.mean(cpu["two_forwards"])
        results[kind] = {"qzo_step_mean_s": q, "two_forwards_mean_s": f, "ratio_mean": q / f,
                         "qzo_step_median_s": qm, "two_forwards_median_s": fm, "ratio_median": qm / fm,
                         "qzo_step_cpu_mean_s": qc, "two_forwards_cpu_mean_s": fc, "ratio_cpu": qc / fc,
                         "raw_wall": times, "raw_cpu": cpu, "threads": torch.get_num_threads(),
                         "loadavg_after": os.getloadavg()}
        print(kind, json.dumps(results[kind]), flush=True)
        trainer.zo_engine.remove()
        del trainer, model, optimizer
    print(json.dumps({k: {kk: v for kk, v in r.items() if not kk.startswith("raw")} for k, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
