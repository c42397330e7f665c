"""seqlab train: train a preset model on a synthetic task, with checkpoints and exact --resume."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP = "train a model preset on a synthetic task or on text (checkpoints, metrics.jsonl, exact --resume)"


def parse_assignments(pairs: list[str] | None, option: str) -> dict:
    """["d_model=64", "pattern=MMA"] -> {"d_model": 64, "pattern": "MMA"}; values parsed as JSON when they can be."""
    from seqlab.errors import ConfigError

    result = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option}: expected key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result[key.strip().replace("-", "_")] = value
    return result


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written there; fail fast naming the option."""
    from seqlab.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{option}: directory {str(path)!r} is not writable ({err.strerror or err})") from err
    return path


def check_output_file(path: str | Path | None, option: str) -> None:
    """Fail before any work when ``path`` cannot become a file: it is a directory, or its folder cannot be made."""
    from seqlab.errors import ConfigError

    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option}: expected a file path, got the directory {str(path)!r}")
    check_writable(path.parent if str(path.parent) else ".", option)


def make_task_checked(name: str, args: dict, option: str = "--task"):
    from seqlab.errors import ConfigError
    from seqlab.tasks import TASKS, make_task

    if name not in TASKS:
        raise ConfigError(f"{option}: unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    try:
        return make_task(name, **args)
    except TypeError as err:
        raise ConfigError(f"--task-arg: task {name!r} does not accept {sorted(args)} ({err})") from err


def build_model(preset: str, size: str, task, overrides: dict):
    """A preset model sized for ``task``'s vocabulary; unknown preset/size/field fail naming the option."""
    from seqlab.errors import ConfigError
    from seqlab.models import LanguageModel
    from seqlab.models.presets import PRESETS, SIZES, preset_config

    if preset not in PRESETS:
        raise ConfigError(f"--model: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if size not in SIZES:
        raise ConfigError(f"--size: unknown size {size!r}; choose one of {', '.join(SIZES)}")
    overrides = {"vocab_size": task.vocab_size, **overrides}
    try:
        config = preset_config(preset, size, **overrides)
    except TypeError as err:
        raise ConfigError(f"--set: {err}") from err
    return LanguageModel(config)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help="synthetic task name (see seqlab.tasks.TASKS)")
    parser.add_argument("--data", metavar="PATH", help="train a language model on text instead: a file, folder, glob "
                        "or 'stdlib' (the Python standard library's sources)")
    parser.add_argument("--tokenizer", metavar="DIR", help="with --data: local Hugging Face tokenizer (default bytes)")
    parser.add_argument("--model", help="model preset: transformer, s4, mamba, mamba2, jamba, zamba, hybrid, ...")
    parser.add_argument("--size", help="preset size (default: tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 32)")
    parser.add_argument("--seqlen", type=int, help="training sequence length (default: the task's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"), help="decay after warmup")
    parser.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps")
    parser.add_argument("--target-accuracy", type=float, help="stop once test accuracy reaches this")
    parser.add_argument("--checkpoint-every", type=int, help="write a checkpoint every N steps")
    parser.add_argument("--seed", type=int, help="seed for model init and the data stream (default 0)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), help="autocast dtype (auto: bf16 on CUDA)")
    parser.add_argument("--out", help="run directory (default runs/<task>-<model>-<size>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (repeatable)")
    parser.add_argument("--task-arg", action="append", metavar="KEY=VALUE", help="task argument (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    scale = parser.add_argument_group("scaling out (launch with torchrun --nproc-per-node N -m seqlab train ...)")
    scale.add_argument("--parallel", choices=("none", "ddp", "fsdp"), help="data parallelism (default none)")
    scale.add_argument("--tp", type=int,
                       help="tensor-parallel degree (attention, Mamba, Mamba-2, S4, SwiGLU, MoE; = world size)")
    scale.add_argument("--checkpoint-activations", action="store_true", default=None,
                       help="recompute block activations in backward (less memory)")
    scale.add_argument("--grad-accum", type=int, help="micro batches per step; global batch = batch-size x "
                       "grad-accum x data-parallel processes")


TRAIN_OPTIONS = (
    "steps", "batch_size", "seqlen", "lr", "weight_decay", "warmup_steps", "schedule", "eval_every",
    "target_accuracy", "checkpoint_every", "seed", "dtype", "device", "parallel", "tp", "checkpoint_activations",
    "grad_accum",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch

    from seqlab.errors import CheckpointError, ConfigError
    from seqlab.io import recover_dir
    from seqlab.train import CHECKPOINT_NAME, TrainConfig, Trainer, read_trainer_json, resolve_device

    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    if args.device is not None:
        resolve_device(args.device)
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume: needs --out DIR naming the run to continue")
        out = Path(args.out)
        checkpoint = out / CHECKPOINT_NAME
        if recover_dir(checkpoint):
            print(f"resume: {str(checkpoint)!r} was missing after an interrupted save; its previous version is back")
        if not checkpoint.is_dir():
            raise CheckpointError(f"--resume: no checkpoint at {str(checkpoint)!r}; start without --resume")
        info = read_trainer_json(checkpoint)
        task_spec = info["task"]
        if args.data is not None or args.tokenizer is not None:
            raise ConfigError("--data/--tokenizer: a resumed run keeps the data it was trained on; drop them")
        if args.task is not None and args.task != task_spec["name"]:
            raise ConfigError(f"--task: checkpoint was trained on {task_spec['name']!r}, got {args.task!r}")
        if args.set:
            raise ConfigError("--set: model overrides cannot change a resumed model; drop --set with --resume")
        fixed = [name for name, value in (("--model", args.model), ("--size", args.size),
                                          ("--task-arg", args.task_arg)) if value]
        if fixed:
            raise ConfigError(f"{'/'.join(fixed)}: a resumed run keeps the model and task it was trained with; "
                              f"drop {' and '.join(fixed)} with --resume")
        from seqlab.models import LanguageModel

        if "data" in task_spec:
            from seqlab.data import TextData

            task = TextData.from_spec(task_spec["data"])
        else:
            try:
                task = make_task_checked(task_spec["name"], task_spec.get("args", {}))
            except ConfigError as err:  # the stored task, not an option given now
                raise CheckpointError(f"checkpoint: {str(checkpoint / 'trainer.json')!r} holds a task that cannot "
                                      f"be built ({err})") from err
        model = LanguageModel.load(checkpoint)
        try:
            config = TrainConfig.from_dict({**info["train_config"], **given, "out_dir": str(out)}).validate()
        except TypeError as err:
            raise CheckpointError(
                f"checkpoint: {str(checkpoint / 'trainer.json')!r} holds an invalid train_config ({err})"
            ) from err
        if info["step"] >= config.steps:
            print(f"nothing to train: {out} is at step {info['step']} of --steps {config.steps}; pass a larger "
                  "--steps to continue")
            return 0
        check_writable(out)
        trainer = Trainer(model, task, config, task_spec=task_spec, quiet=args.quiet)
        trainer.load_checkpoint(checkpoint)
        if trainer.is_main:
            print(f"resuming {task_spec['name']} from step {trainer.step} in {out}")
    else:
        if (args.task is None) == (args.data is None):
            raise ConfigError(
                "--task/--data: pass exactly one: a synthetic task (e.g. --task selective_copy) or text to model "
                f"(e.g. --data stdlib); got --task {args.task!r} and --data {args.data!r}"
            )
        if args.tokenizer is not None and args.data is None:
            raise ConfigError("--tokenizer: only applies to text (--data PATH)")
        if args.model is None:
            raise ConfigError("--model: required (e.g. --model mamba)")
        args.size = args.size or "tiny"
        task_args = parse_assignments(args.task_arg, "--task-arg")
        overrides = parse_assignments(args.set, "--set")
        if args.data is not None:
            from seqlab.data import TextData

            task = TextData(args.data, tokenizer=args.tokenizer, seqlen=args.seqlen or 256)
            task_spec = {"name": "text", "args": {}, "data": task.spec()}
        else:
            task = make_task_checked(args.task, task_args)
            task_spec = {"name": args.task, "args": task_args}
        out = Path(args.out or f"runs/{task_spec['name']}-{args.model}-{args.size}")
        check_writable(out)
        if (out / CHECKPOINT_NAME).exists():
            raise ConfigError(f"--out: {str(out)!r} already holds a checkpoint; pass --resume or another --out")
        config = TrainConfig(**given, out_dir=str(out)).validate()
        torch.manual_seed(config.seed)
        model = build_model(args.model, args.size, task, overrides)
        trainer = Trainer(model, task, config, task_spec=task_spec, quiet=args.quiet)
        if trainer.is_main:
            print(
                f"training {args.model}/{args.size} ({model.num_params():,} params) on {args.task or args.data} "
                f"for {config.steps} steps -> {out}"
            )
    if trainer.parallel is not None and trainer.is_main:
        par, cfg = trainer.parallel, trainer.config
        print(
            f"{par.env.world_size} process(es), --parallel {cfg.parallel}, --tp {cfg.tp}: global batch = "
            f"{cfg.batch_size} x {cfg.grad_accum} (accumulation) x {par.data_world} (data-parallel ranks) = "
            f"{cfg.batch_size * cfg.grad_accum * par.data_world} sequences per step"
        )
    try:
        result = trainer.fit()
    finally:
        if trainer.parallel is not None:
            from seqlab.distributed import cleanup

            cleanup()
    if not trainer.is_main:
        return 0
    ev = result.eval or {}
    loss = f"{result.loss:.4f}" if result.loss is not None else "-"
    print(
        f"step {result.step}  loss {loss}  test accuracy {ev.get('accuracy', float('nan')):.4f}  "
        f"exact match {ev.get('exact_match', float('nan')):.4f}  {result.tokens_per_s:,.0f} tok/s  "
        f"stopped: {result.stopped}"
    )
    if result.peak_memory_bytes is not None:
        print(f"peak GPU memory (this rank): {result.peak_memory_bytes / 2**30:.2f} GiB")
    print(f"checkpoint: {trainer.checkpoint_path}")
    return 0
