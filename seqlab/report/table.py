"""The arena's comparison table, computed from results.json content: one row per model.

Input (the arena's results.json):
    {"results": [{"task", "model", "metric", "value", "length", "seed", optional "params", "tokens_per_s",
                  "state_bytes_1k", "state_bytes_100k", "depth", "split", "step"}, ...],
     "meta": {"budget", "date", "machine", "torch", "seqlab", "duration_s", "command",
              "models": {name: {"params", "preset", "config"}}, "tasks": {name: config},
              "published": [{"task", "model", "metric", "value", "source"}, ...]}}
Score values may be fractions (0..1) or percents; they are shown in percent. Records with split "train" never
enter the score columns. A score cell is the mean over seeds at each tested length, then over lengths (and
passkey depths); the induction columns use the accuracy at the longest tested length and the first length
where accuracy falls below 50%.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqlab.errors import InputError

MISSING = "—"


@dataclass(frozen=True)
class Column:
    key: str
    group: str
    header: str
    short: str  # terminal header
    kind: str  # "score" | "fail_length" | "rate" | "count" | "bytes"
    task: str | None = None
    metrics: tuple[str, ...] = ()
    reduce: str = "mean"  # "mean" | "longest" | "fail_length"
    field: str | None = None  # record field / meta.models field for efficiency columns


COLUMNS: tuple[Column, ...] = (
    Column("selective_copy", "Selective memory", "Selective copy acc %", "sel.copy", "score", "selective_copy",
           ("accuracy",)),
    Column("mqar", "Precise recall", "MQAR acc %", "mqar", "score", "mqar", ("accuracy",)),
    Column("passkey", "Precise recall", "Passkey exact %", "passkey", "score", "passkey", ("exact_match", "accuracy")),
    Column("induction_longest", "Length extrapolation", "Induction acc % @ longest", "induct@max", "score",
           "induction_heads", ("accuracy",), reduce="longest"),
    Column("induction_fails", "Length extrapolation", "Induction < 50% from", "ind<50%", "fail_length",
           "induction_heads", ("accuracy",), reduce="fail_length"),
    Column("state_tracking", "State tracking", "State tracking acc %", "state", "score", "state_tracking",
           ("accuracy",)),
    Column("tokens_per_s", "Efficiency", "Train tokens/s", "tok/s", "rate", field="tokens_per_s"),
    Column("params", "Efficiency", "Parameters", "params", "count", field="params"),
    Column("state_1k", "Efficiency", "State @ 1K tok", "state@1K", "bytes", field="state_bytes_1k"),
    Column("state_100k", "Efficiency", "State @ 100K tok", "state@100K", "bytes", field="state_bytes_100k"),
)


@dataclass
class Cell:
    value: float | None = None  # percent for scores, a length for fail_length, raw number otherwise
    length: int | None = None  # the length a "longest" value was measured at
    never_fails: bool = False  # fail_length: accuracy stayed >= 50% at every tested length
    published: tuple[tuple[float, float | None, str], ...] = ()  # (percent, upper end of a range or None, source)


# ---- loading and normalising --------------------------------------------------------------------------------

def load_results(results: dict | str | Path) -> dict[str, Any]:
    """Accept the results dict or a path to results.json; check its outline."""
    if isinstance(results, (str, Path)):
        from seqlab.io import read_json

        results = read_json(results)
    if not isinstance(results, dict) or not isinstance(results.get("results", []), list):
        raise InputError("results", 'a dict {"results": [...], "meta": {...}}', type(results).__name__)
    meta = results.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError("results['meta']", "a dict", type(meta).__name__)
    return {"results": [r for r in results.get("results", []) if isinstance(r, dict)], "meta": meta}


def as_percent(value: Any) -> float | None:
    """Score in percent: fractions in [0, 1] are scaled, larger numbers are taken as percents already."""
    number = as_number(value)
    if number is None:
        return None
    return number * 100.0 if abs(number) <= 1.0 else number


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def model_names(data: dict[str, Any]) -> list[str]:
    """Models in meta order, then any others in order of first appearance in the records."""
    names = list((data["meta"].get("models") or {}).keys())
    for record in data["results"]:
        name = record.get("model")
        if isinstance(name, str) and name not in names and record.get("metric") != "train_loss":
            names.append(name)
    return names


def is_test(record: dict[str, Any]) -> bool:
    return record.get("split", "test") != "train" and record.get("metric") != "train_loss"


def scores_by_length(data: dict[str, Any], task: str, model: str, metrics: tuple[str, ...]) -> dict[int | None, float]:
    """{length: mean percent over seeds (and depths)} for the first of ``metrics`` that has records."""
    for metric in metrics:
        groups: dict[int | None, list[float]] = defaultdict(list)
        for r in data["results"]:
            if r.get("task") == task and r.get("model") == model and r.get("metric") == metric and is_test(r):
                value = as_percent(r.get("value"))
                if value is not None:
                    length = r.get("length")
                    groups[length if isinstance(length, int) else None].append(value)
        if groups:
            return {length: sum(v) / len(v) for length, v in groups.items()}
    return {}


def _published(data: dict[str, Any], column: Column, model: str) -> tuple[tuple[float, float | None, str], ...]:
    info = (data["meta"].get("models") or {}).get(model)
    names = {model.lower()}
    if isinstance(info, dict) and isinstance(info.get("preset"), str):
        names.add(info["preset"].lower())  # "mamba-small" run from preset "mamba" matches the paper's "mamba"
    out = []
    for p in data["meta"].get("published") or []:
        if not isinstance(p, dict):
            continue
        if (p.get("task") == column.task and str(p.get("model", "")).lower() in names
                and p.get("metric", column.metrics[0]) in column.metrics):
            value = as_percent(p.get("value"))
            if value is not None:
                out.append((value, as_percent(p.get("value_max")), str(p.get("source", "paper"))))
    return tuple(out)


def _efficiency(data: dict[str, Any], model: str, field: str) -> float | None:
    """A record field (or a record whose metric is the field's name), else meta.models[model][field]."""
    values = []
    for r in data["results"]:
        if r.get("model") != model:
            continue
        value = as_number(r.get(field))
        if value is None and r.get("metric") == field:
            value = as_number(r.get("value"))
        if value is not None:
            values.append(value)
    if values:
        return sum(values) / len(values)
    info = (data["meta"].get("models") or {}).get(model) or {}
    return as_number(info.get(field)) if isinstance(info, dict) else None


def compute_cell(data: dict[str, Any], column: Column, model: str) -> Cell:
    if column.field is not None:
        return Cell(value=_efficiency(data, model, column.field))
    by_length = scores_by_length(data, column.task, model, column.metrics)
    published = _published(data, column, model) if column.kind == "score" else ()
    if not by_length:
        return Cell(published=published)
    known = sorted(length for length in by_length if length is not None)
    if column.reduce == "mean":
        return Cell(value=sum(by_length.values()) / len(by_length), published=published)
    if not known:  # no lengths recorded: the longest is the only one there is
        return Cell(value=sum(by_length.values()) / len(by_length), published=published)
    if column.reduce == "longest":
        return Cell(value=by_length[known[-1]], length=known[-1], published=published)
    failing = [length for length in known if by_length[length] < 50.0]
    if failing:
        return Cell(value=float(failing[0]))
    return Cell(value=float(known[-1]), never_fails=True)


def comparison(results: dict | str | Path) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """(models, {model: {column key: Cell}}) — the centrepiece of the report."""
    data = load_results(results)
    models = model_names(data)
    return models, {m: {c.key: compute_cell(data, c, m) for c in COLUMNS} for m in models}


# ---- formatting ---------------------------------------------------------------------------------------------

def format_length(n: float | int) -> str:
    n = int(n)
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def format_bytes(x: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{int(x)} B"


def format_value(column: Column, cell: Cell) -> str:
    """Our number alone (no published part); MISSING when absent."""
    if cell.value is None:
        return MISSING
    if column.kind == "score":
        text = f"{cell.value:.1f}"
        return f"{text} @{format_length(cell.length)}" if cell.length is not None else text
    if column.kind == "fail_length":
        return f"> {format_length(cell.value)}" if cell.never_fails else format_length(cell.value)
    if column.kind == "rate":
        return format_count(cell.value)
    if column.kind == "count":
        return format_count(cell.value)
    return format_bytes(cell.value)


def format_published(cell: Cell) -> str:
    return ", ".join(f"{value:.1f}" + (f"–{high:.1f}" if high is not None else "") + " (paper)"
                     for value, high, _ in cell.published)


def summary_table(results: dict | str | Path) -> str:
    """The comparison table as plain text for a terminal; published numbers in parentheses."""
    models, cells = comparison(results)
    header = ["model"] + [c.short for c in COLUMNS]
    rows = []
    for m in models:
        row = [m]
        for c in COLUMNS:
            cell = cells[m][c.key]
            text = format_value(c, cell)
            if cell.published:
                text += " [" + format_published(cell) + "]"
            row.append(text)
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if not rows:
        out.append("(no results)")
    return "\n".join(out)
