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
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import dict_line, log_line, run_args, to_argv, write_json
from .environment import environment
from .factories import tiny_model_dir
from .study_plan import BASES, COMMON, DIVERGENCE_FACTOR, LN2, PLAN, STUDY_DIR, quick_plan
from .study_report import plot_studies, study_report
from .study_scoring import bootstrap_ci, majority_rate, run_reference, score_model, zero_shot


# =====================================================================================================
# running one zo-train run (resumable)
# =====================================================================================================
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


def console_script(name: str, module: str) -> list[str]:
    """The installed program ``name`` beside this interpreter, else ``python -m module``."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def zo_train_exe() -> list[str]:
    return console_script("zo-train", "zo_trainer.train")


def prepare_base(run: dict[str, Any], args: dict[str, Any], root: Path, threads: int = 1) -> dict[str, Any]:
    """The run's named base model (``base`` in its plan entry; zo-quantize flags in ``BASES``), quantized from the
    study's model once into ``<root>/bases/<base>`` and reused by every run that names it. Returns the zo-quantize
    command and the folder; raises with the tail of its log if zo-quantize fails."""
    name = run["base"]
    if name not in BASES:
        raise ValueError(f"run {run['name']!r}: unknown base {name!r} (known: {sorted(BASES)})")
    out_dir = root / "bases" / name
    flags = dict(BASES[name], task=args["task"], data_dir=args["data_dir"])
    if args.get("model_name_or_path"):
        flags["model_name_or_path"] = args["model_name_or_path"]
    cmd = console_script("zo-quantize", "zo_trainer.cli.quantize") + to_argv(flags)
    if not (out_dir / "config.json").exists():
        # into a scratch folder renamed when complete: a cut-short quantization is redone, never half-used
        partial = out_dir.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log_path = root / "bases" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(log_path, "a") as log:
            log.write(f"{time.time():.1f} $ {' '.join(cmd + ['--output_dir', str(partial)])}\n")
            log.flush()
            rc = subprocess.run(
                cmd + ["--output_dir", str(partial)], stdout=log, stderr=subprocess.STDOUT, env=env
            ).returncode
        if rc != 0:
            tail = log_path.read_text().splitlines()[-5:]
            raise RuntimeError(f"zo-quantize for base {name!r} exited {rc}: " + " | ".join(tail))
        partial.rename(out_dir)
    return {"name": name, "path": str(out_dir), "command": " ".join(cmd + ["--output_dir", str(out_dir)])}


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
            del argv[i : i + 2]
        argv += ["--resume_from_checkpoint", str(ckpt)]
    cmd = zo_train_exe() + argv
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"{time.time():.1f} $ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            bufsize=1,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
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
    pauses = (
        [tuple(map(float, line.split()[:2])) for line in pause_file.read_text().splitlines() if len(line.split()) >= 2]
        if pause_file.exists()
        else []
    )

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
            segments.append(
                dict(
                    t0=t,
                    s0=int(m.group(1)) if m else 0,
                    command=text[2:],
                    eval_on_start="--eval_on_start true" in text,
                    rows=[],
                )
            )
        elif segments:
            row = dict_line(text)
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
    return {
        "segments": [
            dict(command=s["command"], resumed_from_step=s["s0"], started_unix=s["t0"], wall_offset_seconds=o)
            for s, o in zip(segments, offset_of)
        ],
        "train": [train_pts[s] for s in sorted(train_pts)],
        "eval": [eval_pts[s] for s in sorted(eval_pts)],
    }


# =====================================================================================================
# one run's result JSON
# =====================================================================================================
def code_version() -> dict[str, Any]:
    """Which zo_trainer ran: the study may run from a snapshot (PYTHONPATH) while the tree is being edited."""
    import zo_trainer

    pkg = Path(zo_trainer.__file__).resolve().parent
    base = pkg.parent / "BASE_COMMIT"
    return {"zo_trainer_path": str(pkg), "snapshot_of_commit": base.read_text().strip() if base.exists() else None}


def _diverged(losses: list[float]) -> bool:
    return any(not math.isfinite(x) or x > DIVERGENCE_FACTOR * LN2 for x in losses)


def steps_below(points: list[dict], threshold: float, key: str = "loss") -> int | None:
    return next((int(p["step"]) for p in points if p.get(key, math.inf) < threshold), None)


def result_for(run: dict[str, Any], args: dict[str, Any], root: Path, status: dict[str, Any]) -> dict[str, Any]:
    kind = run.get("kind", "train")
    name = run["name"]
    res: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "optim": args.get("optim"),
        "steps": int(args["max_steps"]),
        "seed": args.get("seed"),
        "learning_rate": args.get("learning_rate"),
        "lr_scheduler_type": args.get("lr_scheduler_type"),
        "zo_eps": args.get("zo_eps") if str(args.get("optim")) in ("mezo", "sparse_mezo", "qzo") else None,
        "zo_sparsity": args.get("zo_sparsity"),
        "zo_num_perturbations": args.get("zo_num_perturbations", 1),
        "quantization": args.get("quantization") or ("gptq" if run.get("base") else None),  # bases: zo-quantize's GPTQ
        "base": status.get("base"),  # a quantized base the harness made (zo-quantize command), or None
        "batch_size": args["per_device_train_batch_size"],
        "max_length": args["max_length"],
        "data": {k: args[k] for k in ("task", "num_train", "num_dev", "num_eval", "data_seed")},
        "args": args,
        "threads": status.get("threads"),
        "environment": environment(),
        "code": code_version(),
        "divergence_rule": f"a training or dev loss above {DIVERGENCE_FACTOR:g} ln 2 = {DIVERGENCE_FACTOR * LN2:.3f}, or non-finite",
    }
    if kind == "reference":
        res["reference"] = status["reference"]
        res["command"] = "zo-bench study --runs " + name
        res["diverged"] = {s: _diverged([p["loss"] for p in v["train"]]) for s, v in status["reference"].items()}
        return res
    log = parse_log(
        root / f"{name}.log", int(args["logging_steps"]), int(args.get("eval_steps", 0) or 1), int(args["max_steps"])
    )
    steps_done = _global_step(root / name) or 0
    res.update(
        # the run as one command (each actual invocation, resumed ones included, is in "segments")
        command=" ".join(zo_train_exe() + to_argv(args) + ["--output_dir", str(root / name)]),
        segments=log["segments"],
        steps_completed=steps_done,
        trained=status.get("trained", False),
        train_curve=[
            {
                k: p[k]
                for k in ("step", "wall_seconds", "loss", "learning_rate", "zo_projected_grad", "zo_update_fraction")
                if k in p
            }
            for p in log["train"]
        ],
        dev_curve=[
            {
                "step": p["step"],
                "wall_seconds": p["wall_seconds"],
                "loss": p["eval_loss"],
                "accuracy": p.get("eval_accuracy"),
                "eval_seconds": p.get("eval_runtime"),
            }
            for p in log["eval"]
        ],
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
        res["test"] = dict(
            accuracy=test["accuracy"],
            loss=test["loss"],
            n=test["n"],
            ci95=bootstrap_ci(correct),
            predictions=test["predictions"],
            scoring_seconds=test["seconds"],
        )
        res["majority_rate"] = majority_rate(test["labels"])
    zs = status.get("zero_shot")
    if zs is not None:
        res["zero_shot"] = dict(accuracy=zs["accuracy"], loss=zs["loss"], ci95=zs["ci95"])
    return res


def run_one(
    run: dict[str, Any], common: dict[str, Any], root: Path, results: Path, threads: int = 1, nice: int = 10, log=print
) -> dict[str, Any] | None:
    args = run_args(run, common)
    name, kind = run["name"], run.get("kind", "train")
    status: dict[str, Any] = {"threads": threads}
    if run.get("base"):
        status["base"] = prepare_base(run, args, root, threads)
        args["model_name_or_path"] = status["base"]["path"]
    if kind == "reference":
        status["reference"] = run_reference(run, args, root, threads)
    else:
        status.update(train(run, args, root, threads, nice))
        if not status["trained"]:
            log(
                f"{name}: not trained to {args['max_steps']} steps (rc {status['rc']}); resumable, see {root / name}.log"
            )
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
# entry point (called by zo-bench study)
# =====================================================================================================
def main_study(
    out: Path,
    quick: bool,
    runs: str | None,
    root: str | None,
    threads: int,
    nice: int,
    list_only: bool,
    report_only: bool,
    plan_file: str | None = None,
    data_dir: str | None = None,
) -> int:
    results = out / STUDY_DIR
    if report_only:
        plot_studies(results)
        print(study_report(results), end="")
        return 0
    if quick:
        import tempfile

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
            print(
                f"{'done   ' if done else ('partial' if ckpt else 'todo   ')} {run['name']}: {run.get('kind', 'train')} "
                f"{to_argv(run.get('args', {}))}" + (f" on base {run['base']}" if run.get("base") else "")
            )
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
        log_line(f"study: {run['name']}")
        res = run_one(
            run, common, root_dir, results, threads=threads, nice=0, log=log_line
        )  # zo-train inherits the niceness
        failed += res is None or (run.get("kind", "train") != "reference" and not res.get("trained"))
    plot_studies(results)
    print(study_report(results), end="")
    return 1 if failed else 0
