"""One self-contained HTML page from the arena's results: inline CSS, figures as base64 PNG, no network.

    write_report(results, "runs/arena/report.html")   # results: the results.json dict, or its path

Page: the comparison table (one row per model; published numbers beside ours; cells coloured by value), a
figure per task (score vs length per model; passkey as a length x depth heatmap; training curves when records
with metric "train_loss" and "step" exist) with the numbers underneath, the published numbers, the run's
metadata and the command that reproduces it. Schema and aggregation rules: ``seqlab.report.table``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from html import escape
from pathlib import Path
from typing import Any

from seqlab.report import plots
from seqlab.report.table import (
    COLUMNS,
    MISSING,
    Cell,
    Column,
    as_number,
    as_percent,
    comparison,
    format_length,
    format_published,
    format_value,
    is_test,
    load_results,
    model_names,
    scores_by_length,
)

TASK_TITLES = {
    "selective_copy": ("Selective copying", "Mamba (Gu & Dao 2023) sec. 4.1.1: copy the data tokens scattered "
                       "among noise."),
    "induction_heads": ("Induction heads", "Mamba sec. 4.1.2: recall the token after the trigger; tested beyond the "
                        "training length."),
    "mqar": ("Multi-query associative recall", "Zoology (Arora et al. 2023): recall the value of every queried key."),
    "passkey": ("Passkey retrieval", "Find 'The magic word is X.' at any depth of a long filler text (bytes)."),
    "state_tracking": ("State tracking", "Merrill et al. 2024: running product of permutations (A5/S5) or parity."),
    "copy_digits": ("Copying digits", "Reproduce a 20-digit number seen at the start of a long prompt."),
}

CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; color: #1d2330;
       margin: 0 auto; max-width: 1280px; padding: 24px 32px; background: #fbfbfd; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #dde;
     padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 4px; }
.sub { color: #5a6275; margin-bottom: 18px; } .note { color: #5a6275; font-size: 12.5px; max-width: 1000px; }
table { border-collapse: collapse; margin: 8px 0; background: #fff; }
th, td { border: 1px solid #d9dce5; padding: 5px 9px; text-align: right; vertical-align: middle; }
th { background: #eef0f6; font-weight: 600; text-align: center; } td.model, th.model { text-align: left; }
table.compare td { min-width: 76px; } table.compare td.model { font-weight: 600; }
td .pub { display: block; color: #4b5266; font-size: 11.5px; } td small { color: #4b5266; }
td.missing { color: #9aa0ad; text-align: center; }
table.kv code { word-break: break-word; } table.kv td { max-width: 900px; }
.warn { background: #fff3cd; border: 1px solid #e8d48a; padding: 8px 12px; border-radius: 6px; }
table.kv td { text-align: left; } code, pre { font: 12.5px ui-monospace, Menlo, Consolas, monospace; }
pre { background: #1f2430; color: #e8eaf0; padding: 12px 14px; border-radius: 6px; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #e3e5ec; background: #fff; margin: 6px 0; }
details { margin: 4px 0 10px; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
summary { cursor: pointer; color: #3a4a8a; }
"""


# ---- colours ------------------------------------------------------------------------------------------------

def _hue(fraction: float) -> str:
    """Red (0) -> yellow -> green (1) background."""
    fraction = min(max(fraction, 0.0), 1.0)
    return f"background:hsl({120 * fraction:.0f},65%,84%)"


def _relative(values: list[float], value: float, higher_is_better: bool) -> float | None:
    """Position of ``value`` among ``values`` on a log scale, 1 = best; None when nothing to compare."""
    positive = [v for v in values if v > 0]
    if value <= 0 or len(positive) < 2 or max(positive) == min(positive):
        return None
    lo, hi = math.log(min(positive)), math.log(max(positive))
    t = (math.log(value) - lo) / (hi - lo)
    return t if higher_is_better else 1 - t


def _cell_style(column: Column, cell: Cell, column_cells: list[Cell]) -> str:
    if cell.value is None:
        return ""
    if column.kind == "score":
        return _hue(cell.value / 100)
    values = [c.value for c in column_cells if c.value is not None]
    if column.kind == "fail_length":
        if cell.never_fails:
            return _hue(1.0)
        t = _relative(values, cell.value, higher_is_better=True)
        return _hue(0.8 * t) if t is not None else _hue(0.2)
    if column.kind in ("rate", "bytes"):
        t = _relative(values, cell.value, higher_is_better=column.kind == "rate")
        return _hue(t) if t is not None else ""
    return ""


# ---- sections -----------------------------------------------------------------------------------------------

def _comparison_table(results: dict[str, Any]) -> str:
    models, cells = comparison(results)
    if not models:
        return "<p class='note'>No results yet.</p>"
    groups: list[tuple[str, int]] = []
    for column in COLUMNS:
        if groups and groups[-1][0] == column.group:
            groups[-1] = (column.group, groups[-1][1] + 1)
        else:
            groups.append((column.group, 1))
    head1 = "<th class='model' rowspan='2'>model</th>" + "".join(
        f"<th colspan='{n}'>{escape(group)}</th>" for group, n in groups)
    head2 = "".join(f"<th>{escape(c.header)}</th>" for c in COLUMNS)
    body = []
    for model in models:
        tds = [f"<td class='model'>{escape(model)}</td>"]
        for column in COLUMNS:
            cell = cells[model][column.key]
            ours = format_value(column, cell)
            if column.kind == "score" and cell.length is not None:
                ours = f"{cell.value:.1f} <small>@{escape(format_length(cell.length))}</small>"
            else:
                ours = escape(ours)
            published = ""
            if cell.published:
                sources = "; ".join(source for _, _, source in cell.published)
                published = f"<span class='pub' title='{escape(sources)}'>{escape(format_published(cell))}</span>"
            css = "missing" if cell.value is None else ""
            style = _cell_style(column, cell, [cells[m][column.key] for m in models])
            tds.append(f"<td class='{css}' style='{style}'>{ours}{published}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f"<table class='compare'><thead><tr>{head1}</tr><tr>{head2}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def _task_order(data: dict[str, Any]) -> list[str]:
    known = [c.task for c in COLUMNS if c.task] + list(TASK_TITLES)
    present = [r.get("task") for r in data["results"] if isinstance(r.get("task"), str)]
    return list(dict.fromkeys([t for t in known if t in present] + present))


def _task_metrics(data: dict[str, Any], task: str) -> tuple[str, ...]:
    for column in COLUMNS:
        if column.task == task:
            return column.metrics
    counts: dict[str, int] = defaultdict(int)
    for r in data["results"]:
        if r.get("task") == task and is_test(r) and isinstance(r.get("metric"), str):
            counts[r["metric"]] += 1
    return tuple(sorted(counts, key=lambda m: -counts[m]))


def _train_length(data: dict[str, Any], task: str) -> int | None:
    config = (data["meta"].get("tasks") or {}).get(task)
    if isinstance(config, dict):
        seqlen = config.get("seqlen", config.get("train_seqlen"))
        return seqlen if isinstance(seqlen, int) else None
    return None


def _numbers_table(by_model: dict[str, dict[int | None, float]]) -> str:
    lengths = sorted({n for values in by_model.values() for n in values if n is not None})
    has_none = any(None in values for values in by_model.values())
    columns = lengths + ([None] if has_none else [])
    head = "".join(f"<th>{escape(format_length(n)) if n is not None else 'all'}</th>" for n in columns)
    rows = []
    for model, values in by_model.items():
        tds = "".join(
            f"<td style='{_hue(values[n] / 100)}'>{values[n]:.1f}</td>" if n in values
            else f"<td class='missing'>{MISSING}</td>" for n in columns)
        rows.append(f"<tr><td class='model'>{escape(model)}</td>{tds}</tr>")
    return f"<table><tr><th class='model'>model \\ length</th>{head}</tr>{''.join(rows)}</table>"


def _passkey_grids(data: dict[str, Any], models: list[str], metrics: tuple[str, ...]):
    grids = {}
    for model in models:
        for metric in metrics:
            cells: dict[tuple[int, float], list[float]] = defaultdict(list)
            for r in data["results"]:
                if (r.get("task") == "passkey" and r.get("model") == model and r.get("metric") == metric
                        and is_test(r) and isinstance(r.get("length"), int) and as_number(r.get("depth")) is not None):
                    value = as_percent(r.get("value"))
                    if value is not None:
                        cells[(r["length"], float(r["depth"]))].append(value)
            if cells:
                lengths = sorted({n for n, _ in cells})
                depths = sorted({d for _, d in cells})
                values = [[(sum(cells[(n, d)]) / len(cells[(n, d)])) if (n, d) in cells else None for n in lengths]
                          for d in depths]
                grids[model] = (lengths, depths, values)
                break
    return grids


def _figure(uri: str | None, alt: str) -> str:
    return f"<img alt='{escape(alt)}' src='{uri}'>" if uri else ""


def _task_sections(data: dict[str, Any]) -> str:
    models = model_names(data)
    styles = plots.model_styles(models)
    out = []
    for task in _task_order(data):
        metrics = _task_metrics(data, task)
        by_model = {m: v for m in models if (v := scores_by_length(data, task, m, metrics))}
        if not by_model:
            continue
        title, blurb = TASK_TITLES.get(task, (task, ""))
        metric_name = next((m for m in metrics if any(r.get("task") == task and r.get("metric") == m
                                                       for r in data["results"])), metrics[0] if metrics else "")
        series = {m: [(n, v) for n, v in values.items() if n is not None] for m, values in by_model.items()}
        parts = [f"<h3>{escape(title)} <small><code>{escape(task)}</code></small></h3>",
                 f"<p class='note'>{escape(blurb)} Metric: {escape(metric_name)} (%), mean over seeds.</p>",
                 "<div class='row'>"]
        if any(len(s) > 1 for s in series.values()):
            parts.append(_figure(plots.length_curves(series, title, f"{metric_name} (%)",
                                                     _train_length(data, task), styles), f"{title}: score vs length"))
        if task == "passkey":
            grids = _passkey_grids(data, models, metrics)
            parts.append(_figure(plots.heatmaps(grids, "Passkey: exact match by length x depth"), "passkey heatmap"))
        parts.append(f"<details open><summary>numbers</summary>{_numbers_table(by_model)}</details></div>")
        out.append("".join(parts))
    return "".join(out) or "<p class='note'>No task results.</p>"


def _training_section(data: dict[str, Any]) -> str:
    curves: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in data["results"]:
        step, value = as_number(r.get("step")), as_number(r.get("value"))
        if r.get("metric") == "train_loss" and step is not None and value is not None:
            curves[str(r.get("task", "?"))][str(r.get("model", "?"))][step].append(value)
    parts = []
    styles = plots.model_styles(model_names(data))
    for task, by_model in curves.items():
        series = {m: [(s, sum(v) / len(v)) for s, v in steps.items()] for m, steps in by_model.items()}
        title = TASK_TITLES.get(task, (task,))[0]
        uri = plots.training_curves(series, f"{title}: training loss", styles)
        parts.append(_figure(uri, f"{task} training loss"))
    if not parts:
        return ""
    return "<h2>Training curves</h2>" + "".join(parts)


def _published_section(meta: dict[str, Any]) -> str:
    entries = [p for p in meta.get("published") or [] if isinstance(p, dict)]
    if not entries:
        return ""
    rows = "".join(
        f"<tr><td class='model'>{escape(str(p.get('task', '')))}</td>"
        f"<td class='model'>{escape(str(p.get('model', '')))}</td><td>{escape(str(p.get('metric', '')))}</td>"
        f"<td>{_fmt_pct(p.get('value'))}{_range_end(p)}</td>"
        f"<td class='model'>{escape(str(p.get('source', '')))}</td></tr>" for p in entries)
    return ("<h2>Published numbers</h2><p class='note'>At the papers' own scale (model size, sequence length, "
            "training budget); ours are measured at the arena's budget, so compare trends, not digits.</p>"
            "<table><tr><th class='model'>task</th><th class='model'>model</th><th>metric</th><th>value %</th>"
            f"<th class='model'>source</th></tr>{rows}</table>")


def _range_end(entry: dict[str, Any]) -> str:
    high = as_percent(entry.get("value_max"))
    return "" if high is None else f"–{high:.1f}"


def _fmt_pct(value: Any) -> str:
    pct = as_percent(value)
    return MISSING if pct is None else f"{pct:.1f}"


def _compact(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _metadata_section(meta: dict[str, Any]) -> str:
    scalars = [(k, v) for k, v in meta.items() if k not in ("models", "tasks", "published", "command", "errors")]
    rows = "".join(f"<tr><th class='model'>{escape(str(k))}</th><td>{escape(_compact(v))}</td></tr>"
                   for k, v in scalars)
    parts = ["<h2>Run</h2>", f"<table class='kv'>{rows}</table>" if rows else ""]
    models = meta.get("models") or {}
    if isinstance(models, dict) and models:
        body = "".join(
            f"<tr><td class='model'>{escape(name)}</td><td>{escape(_param_text(info))}</td>"
            f"<td class='model'>{escape(str(info.get('preset', '')) if isinstance(info, dict) else '')}</td>"
            f"<td class='model'>{_config_cell(info.get('config') if isinstance(info, dict) else None)}</td></tr>"
            for name, info in models.items())
        parts.append("<h3>Models</h3><table class='kv'><tr><th>model</th><th>params</th><th>preset</th>"
                     f"<th>config</th></tr>{body}</table>")
    tasks = meta.get("tasks") or {}
    if isinstance(tasks, dict) and tasks:
        body = "".join(f"<tr><td class='model'>{escape(str(name))}</td><td class='model'><code>"
                       f"{escape(_compact(config))}</code></td></tr>" for name, config in tasks.items())
        parts.append(f"<h3>Tasks</h3><table class='kv'><tr><th>task</th><th>config</th></tr>{body}</table>")
    parts.append(_errors_section(meta))
    return "".join(parts)


def _config_cell(config: Any) -> str:
    """Short configs inline; long ones folded."""
    if config in (None, "", {}):
        return MISSING
    text = escape(_compact(config))
    if len(text) <= 100:
        return f"<code>{text}</code>"
    return f"<details><summary>config</summary><code>{text}</code></details>"


def _param_text(info: Any) -> str:
    """meta.models[m]["params"]: one number, or {task: number} when widths were matched per task."""
    from seqlab.report.table import format_count

    params = info.get("params") if isinstance(info, dict) else None
    if isinstance(params, dict):
        parts = [f"{task}: {format_count(n)}" for task, n in params.items() if as_number(n) is not None]
        return ", ".join(parts) or MISSING
    number = as_number(params)
    return format_count(number) if number is not None else MISSING


def _errors_section(meta: dict[str, Any]) -> str:
    """Runs or evaluation lengths that failed (meta.errors), and a warning when the run was interrupted."""
    out = []
    if meta.get("interrupted"):
        out.append("<p class='warn'>This run was interrupted: the tables hold what was measured before.</p>")
    errors = [e for e in meta.get("errors") or [] if isinstance(e, dict)]
    if errors:
        keys = list(dict.fromkeys(k for e in errors for k in e))
        head = "".join(f"<th>{escape(str(k))}</th>" for k in keys)
        rows = "".join("<tr>" + "".join(f"<td class='model'>{escape(_compact(e.get(k, '')))}</td>" for k in keys)
                       + "</tr>" for e in errors)
        out.append(f"<h3>Errors</h3><table class='kv'><tr>{head}</tr>{rows}</table>")
    return "".join(out)


def _reproduce_section(meta: dict[str, Any]) -> str:
    command = meta.get("command")
    if not isinstance(command, str) or not command.strip():
        budget = meta.get("budget")
        command = "seqlab arena" + (f" --budget {budget}" if budget not in (None, "") else "")
    return ("<h2>How to reproduce</h2><pre>pip install -e '.[report]'\n"
            f"{escape(command)}</pre><p class='note'>Writes results.json and this report.html; "
            "<code>seqlab arena --help</code> lists the options. Seeds make every task sample reproducible; "
            "timings depend on the machine above.</p>")


def render_html(results: dict | str | Path) -> str:
    """The whole page as a string."""
    data = load_results(results)
    meta = data["meta"]
    sub = " · ".join(escape(f"{k}: {_compact(meta[k])}") for k in ("date", "budget", "machine", "seqlab")
                     if meta.get(k) not in (None, ""))
    notes = ("Score cells: test metric in %, mean over seeds and tested lengths (passkey: over its length × depth "
             "grid). Induction columns: accuracy at the longest tested length, and the first length where it falls "
             "below 50% (“&gt; N”: never, up to N). Published numbers, where known, are shown under ours with "
             "“(paper)”; hover for the source. State: inference memory of a batch of one at 1K and 100K tokens "
             "(KV cache for attention, fixed recurrent state for SSMs). Throughput and parameters: mean over the "
             "model's runs (tasks and seeds). Colours: red → green by score; for "
             "throughput and memory, relative across models on a log scale. “—”: not measured.")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>seqlab arena report</title><style>{CSS}</style></head><body>"
        f"<h1>seqlab arena</h1><div class='sub'>{sub}</div>"
        f"{_errors_section({'interrupted': meta.get('interrupted')})}"
        "<h2>Where each architecture wins and fails</h2>"
        f"{_comparison_table(data)}<p class='note'>{notes}</p>"
        f"<h2>Tasks</h2>{_task_sections(data)}"
        f"{_training_section(data)}{_published_section(meta)}{_metadata_section(meta)}{_reproduce_section(meta)}"
        "</body></html>"
    )


def write_report(results: dict | str | Path, out_path: str | Path) -> Path:
    """Write the self-contained report page to ``out_path`` (parent directories are created); return the path."""
    page = render_html(results)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_path)
    return out_path
