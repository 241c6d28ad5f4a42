"""``zo-bench study``: the RTE accuracy study (issue 10), a list of named ``zo-train`` runs.

    zo-bench study --list                                   # the plan, in priority order, with what is done
    zo-bench study --runs sweep_sparse_lr1e-3,main_sparse   # run these (resuming any that were cut short)
    zo-bench study --report                                 # README table + plots from the committed results
    zo-bench study --quick --out /tmp/q                     # the whole harness on a tiny random model (< 60 s)

Each run is one ``zo-train`` subprocess (niced, ``--threads`` torch threads) with its own ``output_dir``
under ``--root`` (default ``out/study``, gitignored) and a log whose lines carry the wall-clock time.
Checkpoints every ``save_steps`` (``save_total_limit 1``): a run that is killed is resumed from its last
complete checkpoint the next time it is asked for. A run counts as trained when its
``trainer_state.json`` reaches ``max_steps`` (the exit code is not trusted). The test accuracy is not
taken from ``zo-train``: the harness scores the saved model itself on the test split (the 277 RTE
validation examples), keeping per-example predictions for a 95% bootstrap interval, and scores the base
model once for the zero-shot rate. ``<root>/<run>/study_result.json`` and ``zo_trajectory.json`` are
copied to ``<out>/rte_study/<run>/``, the folder that is committed.

Two special kinds of run tell "slow" from "broken": ``overfit`` runs (32 fixed training examples; the
training loss, averaged over each epoch, must drop well below ln 2; the step where it does is reported)
and ``reference`` runs (our ``mezo`` step and MeZO's own four-pass scheme, in one process, on the same
batches with the same lr/eps/steps; dev-loss curves side by side).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LN2 = math.log(2)
DIVERGENCE_FACTOR = 3.0  # a training loss above 3 ln 2 (or non-finite) marks a run as diverged
RTE_DIR = "/work/shared/data/superglue/rte"
STUDY_DIR = "rte_study"

COMMON: dict[str, Any] = dict(
    task="rte", data_dir=RTE_DIR, num_train=1000, num_dev=100, num_eval=277, max_length=128,
    per_device_train_batch_size=4, per_device_eval_batch_size=16, lr_scheduler_type="constant", zo_eps=1e-3,
    logging_steps=10, eval_strategy="steps", eval_steps=100, save_strategy="steps", save_steps=100,
    save_total_limit=1, seed=0, data_seed=0, disable_tqdm=True, report_to="none", do_train=True,
    do_eval=False,  # the harness scores the test split itself (per-example predictions)
)
# 32 fixed examples, batch 4: the training loss logged every 8 steps is the mean over exactly one epoch.
OVERFIT: dict[str, Any] = dict(num_train=32, num_dev=4, per_device_train_batch_size=4, logging_steps=8,
                               eval_strategy="no", save_steps=100)

# The plan, most informative first. Settings in "args" override COMMON. See benchmarks/results/rte_study/PLAN.md.
PLAN: list[dict[str, Any]] = [
    # LR sweep, sparse_mezo above the 1e-4 that is stable but flat (issue 10)
    dict(name="sweep_sparse_lr1e-3", args=dict(optim="sparse_mezo", zo_sparsity=0.8, learning_rate=1e-3, max_steps=300,
                                                eval_on_start=True)),
    dict(name="sweep_sparse_lr3e-4", args=dict(optim="sparse_mezo", zo_sparsity=0.8, learning_rate=3e-4, max_steps=300)),
    # slow or broken? 32 fixed examples, training loss must go well below ln 2
    # (lr 1e-4: at 3e-4 and 1e-3 the sweeps' update fraction collapses as weights leave the fixed-threshold mask)
    dict(name="overfit32_sparse_lr1e-4", kind="overfit",
         args=dict(OVERFIT, optim="sparse_mezo", zo_sparsity=0.8, learning_rate=1e-4, max_steps=300)),
    dict(name="overfit32_mezo_lr3e-5", kind="overfit", args=dict(OVERFIT, optim="mezo", learning_rate=3e-5, max_steps=300)),
    dict(name="overfit32_adamw_lr5e-5", kind="overfit",
         args=dict(OVERFIT, optim="adamw_torch", learning_rate=5e-5, max_steps=64)),
    # mezo: largest stable lr with a decaying schedule (constant 1e-4 gained by step 100, then diverged)
    dict(name="sweep_mezo_lr1e-4_linear", args=dict(optim="mezo", learning_rate=1e-4, max_steps=300,
                                                    lr_scheduler_type="linear")),
    # main runs (>= 1000 steps), lr from the sweeps; 2 seeds for mezo and sparse_mezo
    dict(name="main_sparse_lr3e-4_s0", args=dict(optim="sparse_mezo", zo_sparsity=0.8, learning_rate=3e-4, max_steps=1000)),
    dict(name="main_mezo_lr3e-5_s0", args=dict(optim="mezo", learning_rate=3e-5, max_steps=1000)),
    dict(name="adamw_lr1e-5_500", args=dict(optim="adamw_torch", learning_rate=1e-5, max_steps=500, lr_scheduler_type="linear",
                                            eval_steps=125, save_steps=125)),
    dict(name="main_sparse_lr3e-4_s1", args=dict(optim="sparse_mezo", zo_sparsity=0.8, learning_rate=3e-4, max_steps=1000, seed=1)),
    dict(name="main_mezo_lr3e-5_s1", args=dict(optim="mezo", learning_rate=3e-5, max_steps=1000, seed=1)),
    dict(name="reference_mezo_lr1e-4_100", kind="reference",  # lr 1e-4: the dev loss moves in 100 steps (issue 10)
         args=dict(optim="mezo", learning_rate=1e-4, max_steps=100, eval_steps=50)),
    dict(name="reference_mezo_lr3e-5", kind="reference", args=dict(optim="mezo", learning_rate=3e-5, max_steps=300)),
    dict(name="main_qzo_nf4", args=dict(optim="qzo", quantization="nf4", learning_rate=1e-4, max_steps=1000)),
]


def quick_plan(model_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same kinds of run on a tiny random model, a few steps each (CI-sized)."""
    common = dict(COMMON, model_name_or_path=model_dir, num_train=8, num_dev=4, num_eval=8, max_length=64,
                  per_device_train_batch_size=2, per_device_eval_batch_size=4, logging_steps=1, eval_steps=2,
                  save_steps=2)
    plan = [
        dict(name="q_sparse", args=dict(optim="sparse_mezo", learning_rate=1e-3, max_steps=4, eval_on_start=True)),
        dict(name="q_mezo", args=dict(optim="mezo", learning_rate=1e-4, max_steps=4)),
        dict(name="q_overfit", kind="overfit", args=dict(optim="adamw_torch", learning_rate=1e-2, max_steps=12, num_train=4,
                                                         per_device_train_batch_size=4, logging_steps=1, eval_strategy="no")),
        dict(name="q_reference", kind="reference", args=dict(optim="mezo", learning_rate=1e-4, max_steps=2)),
    ]
    return common, plan


# =====================================================================================================
# running one zo-train run (resumable)
# =====================================================================================================
def run_args(run: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    args = dict(common)
    args.update(run.get("args", {}))
    return {k: v for k, v in args.items() if v is not None}


def to_argv(args: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for k, v in args.items():
        argv += [f"--{k}", ("true" if v else "false") if isinstance(v, bool) else str(v)]
    return argv


def _global_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint with a readable trainer_state.json (HF writes it last: others were cut short)."""
    best = None
    for ckpt in output_dir.glob("checkpoint-*"):
        step = _global_step(ckpt)
        if step is not None and (best is None or step > best[0]):
            best = (step, ckpt)
    return best[1] if best else None


def is_trained(output_dir: Path, max_steps: int) -> bool:
    step = _global_step(output_dir)
    return step is not None and step >= max_steps and any(output_dir.glob("*.safetensors"))


def zo_train_exe() -> list[str]:
    exe = Path(sys.executable).with_name("zo-train")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zo_trainer.train"]


def train(run: dict[str, Any], args: dict[str, Any], root: Path, threads: int = 1, nice: int = 10) -> dict[str, Any]:
    """Train ``run`` to max_steps (resuming from its last checkpoint); the log gets one timestamp per line."""
    name = run["name"]
    output_dir = root / name
    log_path = root / f"{name}.log"
    if is_trained(output_dir, int(args["max_steps"])):
        return {"trained": True, "rc": None}
    argv = to_argv(args) + ["--output_dir", str(output_dir)]
    ckpt = last_checkpoint(output_dir) if output_dir.exists() else None
    if ckpt is not None:
        if "--eval_on_start" in argv:  # the step-0 evaluation is already in the log
            i = argv.index("--eval_on_start")
            del argv[i:i + 2]
        argv += ["--resume_from_checkpoint", str(ckpt)]
    cmd = zo_train_exe() + argv
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"{time.time():.1f} $ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(f"{time.time():.1f} {line}")
            log.flush()
        rc = proc.wait()
    return {"trained": is_trained(output_dir, int(args["max_steps"])), "rc": rc}


# =====================================================================================================
# reading a run's log: values with their step and wall-clock
# =====================================================================================================
_CKPT_RE = re.compile(r"--resume_from_checkpoint\s+\S*checkpoint-(\d+)")


def _dict_line(text: str) -> dict[str, float] | None:
    import ast

    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        d = ast.literal_eval(text)
    except (ValueError, SyntaxError):
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


def parse_log(log_path: Path, logging_steps: int, eval_steps: int, max_steps: int) -> dict[str, Any]:
    """Train and eval points of a (possibly resumed) run's timestamped log.

    HF's printed dicts carry no step: within a segment (one zo-train invocation) the k-th training log is
    step s0 + k·logging_steps and the j-th evaluation s0 + j·eval_steps (s0: the resumed checkpoint's step;
    an evaluation at step 0 when the first segment started with one). A resumed segment's wall-clock
    continues from the time the previous segments had reached s0, so the steps redone after a kill and
    the time the run was stopped are not counted; nor are pauses listed in ``<log>.pauses``.
    """
    # Pauses (SIGSTOP/SIGCONT, e.g. while a timing ran on the same cores): "<start unix> <end unix>" lines in
    # <log>.pauses; they are not counted as training wall-clock.
    pause_file = log_path.with_name(log_path.name + ".pauses")
    pauses = [tuple(map(float, line.split()[:2])) for line in pause_file.read_text().splitlines()
              if len(line.split()) >= 2] if pause_file.exists() else []

    def paused(t0: float, t1: float) -> float:
        return sum(max(0.0, min(t1, b) - max(t0, a)) for a, b in pauses)

    segments: list[dict[str, Any]] = []
    for raw in log_path.read_text(errors="replace").splitlines():
        ts, _, text = raw.partition(" ")
        try:
            t = float(ts)
        except ValueError:
            continue
        if text.startswith("$ "):
            m = _CKPT_RE.search(text)
            segments.append(dict(t0=t, s0=int(m.group(1)) if m else 0, command=text[2:],
                                 eval_on_start="--eval_on_start true" in text, rows=[]))
        elif segments:
            row = _dict_line(text)
            if row is not None:
                segments[-1]["rows"].append((t, row))
    train_pts: dict[int, dict] = {}
    eval_pts: dict[int, dict] = {}
    offset_of: list[float] = []
    for seg in segments:
        # wall-clock already spent to reach s0 in earlier segments
        before = [p for p in list(train_pts.values()) + list(eval_pts.values()) if p["step"] <= seg["s0"]]
        offset = max((p["wall_seconds"] for p in before), default=0.0) if seg["s0"] else 0.0
        offset_of.append(offset)
        k = j = 0
        eval_at_start = seg["eval_on_start"] and seg["s0"] == 0
        for t, row in seg["rows"]:
            wall = offset + t - seg["t0"] - paused(seg["t0"], t)
            if "eval_loss" in row:
                step = min(j * eval_steps if eval_at_start else seg["s0"] + (j + 1) * eval_steps, max_steps)
                j += 1
                eval_pts[step] = dict(row, step=step, wall_seconds=wall)
            elif "loss" in row and "train_runtime" not in row:
                k += 1
                step = min(seg["s0"] + k * logging_steps, max_steps)
                train_pts[step] = dict(row, step=step, wall_seconds=wall)
            elif "train_runtime" in row:
                seg["train_runtime"] = row["train_runtime"]
    return {"segments": [dict(command=s["command"], resumed_from_step=s["s0"], started_unix=s["t0"],
                              wall_offset_seconds=o) for s, o in zip(segments, offset_of)],
            "train": [train_pts[s] for s in sorted(train_pts)], "eval": [eval_pts[s] for s in sorted(eval_pts)]}


# =====================================================================================================
# scoring a model on the test split (per-example predictions) and the bootstrap interval
# =====================================================================================================
def score_model(model_path: str | None, args: dict[str, Any], split: str = "eval") -> dict[str, Any]:
    """Candidate scores of every example of ``split`` ("eval" = the test set, "train", "dev")."""
    import torch

    from .data import (
        CandidateCollator,
        candidate_loss,
        load_task_splits,
        prepare_dataset,
    )
    from .tasks import get_task
    from .models import ModelArguments, load_model

    task = get_task(args["task"])
    splits = load_task_splits(task, args.get("data_dir"), num_train=int(args["num_train"]), num_dev=int(args["num_dev"]),
                              num_eval=int(args["num_eval"]), data_seed=int(args.get("data_seed", args.get("seed", 0))))
    model, tokenizer = load_model(ModelArguments(model_name_or_path=model_path, quantization=args.get("quantization")))
    model.eval()
    data = prepare_dataset(tokenizer, task, splits[split], int(args["max_length"]))
    collate = CandidateCollator(tokenizer)
    bs = int(args.get("per_device_eval_batch_size", 16))
    preds: list[int] = []
    labels: list[int] = []
    loss_sum = 0.0
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(data), bs):
            batch = collate([data[j] for j in range(i, min(i + bs, len(data)))])
            loss, scores = candidate_loss(model, batch)
            loss_sum += float(loss) * len(batch["labels"])
            preds += scores.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    correct = [int(p == y) for p, y in zip(preds, labels)]
    return {"accuracy": sum(correct) / len(correct), "loss": loss_sum / len(correct), "n": len(correct),
            "predictions": preds, "labels": labels, "seconds": time.time() - t0}


def bootstrap_ci(correct: list[int], n_resamples: int = 10000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the accuracy over the examples."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    lo = means[int((1 - level) / 2 * n_resamples)]
    hi = means[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return [lo, hi]


def majority_rate(labels: list[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


def zero_shot(root: Path, args: dict[str, Any]) -> dict[str, Any]:
    """The base model scored on the test split once per (model, quantization, data): cached under root."""
    key = f"{args.get('model_name_or_path') or 'smollm2-135m'}|{args.get('quantization')}|{args['num_eval']}|{args['max_length']}"
    cache = root / "zero_shot.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        res = score_model(args.get("model_name_or_path"), args)
        res["ci95"] = bootstrap_ci([int(p == y) for p, y in zip(res["predictions"], res["labels"])])
        table[key] = res
        root.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table))
    return table[key]


# =====================================================================================================
# slow or broken: MeZO's own four-pass scheme beside our mezo step, same batches
# =====================================================================================================
def _mean_loss(model, dataset, collate, batch_size: int = 16) -> float:
    import torch

    from .data import candidate_loss

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            total += float(candidate_loss(model, batch)[0]) * len(batch["labels"])
    return total / len(dataset)


def run_reference(run: dict[str, Any], args: dict[str, Any], root: Path, threads: int = 1) -> dict[str, Any]:
    """Our mezo (ZOStepper: the calls ZOTrainer makes) and bench.ReferenceMeZO on the same batches, in turn."""
    import torch

    from .bench import ReferenceMeZO, ZOStepper
    from .data import CandidateCollator, load_task_splits, prepare_dataset
    from .tasks import get_task
    from .models import ModelArguments, load_model

    torch.set_num_threads(threads)
    task = get_task(args["task"])
    splits = load_task_splits(task, args.get("data_dir"), num_train=int(args["num_train"]), num_dev=int(args["num_dev"]),
                              num_eval=int(args["num_eval"]), data_seed=int(args.get("data_seed", 0)))
    steps, eval_steps, bs = int(args["max_steps"]), int(args["eval_steps"]), int(args["per_device_train_batch_size"])
    lr, eps = float(args["learning_rate"]), float(args["zo_eps"])
    out: dict[str, Any] = {}
    for scheme in ("ours", "reference"):
        model, tok = load_model(ModelArguments(model_name_or_path=args.get("model_name_or_path")))
        model.eval()
        train_ds = prepare_dataset(tok, task, splits["train"], int(args["max_length"]))
        dev_ds = prepare_dataset(tok, task, splits["dev"], int(args["max_length"]))
        collate = CandidateCollator(tok)
        stepper = (ZOStepper(model, "mezo", learning_rate=lr, zo_eps=eps, seed=int(args.get("seed", 0))) if scheme == "ours"
                   else ReferenceMeZO(model, lr=lr, eps=eps))
        order = random.Random(int(args.get("seed", 0)))
        idx: list[int] = []

        t0 = time.time()
        curve = [dict(step=0, eval_loss=_mean_loss(model, dev_ds, collate), wall_seconds=time.time() - t0)]
        train_curve = []
        for step in range(1, steps + 1):
            if len(idx) < bs:
                more = list(range(len(train_ds)))
                order.shuffle(more)
                idx += more
            batch = collate([train_ds[j] for j in idx[:bs]])
            del idx[:bs]
            loss = stepper.step(batch)
            train_curve.append(dict(step=step, loss=loss, wall_seconds=time.time() - t0))
            if step % eval_steps == 0 or step == steps:
                curve.append(dict(step=step, eval_loss=_mean_loss(model, dev_ds, collate), wall_seconds=time.time() - t0))
            if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * LN2:
                break
        out[scheme] = dict(eval=curve, train=train_curve, wall_seconds=time.time() - t0)
        del model
    return out


# =====================================================================================================
# one run's result JSON
# =====================================================================================================
def code_version() -> dict[str, Any]:
    """Which zo_trainer ran: the study may run from a snapshot (PYTHONPATH) while the tree is being edited."""
    pkg = Path(__file__).resolve().parent
    base = pkg.parent / "BASE_COMMIT"
    return {"zo_trainer_path": str(pkg), "snapshot_of_commit": base.read_text().strip() if base.exists() else None}


def _diverged(losses: list[float]) -> bool:
    return any(not math.isfinite(x) or x > DIVERGENCE_FACTOR * LN2 for x in losses)


def steps_below(points: list[dict], threshold: float, key: str = "loss") -> int | None:
    return next((int(p["step"]) for p in points if p.get(key, math.inf) < threshold), None)


def result_for(run: dict[str, Any], args: dict[str, Any], root: Path, status: dict[str, Any]) -> dict[str, Any]:
    from .bench import environment

    kind = run.get("kind", "train")
    name = run["name"]
    res: dict[str, Any] = {
        "name": name, "kind": kind, "optim": args.get("optim"), "steps": int(args["max_steps"]), "seed": args.get("seed"),
        "learning_rate": args.get("learning_rate"), "lr_scheduler_type": args.get("lr_scheduler_type"),
        "zo_eps": args.get("zo_eps") if str(args.get("optim")) in ("mezo", "sparse_mezo", "qzo") else None,
        "zo_sparsity": args.get("zo_sparsity"), "zo_num_perturbations": args.get("zo_num_perturbations", 1),
        "quantization": args.get("quantization"), "batch_size": args["per_device_train_batch_size"],
        "max_length": args["max_length"], "data": {k: args[k] for k in ("task", "num_train", "num_dev", "num_eval", "data_seed")},
        "args": args, "threads": status.get("threads"), "environment": environment(), "code": code_version(),
        "divergence_rule": f"a training or dev loss above {DIVERGENCE_FACTOR:g} ln 2 = {DIVERGENCE_FACTOR * LN2:.3f}, or non-finite",
    }
    if kind == "reference":
        res["reference"] = status["reference"]
        res["command"] = "zo-bench study --runs " + name
        res["diverged"] = {s: _diverged([p["loss"] for p in v["train"]]) for s, v in status["reference"].items()}
        return res
    log = parse_log(root / f"{name}.log", int(args["logging_steps"]), int(args.get("eval_steps", 0) or 1), int(args["max_steps"]))
    steps_done = _global_step(root / name) or 0
    res.update(
        # the run as one command (each actual invocation, resumed ones included, is in "segments")
        command=" ".join(zo_train_exe() + to_argv(args) + ["--output_dir", str(root / name)]), segments=log["segments"],
        steps_completed=steps_done, trained=status.get("trained", False),
        train_curve=[{k: p[k] for k in ("step", "wall_seconds", "loss", "learning_rate", "zo_projected_grad",
                                         "zo_update_fraction") if k in p} for p in log["train"]],
        dev_curve=[{"step": p["step"], "wall_seconds": p["wall_seconds"], "loss": p["eval_loss"],
                    "accuracy": p.get("eval_accuracy"), "eval_seconds": p.get("eval_runtime")} for p in log["eval"]],
    )
    res["train_wall_seconds"] = log["train"][-1]["wall_seconds"] if log["train"] else None
    res["diverged"] = _diverged([p["loss"] for p in log["train"]] + [p["loss"] for p in res["dev_curve"]])
    if kind == "overfit":
        res["steps_to_train_loss_below"] = {f"{t:.2f}": steps_below(log["train"], t) for t in (0.6, 0.5, 0.3)}
        res["min_train_loss"] = min((p["loss"] for p in log["train"]), default=None)
        return res
    test = status.get("test")
    if test is not None:
        correct = [int(p == y) for p, y in zip(test["predictions"], test["labels"])]
        res["test"] = dict(accuracy=test["accuracy"], loss=test["loss"], n=test["n"], ci95=bootstrap_ci(correct),
                           predictions=test["predictions"], scoring_seconds=test["seconds"])
        res["majority_rate"] = majority_rate(test["labels"])
    zs = status.get("zero_shot")
    if zs is not None:
        res["zero_shot"] = dict(accuracy=zs["accuracy"], loss=zs["loss"], ci95=zs["ci95"])
    return res


def run_one(run: dict[str, Any], common: dict[str, Any], root: Path, results: Path, threads: int = 1, nice: int = 10,
            log=print) -> dict[str, Any] | None:
    args = run_args(run, common)
    name, kind = run["name"], run.get("kind", "train")
    status: dict[str, Any] = {"threads": threads}
    if kind == "reference":
        status["reference"] = run_reference(run, args, root, threads)
    else:
        status.update(train(run, args, root, threads, nice))
        if not status["trained"]:
            log(f"{name}: not trained to {args['max_steps']} steps (rc {status['rc']}); resumable, see {root / name}.log")
        if status["trained"] and kind == "train":
            import torch

            torch.set_num_threads(threads)
            cache = root / name / "test_scores.json"  # scoring costs minutes: once per trained model
            if cache.exists() and cache.stat().st_mtime >= (root / name / "trainer_state.json").stat().st_mtime:
                status["test"] = json.loads(cache.read_text())
            else:
                status["test"] = score_model(str(root / name), args)
                cache.write_text(json.dumps(status["test"]))
            status["zero_shot"] = zero_shot(root, args)
    res = result_for(run, args, root, status)
    from .bench import write_json

    write_json(root / name / "study_result.json", res)
    if kind == "reference" or status.get("trained"):
        dest = results / name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name / "study_result.json", dest / "study_result.json")
        traj = root / name / "zo_trajectory.json"
        if traj.exists():
            shutil.copy2(traj, dest / "zo_trajectory.json")
        log(f"{name}: done -> {dest}")
    return res


# =====================================================================================================
# report: table and plots of the committed results
# =====================================================================================================
def load_results(results: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(results.glob("*/study_result.json")):
        out.append(json.loads(f.read_text()))
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def study_report(results: Path) -> str:
    rows = load_results(results)
    if not rows:
        return ""
    lines = ["| run | optim | lr (schedule) | eps | batch | steps | wall-clock (min) | final dev loss | dev acc | test acc % [95% CI] | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    zs = maj = None
    for r in rows:
        if r["kind"] != "train":
            continue
        dev = r.get("dev_curve") or []
        last = dev[-1] if dev else {}
        t = r.get("test")
        test = f"{_pct(t['accuracy'])} [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]" if t else "n/a"
        wall = r.get("train_wall_seconds")
        steps = r["steps"] if r.get("steps_completed") in (None, r["steps"]) else f"{r['steps_completed']} of {r['steps']}"
        lines.append(f"| {r['name']} | {r['optim']} | {r['learning_rate']:g} ({r['lr_scheduler_type']}) | {r.get('zo_eps') or ''} | "
                     f"{r['batch_size']} | {steps} | {'n/a' if wall is None else f'{wall / 60:.0f}'} | "
                     f"{last.get('loss', float('nan')):.3f} | {_pct(last.get('accuracy'))} | {test} | {'yes' if r['diverged'] else 'no'} |")
        zs = zs or r.get("zero_shot")
        maj = maj or r.get("majority_rate")
    if zs:
        lines.append(f"\nZero-shot test accuracy {_pct(zs['accuracy'])}% [{_pct(zs['ci95'][0])}, {_pct(zs['ci95'][1])}]; "
                     f"majority class {_pct(maj)}% ({rows[0]['data']['num_eval']} test examples).")
    over = [r for r in rows if r["kind"] == "overfit"]
    if over:
        lines += ["", "| slow or broken: 32 fixed examples | optim | lr | steps run | min train loss (epoch mean) | first step < 0.6 / 0.5 / 0.3 |",
                  "|---|---|---|---|---|---|"]
        for r in over:
            s = r["steps_to_train_loss_below"]
            lines.append(f"| {r['name']} | {r['optim']} | {r['learning_rate']:g} | {r.get('steps_completed')} | "
                         f"{r['min_train_loss']:.3f} | {s['0.60']} / {s['0.50']} / {s['0.30']} |")
    for r in rows:
        if r["kind"] == "reference":
            for scheme, v in r["reference"].items():
                curve = ", ".join(f"{p['step']}: {p['eval_loss']:.3f}" for p in v["eval"])
                lines.append(f"\n{r['name']} ({scheme}): dev loss {curve}")
    return "\n".join(lines) + "\n"


def plot_study(results: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load_results(results) if r["kind"] == "train"]
    if not rows:
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    styles = {"mezo": "-", "sparse_mezo": "--", "qzo": "-."}
    # the step-0 dev loss (same base model, same dev sample) drawn as every run's starting point
    start = next((p for r in rows for p in r.get("dev_curve") or [] if p["step"] == 0), None)
    for i, r in enumerate(rows):
        color, style = f"C{i % 10}", styles.get(r["optim"], ":")
        dev = r.get("dev_curve") or []
        if start is not None and dev and dev[0]["step"] != 0:
            dev = [dict(start, wall_seconds=0.0)] + dev
        label = f"{r['name']}"
        for ax, x in ((axes[0, 0], "step"), (axes[0, 1], "wall_seconds")):
            ax.plot([p[x] / (60 if x == "wall_seconds" else 1) for p in dev], [p["loss"] for p in dev], style, marker="o",
                    ms=3, color=color, label=label)
        t = r.get("test")
        if t:
            for ax, x in ((axes[1, 0], r.get("steps_completed") or r["steps"]), (axes[1, 1], (r.get("train_wall_seconds") or 0) / 60)):
                ax.errorbar([x], [100 * t["accuracy"]], yerr=[[100 * (t["accuracy"] - t["ci95"][0])], [100 * (t["ci95"][1] - t["accuracy"])]],
                            fmt="o", color=color, capsize=3, label=label)
    zs = next((r["zero_shot"]["accuracy"] for r in rows if r.get("zero_shot")), None)
    maj = next((r["majority_rate"] for r in rows if r.get("majority_rate")), None)
    for ax in axes[1]:
        if zs is not None:
            ax.axhline(100 * zs, ls=":", color="gray", label="zero-shot")
        if maj is not None:
            ax.axhline(100 * maj, ls="--", color="black", lw=0.8, label="majority class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xlim(0, ax.get_xlim()[1] * 1.05)
    for ax in axes[0]:
        ax.axhline(LN2, ls=":", color="gray", lw=0.8)
        ax.set_ylabel("dev loss (ln 2 dotted)")
    axes[0, 0].set_xlabel("step")
    axes[1, 0].set_xlabel("step")
    axes[0, 1].set_xlabel("wall-clock (min, one thread)")
    axes[1, 1].set_xlabel("wall-clock (min, one thread)")
    axes[0, 0].set_title("RTE dev loss vs steps", fontsize=10)
    axes[0, 1].set_title("RTE dev loss vs wall-clock", fontsize=10)
    axes[1, 0].set_title("RTE test accuracy (277 ex., 95% bootstrap CI) vs steps", fontsize=10)
    axes[1, 1].set_title("RTE test accuracy vs wall-clock", fontsize=10)
    axes[0, 0].legend(fontsize=6)
    axes[1, 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =====================================================================================================
# entry point (called by zo-bench study)
# =====================================================================================================
def main_study(out: Path, quick: bool, runs: str | None, root: str | None, threads: int, nice: int,
               list_only: bool, report_only: bool, plan_file: str | None = None, data_dir: str | None = None) -> int:
    from .bench import _log

    results = out / STUDY_DIR
    if report_only:
        plot_study(results, results / "rte_study.png")
        print(study_report(results), end="")
        return 0
    if quick:
        import tempfile

        from .bench import tiny_model_dir

        work = Path(tempfile.mkdtemp(prefix="zo_study_quick_"))
        common, plan = quick_plan(str(tiny_model_dir(work)))
        root_dir = Path(root) if root else work / "runs"
    else:
        common, plan = dict(COMMON), list(PLAN)
        root_dir = Path(root or "out/study")
    if data_dir:
        common["data_dir"] = data_dir
    if plan_file:  # JSON text or a file: {"common": {...}, "runs": [{"name": ..., "kind": ..., "args": {...}}]}
        extra = json.loads(plan_file if plan_file.lstrip().startswith("{") else Path(plan_file).read_text())
        common.update(extra.get("common", {}))
        plan = extra.get("runs", plan)
    if list_only:
        for run in plan:
            done = (results / run["name"] / "study_result.json").exists()
            ckpt = last_checkpoint(root_dir / run["name"]) if (root_dir / run["name"]).exists() else None
            print(f"{'done   ' if done else ('partial' if ckpt else 'todo   ')} {run['name']}: {run.get('kind', 'train')} "
                  f"{to_argv(run.get('args', {}))}")
        return 0
    wanted = [r for r in plan if runs is None or r["name"] in runs.split(",")]
    unknown = set(runs.split(",")) - {r["name"] for r in plan} if runs else set()
    if unknown:
        print(f"zo-bench study: unknown run(s) {sorted(unknown)}; see zo-bench study --list", file=sys.stderr)
        return 2
    if nice:
        os.nice(nice)  # the harness's scoring and reference runs and its zo-train children stay in the background
    failed = 0
    for run in wanted:
        _log(f"study: {run['name']}")
        res = run_one(run, common, root_dir, results, threads=threads, nice=0, log=_log)  # zo-train inherits the niceness
        failed += res is None or (run.get("kind", "train") != "reference" and not res.get("trained"))
    plot_study(results, results / "rte_study.png")
    print(study_report(results), end="")
    return 1 if failed else 0
