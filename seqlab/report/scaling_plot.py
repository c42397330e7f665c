"""Scaling curves: seconds per unit of work against sequence length, log-log, one line per model."""

from __future__ import annotations

from pathlib import Path


def plot_scaling(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Write a PNG of ``records`` (ScalingPoint dicts); failed lengths are marked with an x at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    models = list(dict.fromkeys(r["model"] for r in records))
    for name in models:
        ok = [r for r in records if r["model"] == name and r["status"] == "ok"]
        failed = [r for r in records if r["model"] == name and r["status"] != "ok"]
        line = ax.plot([r["length"] for r in ok], [r["seconds"] for r in ok], marker="o", label=name)[0]
        if failed and ok:
            top = max(r["seconds"] for r in ok)
            ax.scatter([r["length"] for r in failed], [top * 1.5] * len(failed), marker="x", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    mode = records[0]["mode"] if records else ""
    ax.set_ylabel("seconds per token" if mode == "decode" else "seconds per call")
    ax.set_title(title or f"{mode} time vs length (x: out of memory or over time)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
