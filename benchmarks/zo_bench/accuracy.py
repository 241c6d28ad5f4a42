"""Accuracy suite: RTE accuracy vs steps, a short mezo lr sweep then one run per method (``zo-train`` subprocesses;
curves from the trainer's log history) (``zo-bench accuracy``)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    SCHEMA_VERSION,
    default_rte_dir,
    dict_line,
    log_line,
    median,
    progress,
    run_args,
    to_argv,
    write_json,
)
from .environment import environment
from .factories import tiny_model_dir
from .plots import plot_accuracy


def parse_log_lines(text: str) -> list[dict[str, float]]:
    """Dict lines printed by HF's PrinterCallback (values may be strings) -> floats."""
    return [row for line in text.splitlines() if (row := dict_line(line)) is not None]


def _train_argv(run: dict[str, Any], common: dict[str, Any], output_dir: Path) -> list[str]:
    return to_argv(run_args(run, common)) + ["--output_dir", str(output_dir)]


def _run_train(name: str, argv: list[str], log_path: Path, in_process: bool, timeout: float | None) -> dict[str, Any]:
    """Run zo-train; returns log_history (trainer_state.json, else parsed from the log) and final metrics."""
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    t0 = time.time()
    status = "ok"
    if in_process:
        from zo_trainer.cli.train import run as train_run

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
        history = parse_log_lines(log_text)
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
        for row in parse_log_lines(log_text):
            metrics.update({k: v for k, v in row.items() if k.startswith(("test_", "zero_shot_"))})
    return {
        "name": name,
        "argv": argv,
        "status": status,
        "wall_seconds": time.time() - t0,
        "log_history": history,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def _curve(history: list[dict], key: str = "eval_accuracy") -> list[tuple[int, float]]:
    return [(int(row.get("step", 0)), float(row[key])) for row in history if key in row]


def _common_args(
    data_dir: str,
    model_dir: str | None,
    *,
    num_train: int,
    num_dev: int,
    num_eval: int,
    max_length: int,
    train_batch_size: int,
    eval_batch_size: int,
    logging_steps: int,
    **extra: Any,
) -> dict[str, Any]:
    """zo-train arguments every accuracy run shares: RTE sampled as MeZO does (seed 0, data seed 0), a constant lr, no
    checkpoints; ``extra`` adds or overrides arguments."""
    return dict(
        task="rte",
        data_dir=data_dir,
        num_train=num_train,
        num_dev=num_dev,
        num_eval=num_eval,
        max_length=max_length,
        per_device_train_batch_size=train_batch_size,
        per_device_eval_batch_size=eval_batch_size,
        lr_scheduler_type="constant",
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        model_name_or_path=model_dir,
        **extra,
    )


def accuracy_plan(quick: bool, data_dir: str, model_dir: str | None) -> dict[str, Any]:
    if quick:
        common = _common_args(
            data_dir,
            model_dir,
            num_train=8,
            num_dev=4,
            num_eval=4,
            max_length=64,
            train_batch_size=2,
            eval_batch_size=4,
            logging_steps=1,
            max_steps=2,
            eval_strategy="steps",
            eval_steps=1,
            eval_on_start=True,
        )
        sweep_lrs, sweep_eps, sweep_steps = [1e-5], [1e-3], 1
        main_steps, eval_steps, min_eval_steps = 2, 1, 1
        lrs = {"mezo": None, "sparse_mezo": 1e-5, "qzo": 1e-5}
    else:
        common = _common_args(
            data_dir,
            model_dir,
            num_train=500,
            num_dev=64,
            num_eval=277,
            max_length=128,
            train_batch_size=8,
            eval_batch_size=16,
            logging_steps=5,
        )
        sweep_lrs, sweep_eps, sweep_steps = [1e-6, 1e-5, 1e-4], [1e-3], 15
        main_steps, eval_steps, min_eval_steps = 200, 50, 10
        lrs = {"mezo": None, "sparse_mezo": None, "qzo": None}
    return dict(
        common=common,
        sweep_lrs=sweep_lrs,
        sweep_eps=sweep_eps,
        sweep_steps=sweep_steps,
        main_steps=main_steps,
        eval_steps=eval_steps,
        min_eval_steps=min_eval_steps,
        lrs=lrs,
    )


def run_accuracy(
    out: Path,
    quick: bool,
    data_dir: str | None,
    log_dir: Path | None = None,
    budget_minutes: float | None = None,
    plan_overrides: dict | None = None,
) -> dict:
    env = environment()
    data_dir = data_dir or default_rte_dir()
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
        "suite": "accuracy",
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "environment": env,
        "setup": {
            "common_args": common,
            "plan": {k: v for k, v in plan.items() if k != "common"},
            "protocol": "MeZO's: num_train train examples and num_dev dev examples sampled from RTE train "
            "(data_seed 0); test = RTE validation (num_eval). Sweep judged on final dev loss "
            "(then dev accuracy). One seed (seed 0).",
            "budget_minutes": budget_minutes,
        },
        "sweep": [],
        "runs": {},
        "zero_shot": {},
    }

    def remaining():
        return None if deadline is None else max(60.0, deadline - time.time())

    def save():
        write_json(result_path, payload)

    # --- sweep (mezo; lr x eps; short) ---
    sweep_runs = [(lr, eps) for lr in plan["sweep_lrs"] for eps in plan["sweep_eps"]]
    for lr, eps in progress(sweep_runs, desc="accuracy sweep"):
        name = f"sweep_mezo_lr{lr:g}_eps{eps:g}"
        run = {
            "args": dict(
                optim="mezo",
                learning_rate=lr,
                zo_eps=eps,
                max_steps=plan["sweep_steps"],
                eval_strategy="steps",
                eval_steps=plan["sweep_steps"],
                do_eval=False,
                do_train=True,
            )
        }
        argv = _train_argv(run, common, work / name)
        res = _run_train(name, argv, log_dir / f"accuracy_{name}.log", in_process=quick, timeout=remaining())
        dev = [row for row in res["log_history"] if "eval_loss" in row]
        train_rt = res["metrics"].get("train_runtime")
        eval_rt = sum(row.get("eval_runtime", 0.0) for row in res["log_history"])
        payload["sweep"].append(
            {
                "optim": "mezo",
                "learning_rate": lr,
                "zo_eps": eps,
                "steps": plan["sweep_steps"],
                "status": res["status"],
                "wall_seconds": res["wall_seconds"],
                "seconds_per_step": (train_rt - eval_rt) / plan["sweep_steps"] if train_rt else None,
                "dev_eval_seconds": eval_rt or None,
                "dev_loss": dev[-1]["eval_loss"] if dev else None,
                "dev_accuracy": dev[-1].get("eval_accuracy") if dev else None,
                "train_loss_history": _curve(res["log_history"], "loss"),
            }
        )
        shutil.rmtree(work / name, ignore_errors=True)
        save()
    ok = [s for s in payload["sweep"] if s["dev_loss"] is not None and math.isfinite(s["dev_loss"])]
    best_lr = min(ok, key=lambda s: (s["dev_loss"], -(s["dev_accuracy"] or 0)))["learning_rate"] if ok else 1e-6
    payload["sweep_best"] = (
        {"learning_rate": best_lr, "criterion": "lowest final dev loss"}
        if ok
        else {"learning_rate": None, "criterion": "no sweep run: learning rates from plan['lrs']"}
    )

    # --- main runs, same data sample, same budget: steps fitted to the remaining wall budget ---
    main_steps, eval_steps = plan["main_steps"], plan["eval_steps"]
    per_step = median(s["seconds_per_step"] for s in payload["sweep"] if s.get("seconds_per_step"))
    per_dev = median(s["dev_eval_seconds"] for s in payload["sweep"] if s.get("dev_eval_seconds"))
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
        payload["setup"]["fitted_budget"] = {
            "seconds_per_step_mezo": per_step,
            "dev_eval_seconds": per_dev,
            "main_steps": main_steps,
            "eval_steps": eval_steps,
        }
        log_line(f"accuracy: {per_step:.1f} s/step, dev eval {per_dev:.0f} s -> main runs of {main_steps} steps")
    payload["setup"]["main_steps"], payload["setup"]["eval_steps"] = main_steps, eval_steps
    main = {
        "mezo": dict(optim="mezo", eval_zero_shot=True),
        "sparse_mezo": dict(optim="sparse_mezo", zo_sparsity=0.8),
        "qzo_nf4": dict(optim="qzo", quantization="nf4", eval_zero_shot=True),
    }
    if plan.get("runs"):  # a subset, e.g. to run one method in a second process
        main = {k: v for k, v in main.items() if k in plan["runs"]}
    for i, (name, args) in enumerate(progress(list(main.items()), desc="accuracy runs")):
        timeout = None if deadline is None else min(remaining(), 1.25 * remaining() / (len(main) - i))
        lr = plan["lrs"].get(args["optim"]) or best_lr
        train_args = dict(
            args,
            learning_rate=lr,
            zo_eps=plan["sweep_eps"][0],
            max_steps=main_steps,
            eval_strategy="steps",
            eval_steps=eval_steps,
            eval_on_start=True,
            do_train=True,
            do_eval=True,
        )  # eval_strategy alone turns do_eval on and do_train off
        argv = _train_argv({"args": train_args}, common, work / name)
        res = _run_train(name, argv, log_dir / f"accuracy_{name}.log", in_process=quick, timeout=timeout)
        payload["runs"][name] = {
            "args": train_args,
            "status": res["status"],
            "wall_seconds": res["wall_seconds"],
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
    plot_accuracy(out / f"accuracy{suffix}.png", payload)
    shutil.rmtree(work, ignore_errors=True)
    log_line(f"accuracy -> {result_path}")
    return payload
