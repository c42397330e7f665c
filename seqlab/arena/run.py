"""Run the arena: train every (task, model, seed) of a budget, evaluate, measure, write results.json + report.

results.json::

    {"results": [{"task", "model", "metric", "value", "length", "seed", ...extra fields}, ...],
     "meta": {"budget", "date", "machine", "torch", "seqlab", "duration_s", "models", "tasks", "published",
              "command", "seeds", ...}}

Metrics per (task, model, seed): ``accuracy`` and ``exact_match`` at every evaluation length (passkey: also per
``depth``), ``tokens_per_s`` (training, at the training length), ``params``, ``train_steps``, ``train_time_s``,
``state_bytes_1k`` and ``state_bytes_100k`` (``model.state_bytes(1, n)`` at n = 1,000 and 100,000 tokens: the KV
cache for attention, a constant for the SSMs).
Extra fields on every record of a run: ``stopped`` ("steps" | "target_accuracy" | "time_limit").
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

from seqlab.arena.budgets import Budget, TaskPlan, match_width, model_config
from seqlab.errors import ConfigError, SeqlabError

STATE_LENGTHS = (1_000, 100_000)

# Published reference points (fractions in [0, 1]); the arena's own numbers sit next to them in the report.
PUBLISHED = [
    {"task": "selective_copy", "model": "s4", "metric": "accuracy", "value": 0.183,
     "source": "Gu & Dao 2023, Mamba, Table 1 (2 layers, D=64, L=4096)"},
    {"task": "selective_copy", "model": "h3", "metric": "accuracy", "value": 0.570,
     "source": "Gu & Dao 2023, Mamba, Table 1 (2 layers, D=64, L=4096)"},
    {"task": "selective_copy", "model": "hyena", "metric": "accuracy", "value": 0.301,
     "source": "Gu & Dao 2023, Mamba, Table 1 (2 layers, D=64, L=4096)"},
    {"task": "selective_copy", "model": "mamba", "metric": "accuracy", "value": 0.998,
     "source": "Gu & Dao 2023, Mamba, Table 1 (2 layers, D=64, L=4096)"},
    {"task": "mqar", "model": "transformer", "metric": "accuracy", "value": 1.0,
     "source": "Dao & Gu 2024, Mamba-2, Fig. 8 / App. D.1 (attention ~1.0 at d_model >= 128)"},
    {"task": "mqar", "model": "mamba", "metric": "accuracy", "value": 0.0,
     "source": "Dao & Gu 2024, Mamba-2, Fig. 8 / App. D.1 (Mamba-1, N=16: near 0)"},
    {"task": "mqar", "model": "mamba2", "metric": "accuracy", "value": 0.88, "value_max": 0.99,
     "source": "Dao & Gu 2024, Mamba-2, Fig. 8 / App. D.1 (Mamba-2, N=64: 0.88-0.99 across widths)"},
    {"task": "induction_heads", "model": "mamba", "metric": "accuracy", "value": 1.0, "length": 2**20,
     "source": "Gu & Dao 2023, Mamba, Table 2 (trained at 256, perfect up to 2^20)"},
    {"task": "induction_heads", "model": "transformer", "metric": "accuracy", "value": 0.0,
     "source": "Gu & Dao 2023, Mamba, Table 2 (attention with RoPE collapses beyond ~2x the training length)"},
]  # fmt: skip


class _FixedDepth:
    """A passkey task whose needle always sits at ``depth`` (one cell of the length x depth grid)."""

    def __init__(self, task, depth: float):
        self.task, self.depth = task, depth
        self.name, self.vocab_size, self.default_seqlen = task.name, task.vocab_size, task.default_seqlen

    def sample(self, batch_size, seqlen, generator):
        return self.task.sample(batch_size, seqlen, generator, depth=self.depth)


def machine_description(device) -> str:
    import torch

    processor = platform.processor() or "cpu"
    text = f"{platform.system()} {platform.machine()}, {_usable_cores()} usable CPU cores, {processor}"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan_models(budget: Budget, model_names, task) -> dict[str, dict]:
    """Width-matched configs of the line-up for ``task``'s vocabulary."""
    plans = {}
    for name in model_names:
        plan = budget.models[name]
        d_model, params = match_width(plan, budget.target_params, task.vocab_size)
        plans[name] = {"config": model_config(plan, d_model, task.vocab_size), "d_model": d_model, "params": params}
    return plans


def evaluate_run(model, task, plan: TaskPlan, seqlen: int, seed: int, device, dtype: str) -> tuple[list, list]:
    """Evaluation records (metric, value, length[, depth]) and the errors of lengths that could not run."""
    import torch

    from seqlab.evaluate import evaluate_model

    lengths = plan.eval_lengths or (seqlen,)
    cells = [(length, None) for length in lengths]
    if plan.depths:
        cells = [(length, depth) for length in lengths for depth in plan.depths]
    records, errors = [], []
    for length, depth in cells:
        target = _FixedDepth(task, depth) if depth is not None else task
        try:
            result = evaluate_model(model, target, seqlen=length, samples=plan.eval_samples,
                                    batch_size=plan.eval_batch_size, seed=seed, device=device, dtype=dtype)
        except (RuntimeError, SeqlabError, torch.OutOfMemoryError) as err:
            errors.append({"length": length, "depth": depth, "error": f"{type(err).__name__}: {err}"[:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for metric in ("accuracy", "exact_match"):
            record = {"metric": metric, "value": result[metric], "length": length}
            if depth is not None:
                record["depth"] = depth
            records.append(record)
    return records, errors


def run_arena(
    budget: Budget,
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0,),
    out: str | Path = "arena-out",
    device: str = "auto",
    steps: int | None = None,
    run_time_s: float | None = None,
    command: str | None = None,
    quiet: bool = False,
    log=None,
    jobs: int | None = None,
    resume: bool = False,
) -> dict:
    """Train and evaluate every (task, model, seed); write out/results.json and a checkpoint per run.

    ``jobs`` runs (default: the budget's) train side by side in worker processes: on a CPU at most one per core,
    with ``cores // jobs`` threads each; on a GPU they share the device (small models leave most of it idle).
    results.json is rewritten after every finished run (``meta.complete`` false until the end), so an
    interrupted arena keeps what it measured; ``resume=True`` keeps the finished runs of out/results.json (same
    budget) and trains only the rest.
    """
    import torch

    import seqlab
    from seqlab.io import write_json
    from seqlab.tasks import make_task
    from seqlab.train import resolve_device

    log = log or (lambda text: print(text, flush=True))
    tasks = list(tasks or budget.default_tasks)
    models = list(models or budget.default_models)
    _check_names(tasks, budget.tasks, "--tasks", f"budget {budget.name!r}")
    _check_names(models, budget.models, "--models", f"budget {budget.name!r}")
    if not seeds:
        raise ConfigError("--seeds: expected at least one seed, e.g. 0 or 0,1")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs: expected >= 1, got {jobs}")
    dev = resolve_device(device if device != "auto" else budget.device)
    out = Path(out)
    start = time.perf_counter()
    cap = run_time_s if run_time_s is not None else budget.run_time_s

    meta_models: dict[str, dict] = {}
    meta_tasks: dict[str, dict] = {}
    runs: list[dict] = []
    for task_name in tasks:
        plan = budget.tasks[task_name]
        task = make_task(task_name, **plan.args)
        seqlen = task.default_seqlen
        task_steps = steps if steps is not None else plan.steps
        meta_tasks[task_name] = {
            "args": task.config() if hasattr(task, "config") else dict(plan.args), "seqlen": seqlen,
            "steps": task_steps, "batch_size": plan.batch_size, "lr": plan.lr, "lr_by_model": plan.lr_by_model,
            "weight_decay": plan.weight_decay, "warmup_steps": plan.warmup_steps,
            "eval_lengths": list(plan.eval_lengths or (seqlen,)), "depths": list(plan.depths),
            "eval_samples": plan.eval_samples, "metric": getattr(task, "metric", "accuracy"),
            "vocab_size": task.vocab_size,
        }  # fmt: skip
        for model_name, planned in plan_models(budget, models, task).items():
            entry = meta_models.setdefault(model_name, {
                "preset": budget.models[model_name].preset, "n_layers": planned["config"].n_layers,
                "pattern": planned["config"].pattern, "d_model": planned["d_model"], "params": {},
                "config": planned["config"].to_dict(),
            })  # fmt: skip
            entry["params"][task_name] = planned["params"]
            for seed in seeds:
                runs.append({
                    "index": len(runs), "task": task_name, "task_args": meta_tasks[task_name]["args"],
                    "plan": plan, "model": model_name, "config": planned["config"].to_dict(), "seed": seed,
                    "steps": task_steps, "device": str(dev), "out": str(out),
                })  # fmt: skip

    cores = _usable_cores()
    jobs = max(1, min(jobs or budget.jobs, cores, len(runs)))
    threads = (budget.threads_per_job or max(1, cores // jobs)) if dev.type == "cpu" else max(1, cores // jobs)
    # the whole arena stays within budget.total_time_s: each run's training is capped at its share
    share = budget.total_time_s * jobs / max(1, len(runs)) - budget.eval_reserve_s
    for run in runs:
        run["time_cap"] = min(cap, max(3.0, share))
        run["quiet"] = quiet or jobs > 1
    results: list[dict] = []
    errors: list[dict] = []
    previous_s = 0.0
    if resume:
        results, errors, previous_s = _finished_runs(out / "results.json", budget.name)
        finished = {(r["task"], r["model"], r["seed"]) for r in results}
        index_of = {(r["task"], r["model"], r["seed"]): r["index"] for r in runs}
        for record in results:  # keep the line-up's order in the merged list
            record["_index"] = index_of.get((record["task"], record["model"], record["seed"]), len(runs))
        errors = [e for e in errors if (e.get("task"), e.get("model"), e.get("seed")) in finished]
        if finished:
            log(f"resuming: {len(finished)} finished run(s) kept from {out / 'results.json'}")
        runs = [r for r in runs if (r["task"], r["model"], r["seed"]) not in finished]
    interrupted = False
    done = 0
    total = len(runs)

    def document(complete: bool) -> dict:
        ordered = sorted(results, key=lambda r: r.get("_index", 0))
        return {
            "results": [{k: v for k, v in r.items() if k != "_index"} for r in ordered],
            "meta": {
                "budget": budget.name,
                "budget_description": budget.description,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_description(dev),
                "device": str(dev),
                "torch": torch.__version__,
                "seqlab": seqlab.__version__,
                "duration_s": round(previous_s + time.perf_counter() - start, 2),
                "seeds": list(seeds),
                "jobs": jobs,
                "threads_per_job": threads,
                "target_params": budget.target_params,
                "run_time_cap_s": min(cap, max(3.0, share)),
                "models": meta_models,
                "tasks": meta_tasks,
                "published": [p for p in PUBLISHED if p["task"] in tasks],
                "command": command or "seqlab arena",
                "errors": errors,
                "interrupted": interrupted,
                "complete": complete,
            },
        }

    def collect(run, outcome):
        nonlocal done
        records, run_errors = outcome
        results.extend(records)
        errors.extend(run_errors)
        done += 1
        log(_progress_line(done, total, run, records) if records else f"[{done}/{total}] {run_errors}")
        write_json(out / "results.json", document(complete=False))  # nothing measured is lost on a crash

    out.mkdir(parents=True, exist_ok=True)
    try:
        if jobs == 1 or len(runs) <= 1:
            for run in runs:
                collect(run, _run_one(run, threads))
        else:
            import concurrent.futures as cf
            import multiprocessing

            # slowest families first so that the two queues finish together
            order = sorted(runs, key=lambda r: -_cost_hint(r["config"]))
            pool = cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
            try:
                futures = {pool.submit(_run_one, run, threads): run for run in order}
                for future in cf.as_completed(futures):
                    run = futures[future]
                    try:
                        outcome = future.result()
                    except (KeyboardInterrupt, cf.process.BrokenProcessPool) as err:
                        raise KeyboardInterrupt from err
                    except Exception as err:  # one broken run must not cost the others' results
                        outcome = ([], [{"task": run["task"], "model": run["model"], "seed": run["seed"],
                                         "error": f"{type(err).__name__}: {err}"[:300]}])  # fmt: skip
                    collect(run, outcome)
            except KeyboardInterrupt:
                _stop_pool(pool)
                raise
            pool.shutdown()
    except KeyboardInterrupt:
        interrupted = True  # keep what was measured; interrupted runs wrote their checkpoints
    final = document(complete=not interrupted)
    write_json(out / "results.json", final)
    if interrupted:
        raise KeyboardInterrupt
    return final


def _finished_runs(path: Path, budget_name: str) -> tuple[list[dict], list[dict], float]:
    """(records, errors, seconds spent) of the runs an earlier arena finished in ``path``; empty if none."""
    from seqlab.io import read_json

    if not path.exists():
        return [], [], 0.0
    previous = read_json(path, "results")
    meta = previous.get("meta", {})
    if meta.get("budget") != budget_name:
        raise ConfigError(f"--resume: {path} holds a {meta.get('budget')!r} arena, expected budget {budget_name!r}")
    # a run is finished once its last record (the state size at 100K tokens) is in the list
    done = {(r["task"], r["model"], r["seed"]) for r in previous["results"] if r.get("metric") == "state_bytes_100k"}
    records = [r for r in previous["results"] if (r["task"], r["model"], r["seed"]) in done]
    return records, list(meta.get("errors", [])), float(meta.get("duration_s", 0.0))


def _stop_pool(pool, grace_s: float = 5.0) -> None:
    """Cancel queued runs; give running workers a moment to checkpoint (they see Ctrl-C too), then end them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.perf_counter() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.perf_counter()))
        if process.is_alive():
            process.terminate()


def _cost_hint(config: dict) -> float:
    """Rough relative cost per token of a config on a CPU (selective scans are the slow part)."""
    pattern = config.get("pattern", "")
    return config["n_layers"] * config["d_model"] * (4.0 if "M" in pattern.replace("M2", "") else 1.0)


def _progress_line(done: int, total: int, run: dict, records: list[dict]) -> str:
    by_metric = {r["metric"]: r for r in records}
    headline = next((r for r in records if r["metric"] == "accuracy"), None)
    acc = f"{headline['value']:.3f} @{headline['length']}" if headline else "-"
    return (
        f"[{done}/{total}] {run['task']:<15} {run['model']:<12} seed {run['seed']}  accuracy {acc}  "
        f"params {by_metric['params']['value']:,}  steps {by_metric['train_steps']['value']}  "
        f"{by_metric['train_time_s']['value']:.1f}s  {by_metric['tokens_per_s']['value']:,.0f} tok/s  "
        f"stopped: {records[0]['stopped']}"
    )


def _run_one(run: dict, threads: int | None = None) -> tuple[list[dict], list[dict]]:
    """Train, evaluate and measure one (task, model, seed); returns (records, errors). Runs in a worker too."""
    import torch

    from seqlab.models import LanguageModel, ModelConfig
    from seqlab.tasks import make_task
    from seqlab.train import TrainConfig, Trainer

    if threads is not None:
        torch.set_num_threads(threads)
    plan: TaskPlan = run["plan"]
    task_name, model_name, seed, steps = run["task"], run["model"], run["seed"], run["steps"]
    task = make_task(task_name, **run["task_args"])
    device = torch.device(run["device"])
    out = Path(run["out"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = LanguageModel(ModelConfig.from_dict(run["config"]))
    lr = plan.lr_by_model.get(model_name, plan.lr)
    config = TrainConfig(
        steps=steps, batch_size=plan.batch_size, lr=lr, warmup_steps=min(plan.warmup_steps, max(steps // 5, 0)),
        weight_decay=plan.weight_decay, seed=seed, eval_every=plan.eval_every, eval_batches=1,
        eval_batch_size=plan.eval_batch_size, target_accuracy=plan.target_accuracy, log_every=max(1, steps // 20),
        device=str(device), max_time_s=run["time_cap"],
    )  # fmt: skip
    suffix = "" if seed == 0 else f"-seed{seed}"
    trainer = Trainer(
        model, task, config, task_spec={"name": task_name, "args": run["task_args"]}, quiet=run["quiet"],
        checkpoint_dir=out / "checkpoints" / task_name / f"{model_name}{suffix}",
        metrics_path=out / "metrics" / task_name / f"{model_name}{suffix}.jsonl",
    )  # fmt: skip
    result = trainer.fit()
    evals, eval_errors = evaluate_run(model, task, plan, task.default_seqlen, seed, trainer.device, config.dtype)
    errors = [{"task": task_name, "model": model_name, "seed": seed, **err} for err in eval_errors]
    common = {"task": task_name, "model": model_name, "seed": seed, "stopped": result.stopped,
              "_index": run["index"]}  # fmt: skip
    records = [{**common, **r} for r in evals]
    records += [
        {**common, "metric": "tokens_per_s", "value": result.tokens_per_s, "length": task.default_seqlen},
        {**common, "metric": "train_steps", "value": result.step, "length": None},
        {**common, "metric": "train_time_s", "value": round(result.train_time_s, 3), "length": None},
        {**common, "metric": "params", "value": model.num_params(), "length": None},
    ]
    for n, metric in zip(STATE_LENGTHS, ("state_bytes_1k", "state_bytes_100k")):
        records.append({**common, "metric": metric, "value": int(model.state_bytes(1, n)), "length": n})
    return records, errors


def _headline(task) -> str:
    return getattr(task, "metric", "accuracy")


def _check_names(names, known, option: str, where: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{option}: unknown {', '.join(map(repr, unknown))} for {where}; choose from "
                          f"{', '.join(known)}")


def print_summary(document: dict, stream=None) -> None:
    """The report's summary table (seqlab.report.summary_table) on stdout."""
    from seqlab.report import summary_table

    print(summary_table(document), file=stream or sys.stdout)
