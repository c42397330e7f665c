"""Specification of the arena report: one self-contained HTML page and a terminal table from results.json."""

from __future__ import annotations

import math
import re

import pytest

from seqlab.errors import InputError
from seqlab.report import comparison, render_html, summary_table, write_report
from seqlab.tasks import published_results

MODELS = ("transformer", "s4", "mamba", "mamba2")


def synthetic_results(seeds=(0, 1)) -> dict:
    """A results.json as the arena writes it, with known values and a few holes."""
    records = []
    add = lambda **r: records.append({"split": "test", **r})
    skill = {"transformer": 0.95, "s4": 0.2, "mamba": 0.99, "mamba2": 0.9}
    for m in MODELS:
        for seed in seeds:
            add(task="selective_copy", model=m, metric="accuracy", value=skill[m], length=256, seed=seed)
            for length in (64, 128):
                add(task="mqar", model=m, metric="accuracy", value=skill[m] * 64 / length, length=length, seed=seed)
            for k in range(6, 13):  # induction heads at 64 .. 4096, trained at 256
                acc = 1.0 if m in ("mamba", "mamba2") or 2**k <= 512 else 0.1
                add(task="induction_heads", model=m, metric="accuracy", value=acc, length=2**k, seed=seed)
            for length in (8, 16, 32):
                add(task="state_tracking", model=m, metric="accuracy", value=0.5 * skill[m], length=length, seed=seed)
            if m != "s4":  # s4 never ran passkey: its cell must read "—"
                for length in (256, 512):
                    for depth in (0.0, 0.5, 1.0):
                        add(task="passkey", model=m, metric="exact_match", value=skill[m] - depth / 10,
                            length=length, depth=depth, seed=seed)
            for step in range(0, 100, 10):
                records.append({"task": "mqar", "model": m, "metric": "train_loss", "value": 5.0 / (1 + step),
                                "step": step, "seed": seed, "split": "train"})
        if m == "mamba2":  # throughput as a field of an accuracy record
            records[-1]["tokens_per_s"] = 7000.0
        else:  # or as a record of its own
            add(task="selective_copy", model=m, metric="tokens_per_s", value=1000.0 * (len(m) + 1), length=256, seed=0)
    # the training-split accuracy must not leak into the table
    add(task="selective_copy", model="s4", metric="accuracy", value=1.0, length=256, seed=0, split="train")
    meta = {
        "budget": "tiny", "date": "2026-01-01T00:00:00Z", "machine": "test box (2 cores)", "torch": "2.13",
        "seqlab": "0.1.0", "duration_s": 12.5, "command": "seqlab arena --budget tiny --out runs/arena",
        "models": {m: {"params": 100_000 * (i + 1), "preset": m, "config": {"d_model": 64}}
                   for i, m in enumerate(MODELS)},
        "errors": [{"task": "induction_heads", "model": "s4", "length": 2**20, "error": "OutOfMemoryError: boom"}],
        "tasks": {"induction_heads": {"seqlen": 256}, "mqar": {"seqlen": 64}},
        "published": published_results(),
    }
    for i, m in enumerate(MODELS):
        if m != "mamba2":  # mamba2 has no memory numbers: "—"
            meta["models"][m]["state_bytes_1k"] = 1024 * (i + 1)
            meta["models"][m]["state_bytes_100k"] = 1024 * (i + 1) * (100 if m == "transformer" else 1)
    return {"results": records, "meta": meta}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = write_report(synthetic_results(), tmp_path_factory.mktemp("report") / "sub" / "report.html")
    return path.read_text(encoding="utf-8")


def test_report_is_written_and_holds_the_table_values(page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for m in MODELS:
        assert f"<td class='model'>{m}</td>" in page
    assert "99.0" in page and "20.0" in page  # selective copy: mamba, s4 (the train-split 100% is not used)
    assert "99.8 (paper)" in page and "18.3 (paper)" in page  # published beside ours
    assert "@4K" in page and "&gt; 4K" in page and ">1K<" in page  # induction: longest length, never / first fail


def test_report_is_self_contained(page):
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page) and not re.search(r"<link[^>]*\bhref=", page)
    sources = re.findall(r"<img[^>]*\bsrc='([^']*)'", page)
    assert len(sources) >= 6  # five tasks with lengths + passkey heatmap + training curves
    assert all(s.startswith("data:image/png;base64,") for s in sources)


def test_report_shows_metadata_and_how_to_reproduce(page):
    assert "seqlab arena --budget tiny --out runs/arena" in page
    assert "test box (2 cores)" in page and "Published numbers" in page and "Training curves" in page
    assert "OutOfMemoryError: boom" in page  # failed evaluations are listed


def test_missing_metrics_are_shown_as_dashes():
    models, cells = comparison(synthetic_results())
    assert cells["s4"]["passkey"].value is None and cells["mamba2"]["state_1k"].value is None
    text = summary_table(synthetic_results())
    s4_row = next(line for line in text.splitlines() if line.startswith("s4 "))
    assert "—" in s4_row


def test_comparison_values_follow_the_aggregation_rules():
    _, cells = comparison(synthetic_results())
    assert cells["mamba"]["selective_copy"].value == pytest.approx(99.0)
    assert cells["s4"]["selective_copy"].value == pytest.approx(20.0)  # the split="train" 100% is excluded
    assert cells["mamba"]["mqar"].value == pytest.approx((99.0 + 49.5) / 2)  # mean over lengths
    assert cells["transformer"]["induction_longest"].value == pytest.approx(10.0)
    assert cells["transformer"]["induction_longest"].length == 4096
    assert cells["transformer"]["induction_fails"].value == 1024
    assert cells["mamba"]["induction_fails"].never_fails
    assert cells["mamba"]["passkey"].value == pytest.approx(99.0 - 5.0)  # mean over depths 0, .5, 1
    assert cells["mamba"]["params"].value == 300_000
    assert cells["mamba"]["tokens_per_s"].value == 6000.0 and cells["mamba2"]["tokens_per_s"].value == 7000.0
    assert cells["transformer"]["state_100k"].value == 1024 * 100
    assert cells["mamba"]["selective_copy"].published[0][0] == pytest.approx(99.8)


def test_published_numbers_match_by_model_name_or_preset():
    results = synthetic_results(seeds=(0,))
    results["meta"]["models"]["mamba"]["preset"] = "Mamba"
    results["meta"]["models"] = {("my-" + k if k == "mamba" else k): v for k, v in results["meta"]["models"].items()}
    for r in results["results"]:
        r["model"] = "my-mamba" if r["model"] == "mamba" else r["model"]
    _, cells = comparison(results)
    assert cells["my-mamba"]["selective_copy"].published[0][0] == pytest.approx(99.8)
    assert cells["mamba2"]["selective_copy"].published == ()


def test_summary_table_lists_every_model_and_column():
    text = summary_table(synthetic_results())
    lines = text.splitlines()
    assert lines[0].split()[0] == "model" and "sel.copy" in lines[0] and "state@100K" in lines[0]
    for m in MODELS:
        assert any(line.split()[0] == m for line in lines[2:])
    assert "99.8 (paper)" in text


def test_empty_and_partial_results_still_render(tmp_path):
    assert "No results yet" in render_html({"results": [], "meta": {}})
    assert "(no results)" in summary_table({"results": []})
    one = {"results": [{"task": "mqar", "model": "m", "metric": "accuracy", "value": float("nan"), "seed": 0},
                       {"task": "custom", "model": "m", "metric": "accuracy", "value": 0.5}]}
    page = write_report(one, tmp_path / "r.html").read_text()
    assert "custom" in page and "50.0" in page
    assert not math.isnan(comparison(one)[1]["m"]["mqar"].value or 0.0)


def test_results_json_path_is_accepted(tmp_path):
    from seqlab.io import write_json

    write_json(tmp_path / "results.json", synthetic_results(seeds=(0,)))
    assert "mamba2" in summary_table(tmp_path / "results.json")


def test_malformed_results_raise_input_error():
    with pytest.raises(InputError, match="results"):
        render_html({"results": "not a list"})
    with pytest.raises(InputError, match="meta"):
        summary_table({"results": [], "meta": [1]})


def test_arena_style_records_params_per_task_and_published_ranges():
    results = synthetic_results(seeds=(0,))
    for i, m in enumerate(MODELS):
        results["meta"]["models"][m]["params"] = {"mqar": 1000 * (i + 1), "selective_copy": 3000 * (i + 1)}
        for task in ("mqar", "selective_copy"):  # the arena writes params as records of their own, per task
            n = results["meta"]["models"][m]["params"][task]
            results["results"].append({"task": task, "model": m, "metric": "params", "value": n, "seed": 0})
    results["meta"]["published"].append({"task": "mqar", "model": "mamba2", "metric": "accuracy", "value": 0.88,
                                         "value_max": 0.99, "source": "Mamba-2 Fig. 8"})
    results["meta"]["interrupted"] = True
    _, cells = comparison(results)
    assert cells["mamba"]["params"].value == pytest.approx(6000)  # mean of 3k and 9k
    page = render_html(results)
    assert "88.0–99.0 (paper)" in page and "mqar: 3k, selective_copy: 9k" in page and "interrupted" in page
