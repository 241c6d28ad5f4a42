"""``zo-bench report``: markdown tables (for the README's Results section) from the result JSONs, PNGs redrawn."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .plots import fmt, plot_accuracy, plot_bars, plot_growth, plot_memory


def mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def replot(out: Path) -> None:
    """Redraw the PNGs from the JSON files (e.g. after a speed run cut short between rounds)."""
    for name, draw in (
        (
            "speed",
            lambda d, png: plot_bars(
                png,
                {k: v["ratio_step_over_two_forwards"] for k, v in d["results"].items()},
                "ZO step time / two plain forwards (same model, same batch)",
                goal=1.15,
            ),
        ),
        ("memory", lambda d, png: plot_memory(png, d["results"])),
        ("accuracy", lambda d, png: plot_accuracy(png, d)),
        ("growth", lambda d, png: plot_growth(png, d)),
    ):
        f = out / f"{name}.json"
        if f.exists():
            draw(json.loads(f.read_text()), out / f"{name}.png")


def report(out: Path) -> str:
    """Markdown tables of whatever result files ``out`` holds (for the README's Results section)."""
    lines: list[str] = []

    def load(name):
        f = out / name
        return json.loads(f.read_text()) if f.exists() else None

    for name in ("speed.json", "memory.json", "accuracy.json", "growth.json"):
        d = load(name)
        if d is None:
            continue
        m, g = d["environment"]["machine"], d["environment"]["git"]
        lines.append(
            f"<!-- {name}: {d['environment']['timestamp_utc']}, commit {g.get('commit')} "
            f"(dirty {g.get('dirty')}), {m['cpu_model']}, {m['torch_num_threads']} torch threads -->"
        )
    for name in ("scale.json", "scale_cuda.json"):
        d = load(name)
        if d is not None:
            # imports torch: only when there is a scale file to print
            from .scale import derive_ratios_and_goals, scale_table

            # ratios, computed rows and goals as this version defines them, from the measured rows
            derive_ratios_and_goals(d)
            lines += [
                "",
                f"Peak memory at real shapes ({name}: {d.get('device', 'cpu')}, batch {d['batch_size']} x {d['seq_len']}; GB):",
                "",
            ]
            lines.append(scale_table(d).rstrip())
    speed = load("speed.json")
    if speed:
        st = speed["setup"]
        lines += [
            "",
            f"Speed (batch {st['batch_rows']} x {st['batch_tokens']} tokens, {st['repeats']} interleaved rounds, median):",
            "",
            "| configuration | model | ZO step / two plain forwards | median of per-round ratios | engine / two forwards "
            "| goal |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in speed["results"].items():
            baseline = k == "mezo_reference_inplace" or re.search(r"_scheme\d+$|_noise_threads$", k)
            goal = "(baseline)" if baseline else "<= 1.15"
            engine = f"{v['engine_over_two_forwards']:.3f}" if "engine_over_two_forwards" in v else ""  # session 14+
            lines.append(
                f"| {k} | {v['model']} | {v['ratio_step_over_two_forwards']:.3f} | {v['ratio_median_of_rounds']:.3f} "
                f"| {engine} | {goal} |"
            )
        if "reference_over_ours_mezo" in speed:
            lines.append(f"\nReference in-place MeZO step / our MeZO step: {speed['reference_over_ours_mezo']:.2f}x")
        for name in ("mezo", "sparse_mezo"):  # Absent from results written before --zo_noise existed.
            if f"rademacher_over_gaussian_{name}" in speed:
                lines.append(
                    f"\n{name} step with Rademacher z / with Gaussian z (`--zo_noise rademacher`, same rounds): "
                    f"{speed[f'rademacher_over_gaussian_{name}']:.3f}"
                )
            # [rademacher_]scheme{before}_over_scheme{default}_{name}: from z scheme 3.
            for key, value in speed.items():
                match = re.fullmatch(rf"(rademacher_)?scheme(\d+)_over_scheme(\d+)_{name}", key)
                if match:
                    rademacher, before, after = match.groups()
                    kind = "Rademacher" if rademacher else "Gaussian"
                    lines.append(
                        f"\n{name} step with z scheme {before}'s {kind} / with scheme {after}'s, same rounds: "
                        f"{value:.3f}"
                    )
                    engine_key = f"rademacher_scheme{before}_over_scheme{after}_engine_{name}"
                    if rademacher and engine_key in speed:
                        lines[-1] += f" (engine / two forwards: {speed[engine_key]:.2f}x)"
            if f"noise_threads_over_openmp_team_{name}" in speed:  # Absent before session 13.
                lines.append(
                    f"\n{name} step with the C passes on noise threads / on torch's OpenMP team, same rounds: "
                    f"{speed[f'noise_threads_over_openmp_team_{name}']:.3f}"
                )
        teams = speed.get("two_forwards_beside_idle_openmp_teams")  # Absent before f04e029's suite.
        if teams:
            lines.append(
                f"\nfp32 two forwards beside two idle OpenMP teams / plain two forwards (same rounds): "
                f"{teams['over_plain_two_forwards']:.3f} ({teams['seconds_median']:.2f} s)"
            )
    for path in sorted(out.glob("*.json")):  # zo-bench qzo-step-time --out: one file per run, named by --name
        run = json.loads(path.read_text())
        if run.get("suite") != "qzo-step-time":
            continue
        st = run["setup"]
        rows, tokens = st["batch_rows_tokens"]
        lines += [
            "",
            f"qzo through ZOTrainer.training_step ({path.name}: batch {rows} x {tokens}, {st['torch_num_threads']} "
            f"torch threads, {st['rounds']} rounds):",
            "",
            "| back-end | step s (median) | two forwards s (median) | step / two forwards | median of per-round ratios "
            "| CPU seconds ratio | goal |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind, v in run["results"].items():
            lines.append(
                f"| {kind} | {v['qzo_step_median_s']:.2f} | {v['two_forwards_median_s']:.2f} | {v['ratio_median']:.3f} "
                f"| {v['median_of_round_ratios']:.3f} | {v['ratio_cpu']:.3f} | <= 1.05 |"
            )
    mem = load("memory.json")
    if mem:
        st = mem["setup"]
        lines += [
            "",
            f"Memory (batch {st['batch_size']}, max_length {st['max_length']}, {st['steps_per_process']} steps per fresh process):",
            "",
            "| configuration | RSS after load (MiB) | peak RSS during steps (MiB) | peak - after load (MiB) | ru_maxrss incl. load (MiB) |",
            "|---|---|---|---|---|",
        ]
        for k, v in mem["results"].items():
            lines.append(
                f"| {k} | {mib(v['rss_after_load_bytes'])} | {mib(v['peak_rss_during_steps_bytes'])} | "
                f"{mib(v['peak_above_after_load_bytes'])} | {mib(v['ru_maxrss_lifetime_bytes'])} |"
            )
        lines += ["", "| ratio (absolute peak RSS) | value | goal | met |", "|---|---|---|---|"]
        for k, v in mem["goals"].items():
            lines.append(f"| {k} | {v['value']:.2f} | {v['goal']} | {'yes' if v['met'] else 'no'} |")
        for k, v in mem.get("ratios_above_after_load", {}).items():
            lines.append(f"| {k} (increments above after-load RSS, not absolute) | {v:.2f} | | |")
    acc = load("accuracy.json")
    for extra in sorted(out.glob("accuracy_*.json")):
        if "quick" in extra.name:
            continue
        more = json.loads(extra.read_text())
        if acc is None:
            acc = more
        else:
            acc = dict(acc, runs={**acc["runs"], **{f"{k} ({extra.stem})": v for k, v in more["runs"].items()}})
    if acc:
        lines += [
            "",
            "Accuracy (RTE):",
            "",
            "| run | lr | steps | status | dev acc curve (step: acc) | test acc | zero-shot test acc |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in acc["runs"].items():
            curve = ", ".join(f"{s}: {a:.3f}" for s, a in v["dev_accuracy_curve"])
            ta = "n/a" if v.get("test_accuracy") is None else f"{v['test_accuracy']:.3f}"
            zs = "" if v.get("zero_shot_test_accuracy") is None else f"{v['zero_shot_test_accuracy']:.3f}"
            done = v.get("steps_completed")
            steps = (
                v["args"]["max_steps"]
                if done in (None, v["args"]["max_steps"])
                else f"{done} of {v['args']['max_steps']}"
            )
            lines.append(f"| {k} | {v['args']['learning_rate']:g} | {steps} | {v['status']} | {curve} | {ta} | {zs} |")
        lines += ["", "| sweep (mezo) lr | eps | steps | dev loss | dev acc | status |", "|---|---|---|---|---|---|"]
        for s_ in acc["sweep"]:
            dl = "n/a" if s_["dev_loss"] is None else f"{s_['dev_loss']:.4f}"
            da = "n/a" if s_["dev_accuracy"] is None else f"{s_['dev_accuracy']:.3f}"
            lines.append(
                f"| {s_['learning_rate']:g} | {s_['zo_eps']:g} | {s_['steps']} | {dl} | {da} | {s_['status']} |"
            )
    if (out / "rte_study").is_dir():
        from .study_report import study_report

        lines += ["", "Accuracy study (RTE, `zo-bench study`):", "", study_report(out / "rte_study")]
    gr = load("growth.json")
    if gr:
        lines += [
            "",
            "Growth:",
            "",
            "| model | params | batch | tokens | mezo step (s) | two forwards (s) | ratio | mezo peak RSS (MiB) | inference peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for v in list(gr["by_size"].values()) + list(gr["by_batch"].values()):
            lines.append(
                f"| {v['model']} | {v['param_count'] / 1e6:.1f}M | {v['batch_size']} | {v['batch_tokens']} | "
                f"{v['step_seconds_median']:.2f} | {v['two_forwards_seconds_median']:.2f} | {v['ratio']:.3f} | "
                f"{mib(v.get('mezo_peak_rss_bytes'))} | {mib(v.get('inference_peak_rss_bytes'))} |"
            )
        lines.append("")
        lines.append("log-log slopes: " + ", ".join(f"{k} {fmt(v)}" for k, v in gr["loglog_slopes"].items()))
    return "\n".join(lines) + "\n"
