"""The PNGs of the speed, memory, accuracy and growth suites (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_bars(
    path: Path, values: dict[str, float], title: str, goal: float | None = None, ylabel: str = "ratio"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="tab:blue")
    for b, n in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{values[n]:.2f}", ha="center", va="bottom", fontsize=9)
    if goal is not None:
        ax.axhline(goal, color="tab:red", ls="--", lw=1, label=f"goal {goal}")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    base = [results[n]["rss_after_load_bytes"] / 2**20 for n in names]
    peak = [results[n]["peak_rss_during_steps_bytes"] / 2**20 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="RSS after load")
    ax.bar([i + 0.2 for i in x], peak, width=0.4, label="peak RSS during steps")
    for i, v in zip(x, peak):
        ax.text(i + 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=25, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Process RSS (one fresh process per configuration)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in payload["runs"].items():
        for ax, key in zip(axes, ("dev_accuracy_curve", "dev_loss_curve")):
            pts = run.get(key) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    zero_shot = payload.get("zero_shot", {})
    for acc in set(zero_shot.values()):
        axes[0].axhline(acc, ls=":", lw=1, color="gray")
    if zero_shot:
        text = ", ".join(f"{label} {acc:.3f}" for label, acc in zero_shot.items())
        axes[0].text(0, min(zero_shot.values()), f"zero-shot test accuracy: {text}", fontsize=7, va="bottom")
    axes[0].set_title("RTE dev accuracy vs ZO steps", fontsize=10)
    axes[1].set_title("RTE dev loss vs ZO steps", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_growth(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, xkey, xlabel in (
        (axes[0], "by_size", "param_count", "parameters"),
        (axes[1], "by_batch", "batch_size", "batch size"),
    ):
        rows = sorted(payload[key].values(), key=lambda r: r[xkey])
        xs = [r[xkey] for r in rows]
        ax.loglog(xs, [r["step_seconds_median"] for r in rows], "o-", label="mezo step (s)")
        ax.loglog(xs, [r["two_forwards_seconds_median"] for r in rows], "s--", label="two plain forwards (s)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        if rows and "mezo_peak_rss_bytes" in rows[0]:
            ax2 = ax.twinx()
            ax2.loglog(
                xs,
                [r["mezo_peak_rss_bytes"] / 2**20 for r in rows],
                "^-",
                color="tab:green",
                label="mezo peak RSS (MiB)",
            )
            ax2.loglog(
                xs,
                [r["inference_peak_rss_bytes"] / 2**20 for r in rows],
                "v:",
                color="tab:olive",
                label="inference peak RSS (MiB)",
            )
            ax2.set_ylabel("MiB")
            ax2.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="upper left")
    slopes = payload["loglog_slopes"]
    axes[0].set_title(
        f"vs model size (slope time {fmt(slopes['step_time_vs_params'])}, "
        f"RSS {fmt(slopes['mezo_peak_rss_vs_params'])})",
        fontsize=9,
    )
    axes[1].set_title(
        f"vs batch (slope time {fmt(slopes['step_time_vs_batch'])}, RSS {fmt(slopes['mezo_peak_rss_vs_batch'])})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"
