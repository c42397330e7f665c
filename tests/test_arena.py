"""The arena: budgets are parameter-matched, a seconds-long run writes a valid results.json, report and
checkpoints that `seqlab eval` reproduces, and bad arguments fail fast."""

from __future__ import annotations

import json

import pytest

from seqlab.arena.budgets import BUDGETS, match_width
from seqlab.cli import main
from seqlab.tasks import make_task

RECORD_KEYS = {"task", "model", "metric", "value", "length", "seed"}
META_KEYS = {"budget", "date", "machine", "torch", "seqlab", "duration_s", "models", "tasks", "published", "command"}


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_budget_models_are_matched_within_20_percent(budget):
    plan = BUDGETS[budget]
    for task_name in plan.default_tasks:
        vocab = make_task(task_name, **plan.tasks[task_name].args).vocab_size
        params = {m: match_width(plan.models[m], plan.target_params, vocab)[1] for m in plan.default_models}
        assert max(params.values()) <= 1.2 * plan.target_params, params
        assert min(params.values()) >= 0.8 * plan.target_params, params


def test_cpu_budget_has_the_required_line_up():
    cpu = BUDGETS["cpu"]
    assert {"selective_copy", "mqar"} <= set(cpu.default_tasks)
    assert {"transformer", "s4", "mamba", "mamba2"} <= set(cpu.default_models)
    assert {"jamba", "zamba"} & set(cpu.default_models)
    runs = len(cpu.default_tasks) * len(cpu.default_models)
    assert runs * cpu.run_time_s / cpu.jobs <= 600 and cpu.total_time_s <= 600


@pytest.fixture(scope="module")
def arena_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena")
    argv = ["arena", "--budget", "smoke", "--tasks", "selective_copy,mqar", "--models", "transformer,mamba",
            "--out", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_arena_writes_results_json_with_the_schema(arena_run):
    document = json.loads((arena_run / "results.json").read_text())
    assert META_KEYS <= set(document["meta"])
    assert set(document["meta"]["models"]) == {"transformer", "mamba"}
    assert set(document["meta"]["tasks"]) == {"selective_copy", "mqar"}
    assert all({"task", "model", "metric", "value", "source"} <= set(p) for p in document["meta"]["published"])
    records = document["results"]
    assert records and all(RECORD_KEYS <= set(r) for r in records)
    for task in ("selective_copy", "mqar"):
        for model in ("transformer", "mamba"):
            mine = {r["metric"]: r for r in records if r["task"] == task and r["model"] == model}
            assert 0 <= mine["accuracy"]["value"] <= 1
            assert mine["params"]["value"] > 0 and mine["tokens_per_s"]["value"] > 0
            assert {"state_bytes_1k", "state_bytes_100k", "train_steps", "exact_match"} <= set(mine)
    # attention's KV cache grows with the context, an SSM's state does not
    state = {(r["model"], r["metric"]): r["value"] for r in records if r["metric"].startswith("state_bytes")}
    assert state["transformer", "state_bytes_100k"] > 50 * state["transformer", "state_bytes_1k"]
    assert state["mamba", "state_bytes_100k"] == state["mamba", "state_bytes_1k"]


def test_arena_writes_report_and_checkpoints(arena_run):
    assert "<html" in (arena_run / "report.html").read_text().lower()
    for task in ("selective_copy", "mqar"):
        for model in ("transformer", "mamba"):
            ckpt = arena_run / "checkpoints" / task / model
            assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer.json").is_file()


def test_seqlab_eval_reproduces_an_arena_checkpoint(arena_run, capsys):
    document = json.loads((arena_run / "results.json").read_text())
    task = document["meta"]["tasks"]["mqar"]
    reported = next(r["value"] for r in document["results"]
                    if (r["task"], r["model"], r["metric"]) == ("mqar", "mamba", "accuracy"))  # fmt: skip
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(arena_run / "checkpoints" / "mqar" / "mamba"), "--seed", "0",
            "--samples", str(task["eval_samples"]), "--batch-size", "64", "--json", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["length"] == task["seqlen"]
    assert result["accuracy"] == pytest.approx(reported, abs=1e-9)


def test_arena_resume_keeps_finished_runs_and_trains_the_rest(arena_run, tmp_path, capsys):
    document = json.loads((arena_run / "results.json").read_text())
    assert document["meta"]["complete"] is True
    # an arena stopped after its first run: only that run's records made it to disk
    first = (document["results"][0]["task"], document["results"][0]["model"])
    partial = [r for r in document["results"] if (r["task"], r["model"]) == first]
    (tmp_path / "results.json").write_text(json.dumps({"results": partial, "meta": {**document["meta"],
                                                                                    "complete": False}}))
    argv = ["arena", "--budget", "smoke", "--tasks", "selective_copy,mqar", "--models", "transformer,mamba",
            "--out", str(tmp_path), "--device", "cpu", "--resume"]  # fmt: skip
    assert main(argv) == 0
    assert "resuming: 1 finished run(s)" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["meta"]["complete"] is True
    runs = {(r["task"], r["model"]) for r in resumed["results"]}
    assert runs == {(t, m) for t in ("selective_copy", "mqar") for m in ("transformer", "mamba")}
    # the kept run was not trained again: its records are the earlier ones, and it has no new checkpoint
    assert [r for r in resumed["results"] if (r["task"], r["model"]) == first] == partial
    assert not (tmp_path / "checkpoints" / first[0] / first[1]).exists()


def test_arena_resume_refuses_another_budget(arena_run, tmp_path, capsys):
    document = json.loads((arena_run / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**document, "meta": {**document["meta"], "budget": "cpu"}}))
    argv = ["arena", "--budget", "smoke", "--out", str(tmp_path), "--device", "cpu", "--resume"]
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["arena", "--budget", "laptop"], "--budget: unknown budget 'laptop'"),
        (["arena", "--budget", "smoke", "--models", "rwkv"], "--models: unknown 'rwkv'"),
        (["arena", "--budget", "smoke", "--tasks", "sorting"], "--tasks: unknown 'sorting'"),
        (["arena", "--budget", "smoke", "--seeds", "a"], "--seeds"),
        (["arena", "--budget", "smoke", "--out", "/proc/arena-out"], "--out"),
        (["arena", "--budget", "smoke", "--device", "cuda:7"], "--device"),
    ],
)
def test_bad_arena_arguments_fail_fast(tmp_path, capsys, argv, message):
    if "--device" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device exists here")
    assert main([*argv, "--out", str(tmp_path)] if "--out" not in argv else argv) == 2
    assert message in capsys.readouterr().err
