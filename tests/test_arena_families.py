"""The newer recurrent families (linear transformer, RWKV-6/7, Griffin, mLSTM) in the arena: every budget offers
them parameter-matched, the gpu and paper line-ups include them, the cpu default line-up stays within its
10-minute limit, and a seconds-long run with two of them writes a valid results.json."""

from __future__ import annotations

import json

import pytest

from seqlab.arena.budgets import BUDGETS, NEW_FAMILIES, match_width
from seqlab.cli import main
from seqlab.tasks import make_task


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_new_families_are_matched_within_20_percent(budget):
    plan = BUDGETS[budget]
    for task_name in plan.default_tasks:
        vocab = make_task(task_name, **plan.tasks[task_name].args).vocab_size
        params = {m: match_width(plan.models[m], plan.target_params, vocab)[1] for m in NEW_FAMILIES}
        assert max(params.values()) <= 1.2 * plan.target_params, (task_name, params)
        assert min(params.values()) >= 0.8 * plan.target_params, (task_name, params)


def test_every_budget_offers_the_new_families_and_gpu_and_paper_run_them_by_default():
    for budget in BUDGETS.values():
        assert set(NEW_FAMILIES) <= set(budget.models), budget.name
    for name in ("gpu", "paper"):
        assert set(NEW_FAMILIES) <= set(BUDGETS[name].default_models), name
    cpu = BUDGETS["cpu"]
    assert not set(NEW_FAMILIES) & set(cpu.default_models)
    assert len(cpu.default_tasks) * len(cpu.default_models) * cpu.run_time_s / cpu.jobs <= 600


def test_paper_budget_builds_every_new_family_at_d_64():
    paper = BUDGETS["paper"]
    for name in NEW_FAMILIES:
        d_model, params = match_width(paper.models[name], paper.target_params, 16)
        assert d_model == 64 and params > 0, name


@pytest.fixture(scope="module")
def arena_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena_families")
    argv = ["arena", "--budget", "smoke", "--tasks", "mqar", "--models", "rwkv6,griffin", "--out", str(out),
            "--device", "cpu", "--jobs", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_smoke_arena_with_rwkv6_and_griffin_writes_valid_results(arena_run):
    document = json.loads((arena_run / "results.json").read_text())
    assert set(document["meta"]["models"]) == {"rwkv6", "griffin"}
    records = document["results"]
    for model in ("rwkv6", "griffin"):
        mine = {r["metric"]: r for r in records if r["task"] == "mqar" and r["model"] == model}
        assert 0 <= mine["accuracy"]["value"] <= 1
        assert mine["params"]["value"] > 0 and mine["tokens_per_s"]["value"] > 0
        assert mine["train_steps"]["value"] >= 1
        # constant-size recurrent state: the same at 1K and 100K tokens for RWKV-6; Griffin's local attention
        # keeps at most its window, so its state stops growing too
        assert mine["state_bytes_100k"]["value"] == mine["state_bytes_1k"]["value"], model


def test_memory_command_accepts_a_new_family(capsys):
    assert main(["memory", "--model", "rwkv6:small"]) == 0
    assert capsys.readouterr().out.strip()
