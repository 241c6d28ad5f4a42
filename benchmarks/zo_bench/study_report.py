"""The RTE study's table (README) and plot, from the committed ``study_result.json`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .study_plan import DIVERGENCE_FACTOR, LN2


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


def optim_cell(r: dict[str, Any]) -> str:
    """The run's optimiser, with "LoRA r<rank>" when it trained adapters (``use_peft``) rather than the weights."""
    args = r.get("args") or {}
    noise = " z ±1" if args.get("zo_noise") == "rademacher" else ""  # Gaussian z unless the run said otherwise
    if args.get("use_peft"):
        return f"{r['optim']}{noise} LoRA r{args.get('lora_r', 16)}"
    return f"{r['optim']}{noise} ({r['quantization']})" if r.get("quantization") else f"{r['optim']}{noise}"


def device_cell(r: dict[str, Any]) -> str:
    """Where the run trained: the GPU's name (wall-clock is then not comparable with the CPU runs), else CPU."""
    gpu = ((r.get("environment") or {}).get("machine") or {}).get("gpu")
    return f"GPU ({gpu.replace('NVIDIA ', '').split()[0]})" if gpu else "CPU"


def study_report(results: Path) -> str:
    rows = load_results(results)
    if not rows:
        return ""
    lines = [
        "| run | device | optim | lr (schedule) | eps | batch | steps | wall-clock (min) | final dev loss | dev acc | test acc % [95% CI] | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    zs: dict[str | None, dict[str, Any]] = {}
    maj = None
    for r in rows:
        if r["kind"] != "train":
            continue
        dev = r.get("dev_curve") or []
        last = dev[-1] if dev else {}
        t = r.get("test")
        test = f"{_pct(t['accuracy'])} [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]" if t else "n/a"
        wall = r.get("train_wall_seconds")
        steps = (
            r["steps"] if r.get("steps_completed") in (None, r["steps"]) else f"{r['steps_completed']} of {r['steps']}"
        )
        lines.append(
            f"| {r['name']} | {device_cell(r)} | {optim_cell(r)} | {r['learning_rate']:g} ({r['lr_scheduler_type']}) | {r.get('zo_eps') or ''} | "
            f"{r['batch_size']} | {steps} | {'n/a' if wall is None else f'{wall / 60:.0f}'} | "
            f"{last.get('loss', float('nan')):.3f} | {_pct(last.get('accuracy'))} | {test} | {'yes' if r['diverged'] else 'no'} |"
        )
        if r.get("zero_shot"):  # one per base model: the fp model, and each 4-bit base a qzo run starts from
            zs.setdefault(r.get("quantization"), r["zero_shot"])
        maj = maj or r.get("majority_rate")
    if zs:
        bases = [
            f"{'the ' + q + ' base' if q else 'the model'} {_pct(z['accuracy'])}% [{_pct(z['ci95'][0])}, {_pct(z['ci95'][1])}]"
            for q, z in sorted(zs.items(), key=lambda kv: kv[0] or "")
        ]
        lines.append(
            f"\nZero-shot test accuracy: {'; '.join(bases)}; "
            f"majority class {_pct(maj)}% ({rows[0]['data']['num_eval']} test examples)."
        )
    over = [r for r in rows if r["kind"] == "overfit"]
    if over:
        lines += [
            "",
            "| slow or broken: 32 fixed examples | device | optim | lr | steps run | min train loss (epoch mean) | first step < 0.6 / 0.5 / 0.3 | final train loss | diverged |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in over:
            s = r["steps_to_train_loss_below"]
            curve = r.get("train_curve") or []
            final = f"{curve[-1]['loss']:.3g}" if curve else "n/a"  # a minimum reached before diverging reads alike
            lines.append(
                f"| {r['name']} | {device_cell(r)} | {optim_cell(r)} | {r['learning_rate']:g} | {r.get('steps_completed')} | "
                f"{r['min_train_loss']:.3f} | {s['0.60']} / {s['0.50']} / {s['0.30']} | {final} | "
                f"{'yes' if r['diverged'] else 'no'} |"
            )
    for r in rows:
        if r["kind"] == "reference":
            for scheme, v in r["reference"].items():
                curve = ", ".join(f"{p['step']}: {p['eval_loss']:.3f}" for p in v["eval"])
                lines.append(f"\n{r['name']} ({scheme}): dev loss {curve}")
    return "\n".join(lines) + "\n"


def plot_studies(results: Path) -> None:
    """``rte_study.png`` from the CPU runs and, when there are any, ``rte_study_gpu.png`` from the GPU runs: their
    wall-clocks are not comparable, so they never share an axis."""
    plot_study(results, results / "rte_study.png", on_gpu=False)
    plot_study(results, results / "rte_study_gpu.png", on_gpu=True)


def plot_study(results: Path, path: Path, on_gpu: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load_results(results) if r["kind"] == "train" and device_cell(r).startswith("GPU") == on_gpu]
    if not rows:
        return
    gpus = " / ".join(sorted({device_cell(r)[5:-1] for r in rows}))  # runs from several lent machines
    clock = f"wall-clock (min, GPU ({gpus}), runs sharing one)" if on_gpu else "wall-clock (min, one thread)"
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
            ax.plot(
                [p[x] / (60 if x == "wall_seconds" else 1) for p in dev],
                [p["loss"] for p in dev],
                style,
                marker="o",
                ms=3,
                color=color,
                label=label,
            )
        t = r.get("test")
        if t:
            for ax, x in (
                (axes[1, 0], r.get("steps_completed") or r["steps"]),
                (axes[1, 1], (r.get("train_wall_seconds") or 0) / 60),
            ):
                ax.errorbar(
                    [x],
                    [100 * t["accuracy"]],
                    yerr=[[100 * (t["accuracy"] - t["ci95"][0])], [100 * (t["ci95"][1] - t["accuracy"])]],
                    fmt="o",
                    color=color,
                    capsize=3,
                    label=label,
                )
    # the full-precision model's zero-shot (a 4-bit base's own is in the report's text)
    zs = next((r["zero_shot"]["accuracy"] for r in rows if r.get("zero_shot") and not r.get("quantization")), None)
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
        # a diverged run's dev loss (up to 1e5) would flatten every other curve: the axis stops at the divergence line
        lowest = min((p["loss"] for r in rows for p in r.get("dev_curve") or []), default=LN2)
        ax.set_ylim(max(0.0, lowest - 0.02), min(ax.get_ylim()[1], DIVERGENCE_FACTOR * LN2))
    axes[0, 0].set_xlabel("step")
    axes[1, 0].set_xlabel("step")
    axes[0, 1].set_xlabel(clock)
    axes[1, 1].set_xlabel(clock)
    axes[0, 0].set_title("RTE dev loss vs steps (axis ends at 3 ln 2: divergence)", fontsize=10)
    axes[0, 1].set_title("RTE dev loss vs wall-clock", fontsize=10)
    axes[1, 0].set_title("RTE test accuracy (277 ex., 95% bootstrap CI) vs steps", fontsize=10)
    axes[1, 1].set_title("RTE test accuracy vs wall-clock", fontsize=10)
    axes[0, 0].legend(fontsize=6)
    axes[1, 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
