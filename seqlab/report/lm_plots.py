"""Figures and page of the language-model comparison (``seqlab compare-lm``): loss against training FLOPs and
wall time, log x, one line per (model, size), and validation bits per byte against total FLOPs per family -- the
shape of the Mamba paper's scaling figure (Gu & Dao 2023, Fig. 4) at CPU scale. Self-contained HTML, PNGs inline.

    write_lm_report(results, "runs/compare-lm/report.html")   # results: the results.json dict or its path
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from seqlab.report import plots
from seqlab.report.html import CSS

X_LABELS = {"flops": "training FLOPs (log scale)", "wall_s": "training wall time, s (log scale)",
            "tokens": "training tokens (log scale)"}  # fmt: skip


_SIZE_DASHES = ("-", "--", ":", "-.")


def _label(entry: dict) -> str:
    return f"{entry['model']}/{entry['size']}"


def _smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over ``window`` logged points (a single step's loss is noisy)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def loss_curves(curves: list[dict], x: str, records: list[dict] | None = None) -> str | None:
    """Training loss (trailing mean of 5 logged steps) against ``x`` ("flops", "wall_s" or "tokens"), log x; the
    final validation loss of each run as a marker at the run's end."""
    lines = [(c, [p for p in c.get("points", []) if p.get(x) and p.get("loss") is not None]) for c in curves]
    lines = [(c, pts) for c, pts in lines if pts]
    fig = plots._figure(6.4, 3.8) if lines else None
    if fig is None:
        return None
    families = plots.model_styles(list(dict.fromkeys(c["model"] for c, _ in lines)))  # colour + marker per family
    sizes = list(dict.fromkeys(c["size"] for c, _ in lines))  # dash per size
    ax = fig.add_subplot(1, 1, 1)
    final = {_label(r): r for r in records or [] if "val_loss" in r}
    for c, pts in lines:
        style = {"color": families[c["model"]]["color"], "linestyle": _SIZE_DASHES[sizes.index(c["size"]) % 4]}
        marker = families[c["model"]]["marker"]
        ax.plot([p[x] for p in pts], _smooth([p["loss"] for p in pts]), label=_label(c), linewidth=1.5, **style)
        rec = final.get(_label(c))
        if rec and rec.get(x):
            ax.plot([rec[x]], [rec["val_loss"]], marker=marker, color=style["color"], markersize=7, linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"training loss vs {x.replace('_s', ' time')} (markers: validation loss)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return plots._data_uri(fig)


def scaling_figure(records: list[dict]) -> str | None:
    """Validation bits per byte against total training FLOPs, one line per family through its sizes."""
    by_model: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        if r.get("flops") and r.get("val_bpb") is not None:
            by_model.setdefault(r["model"], []).append((r["flops"], r["val_bpb"], r["size"]))
    fig = plots._figure(6.4, 3.8) if by_model else None
    if fig is None:
        return None
    styles = plots.model_styles(list(by_model))
    ax = fig.add_subplot(1, 1, 1)
    for model, points in by_model.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], label=model, **styles[model])
        for flops, bpb, size in points:
            ax.annotate(size, (flops, bpb), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log scale)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("validation bpb vs compute (lower left is better)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return plots._data_uri(fig)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec)


def _table(records: list[dict]) -> str:
    head = ("model", "size", "params", "non-emb. params", "tokens", "FLOPs", "FLOPs/token", "train loss",
            "val loss", "val bpb", "val ppl", "wall s", "tokens/s")  # fmt: skip
    rows = []
    for r in records:
        if "error" in r:
            rows.append(f"<tr><td class='model'>{escape(_label(r))}</td><td colspan='{len(head) - 1}' "
                        f"class='missing'>{escape(r['error'])}</td></tr>")  # fmt: skip
            continue
        cells = [_fmt(r.get("params"), ","), _fmt(r.get("params_nonembedding"), ","), _fmt(r.get("tokens"), ","),
                 _fmt(r.get("flops"), ".3g"), _fmt(r.get("flops_per_token"), ".3g"), _fmt(r.get("train_loss"), ".4f"),
                 _fmt(r.get("val_loss"), ".4f"), _fmt(r.get("val_bpb"), ".4f"), _fmt(r.get("val_ppl"), ".3f"),
                 _fmt(r.get("wall_s"), ".1f"), _fmt(r.get("tokens_per_s"), ",.0f")]  # fmt: skip
        rows.append(f"<tr><td class='model'>{escape(r['model'])}</td><td>{escape(r['size'])}</td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")  # fmt: skip
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table class='compare'><tr>{header}</tr>{''.join(rows)}</table>"


def _figure_html(uri: str | None, alt: str) -> str:
    if uri is None:
        return f"<p class='note'>({escape(alt)}: no figure -- matplotlib missing or nothing to draw)</p>"
    return f"<img src='{uri}' alt='{escape(alt)}'>"


def render_lm_report(results: dict | str | Path) -> str:
    data = json.loads(Path(results).read_text()) if isinstance(results, (str, Path)) else results
    meta, records, curves = data.get("meta", {}), data.get("results", []), data.get("curves", [])
    config = meta.get("config", {})
    sub = " · ".join(escape(str(x)) for x in (meta.get("date"), meta.get("machine"), meta.get("device")) if x)
    notes = (
        f"Every run: {escape(str(config.get('tokens')))} requested training tokens "
        f"({escape(str(meta.get('steps')))} steps × {escape(str(meta.get('tokens_per_step')))} tokens), "
        f"AdamW, lr {escape(str(config.get('lr')))}, warmup then cosine decay, sequence length "
        f"{escape(str(config.get('seqlen')))}, documents packed with a separator and state reset at each document "
        "(seq_idx). Validation: held-out documents read in order, first "
        f"{escape(str(config.get('eval_tokens') or 'all'))} tokens. Bits per byte = total nats / ln 2 / UTF-8 bytes "
        "covered. FLOPs: seqlab.bench.flops (6N for weight matmuls, plus attention's 4·L·d per layer and the scan "
        "terms, ×3 for training). Wall time: optimiser steps only, on the machine above."
    )
    data_spec = meta.get("data", {})
    figures = "".join(
        f"<div>{_figure_html(uri, alt)}</div>"
        for uri, alt in (
            (loss_curves(curves, "flops", records), "loss vs FLOPs"),
            (loss_curves(curves, "wall_s", records), "loss vs wall time"),
            (scaling_figure(records), "validation bpb vs FLOPs"),
        )
    )
    command = meta.get("command") or "seqlab compare-lm"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>seqlab compare-lm report</title><style>{CSS}</style></head><body>"
        f"<h1>seqlab compare-lm</h1><div class='sub'>{sub}</div>"
        f"<p>Language modelling on <code>{escape(str(data_spec.get('data')))}</code> "
        f"(tokenizer: {escape(str(data_spec.get('tokenizer') or 'bytes'))}; "
        f"{escape(str(meta.get('train_tokens_available')))} training tokens, "
        f"{escape(str(meta.get('validation_tokens_available')))} validation tokens in "
        f"{escape(str(meta.get('validation_documents')))} held-out documents).</p>"
        f"<h2>Results at equal training tokens</h2>{_table(records)}<p class='note'>{notes}</p>"
        f"<h2>Loss against compute and time</h2><div class='row'>{figures}</div>"
        f"<h2>How to reproduce</h2><pre>{escape(command)}</pre>"
        "</body></html>"
    )


def write_lm_report(results: dict | str | Path, out_path: str | Path) -> Path:
    """Write the page to ``out_path`` atomically; return the path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(render_lm_report(results), encoding="utf-8")
    tmp.replace(out_path)
    return out_path
