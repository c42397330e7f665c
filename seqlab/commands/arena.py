"""seqlab arena: train each architecture on synthetic memory tasks at a matched size and report what it measured."""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "train every architecture on synthetic memory tasks at matched size; write results.json + report.html"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", help="comma-separated tasks (default: the budget's, cpu: selective_copy,mqar)")
    parser.add_argument("--models", help="comma-separated line-up (default: the budget's; see --list)")
    parser.add_argument("--budget", default="cpu", help="cpu (default, ~10 min on 2 cores) | gpu (~20 min) | paper")
    parser.add_argument("--out", default="arena-out", help="output directory (default ./arena-out)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--steps", type=int, help="override every task's training steps")
    parser.add_argument("--run-seconds", type=float, help="override the wall-clock cap of each training run")
    parser.add_argument("--jobs", type=int, help="runs trained side by side, one process each (default: the budget's; "
                        "CPU: <= cores; on a GPU they share the device)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of <out>/results.json (same "
                        "budget) and train only the rest")
    parser.add_argument("--list", action="store_true", help="print the budget's line-up and tasks, then exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _split(text: str | None, option: str, cast=str) -> list | None:
    from seqlab.errors import ConfigError

    if text is None:
        return None
    try:
        values = [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"{option}: expected a comma-separated list, got {text!r}") from err
    if not values:
        raise ConfigError(f"{option}: expected a comma-separated list, got {text!r}")
    return values


def _list(budget) -> None:
    print(f"budget {budget.name}: {budget.description}")
    print(f"  target parameters {budget.target_params:,}; cap per run {budget.run_time_s}s, "
          f"total {budget.total_time_s}s")
    print("  models: " + ", ".join(f"{n}{'*' if n in budget.default_models else ''}" for n in budget.models))
    print("  tasks:  " + ", ".join(f"{n}{'*' if n in budget.default_tasks else ''}" for n in budget.tasks))
    print("  (* = in the default line-up)")


def run(args: argparse.Namespace) -> int:
    from seqlab.arena.budgets import get_budget
    from seqlab.arena.run import run_arena
    from seqlab.commands.train import check_writable
    from seqlab.errors import ConfigError
    from seqlab.io import read_json
    from seqlab.train import resolve_device

    budget = get_budget(args.budget)
    if args.list:
        _list(budget)
        return 0
    tasks = _split(args.tasks, "--tasks")
    models = _split(args.models, "--models")
    seeds = _split(args.seeds, "--seeds", int)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: expected >= 1, got {args.steps}")
    if args.run_seconds is not None and args.run_seconds <= 0:
        raise ConfigError(f"--run-seconds: expected > 0, got {args.run_seconds}")
    resolve_device(args.device)
    out = check_writable(args.out)
    command = "seqlab arena " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["arena"] else None
    document = run_arena(
        budget, tasks=tasks, models=models, seeds=seeds, out=out, device=args.device, steps=args.steps,
        run_time_s=args.run_seconds, command=command, quiet=args.quiet, jobs=args.jobs, resume=args.resume,
        log=(lambda text: None) if args.quiet else None,
    )  # fmt: skip
    from seqlab.report import summary_table, write_report

    document = read_json(out / "results.json", "results")
    print()
    print(summary_table(document))
    report = write_report(document, out / "report.html")
    print(f"\nresults: {out / 'results.json'}\nreport:  {report}  ({document['meta']['duration_s']:.0f} s)")
    return 0
