"""Figures of the report as self-contained PNG data URIs (matplotlib, Agg canvas, no pyplot global state).

Every function returns ``"data:image/png;base64,..."`` or None when matplotlib is not installed or there is
nothing to draw, so the report degrades to tables instead of failing.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

Series = Mapping[str, Sequence[tuple[float, float]]]  # model -> [(x, y), ...]
Styles = Mapping[str, dict]  # model -> matplotlib line keyword arguments
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_DASHES = ("-", "--", "-.", ":")


def model_styles(models: Sequence[str]) -> dict[str, dict]:
    """One colour, marker and dash per model, the same in every figure of a report."""
    return {m: {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "linestyle": _DASHES[(i // 10) % 4]}
            for i, m in enumerate(models)}


def _style(styles: Styles | None, model: str, index: int, marker: bool = True) -> dict:
    style = dict((styles or {}).get(model) or model_styles([""] * (index + 1))[""])
    if not marker:
        style.pop("marker", None)
    return style


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _length_label(n: float) -> str:
    n = int(n)
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def length_curves(series: Series, title: str, ylabel: str = "accuracy (%)",
                  train_length: int | None = None, styles: Styles | None = None) -> str | None:
    """One line per model: score vs sequence length (log2 axis when lengths span 4x or more)."""
    series = {m: sorted(points) for m, points in series.items() if points}
    fig = _figure(6.4, 3.6) if series else None
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    xs = sorted({x for points in series.values() for x, _ in points})
    for i, (model, points) in enumerate(series.items()):
        # later models drawn a little thinner so that equal curves stay visible underneath each other
        ax.plot([x for x, _ in points], [y for _, y in points], label=model, markersize=6 - 0.5 * min(i, 6),
                linewidth=2.2 - 0.2 * min(i, 6), alpha=0.9, **_style(styles, model, i))
    if xs and xs[-1] >= 4 * xs[0] > 0:
        ax.set_xscale("log", base=2)
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([_length_label(x) for x in xs], rotation=45 if len(xs) > 6 else 0)
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1)
        ax.annotate("train length", (train_length, 2), color="grey", fontsize=8, rotation=90, ha="right")
    ax.set_ylim(-3, 103)
    ax.axhline(50, color="#ccc", linewidth=0.8, zorder=0)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _data_uri(fig)


def heatmaps(grids: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[Sequence[float | None]]]],
             title: str) -> str | None:
    """One panel per model: score (%) over depth (rows) x length (columns); None cells left blank."""
    grids = {m: g for m, g in grids.items() if g[0] and g[1]}
    if not grids:
        return None
    n = len(grids)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    n_lengths = max(len(g[0]) for g in grids.values())
    n_depths = max(len(g[1]) for g in grids.values())
    panel_w, panel_h = min(4.2, 1.4 + 0.55 * n_lengths), min(3.2, 1.2 + 0.4 * n_depths)
    fig = _figure(panel_w * cols + 0.9, panel_h * rows + 0.5)
    if fig is None:
        return None
    fig.set_layout_engine("constrained")
    image = None
    for i, (model, (lengths, depths, values)) in enumerate(grids.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        matrix = [[math.nan if v is None else v for v in row] for row in values]
        image = ax.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([_length_label(x) for x in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:.0%}" for d in depths], fontsize=8)
        for r, row in enumerate(matrix):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("length", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    fig.suptitle(title)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="exact match (%)")
    return _data_uri(fig)


def training_curves(series: Series, title: str, styles: Styles | None = None) -> str | None:
    """Training loss vs step, one line per model."""
    series = {m: sorted(points) for m, points in series.items() if points}
    fig = _figure(6.4, 3.4) if series else None
    if fig is None:
        return None
    ax = fig.add_subplot(1, 1, 1)
    for i, (model, points) in enumerate(series.items()):
        ax.plot([x for x, _ in points], [y for _, y in points], label=model, linewidth=1.6 - 0.15 * min(i, 6),
                **_style(styles, model, i, marker=False))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(y > 0 for points in series.values() for _, y in points):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _data_uri(fig)
