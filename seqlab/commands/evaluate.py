"""seqlab eval: accuracy of a saved checkpoint on fresh test samples of a task, per length."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "evaluate a checkpoint on fresh test samples of a task (accuracy and exact match per length)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (or a run directory holding one)")
    parser.add_argument("--task", help="task name (default: the task the checkpoint was trained on)")
    parser.add_argument("--data", metavar="PATH", help="text (file, folder, glob or 'stdlib'): report loss, bits per "
                        "byte and perplexity on its validation split (default for checkpoints trained on text)")
    parser.add_argument("--tokenizer", metavar="DIR", help="with --data: local Hugging Face tokenizer (default bytes)")
    parser.add_argument("--max-tokens", type=int, help="with text: score only the first N tokens of the split")
    parser.add_argument("--split", choices=("validation", "train"), default="validation",
                        help="with text: the documents to score (default: the held-out validation ones)")
    parser.add_argument("--lengths", help="comma-separated sequence lengths (default: the training length)")
    parser.add_argument("--seed", type=int, default=0, help="test-split seed (default 0)")
    parser.add_argument("--samples", type=int, default=256, help="samples per length (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default 32)")
    parser.add_argument("--task-arg", action="append", metavar="KEY=VALUE", help="task argument (repeatable)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def parse_lengths(text: str | None, option: str = "--lengths") -> list[int] | None:
    from seqlab.errors import ConfigError

    if text is None:
        return None
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"{option}: expected comma-separated integers like 256,512, got {text!r}") from err
    if not lengths or min(lengths) < 2:
        raise ConfigError(f"{option}: expected lengths >= 2, got {text!r}")
    return lengths


def find_checkpoint(path: str | Path) -> Path:
    from seqlab.errors import CheckpointError
    from seqlab.io import recover_dir
    from seqlab.train import CHECKPOINT_NAME

    path = Path(path)
    recover_dir(path / CHECKPOINT_NAME)
    if (path / CHECKPOINT_NAME / "model.safetensors").exists() or (path / CHECKPOINT_NAME).is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_dir():
        what = "is a file, not a checkpoint directory" if path.exists() else "does not exist"
        raise CheckpointError(f"--checkpoint: {str(path)!r} {what}")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"--checkpoint: {str(path)!r} lacks config.json/model.safetensors; not a checkpoint")
    return path


def run(args: argparse.Namespace) -> int:
    from seqlab.commands.train import make_task_checked, parse_assignments
    from seqlab.errors import ConfigError
    from seqlab.evaluate import evaluate_model
    from seqlab.io import read_json
    from seqlab.models import LanguageModel
    from seqlab.train import resolve_device

    device = resolve_device(args.device)
    lengths = parse_lengths(args.lengths)
    if args.samples < 1:
        raise ConfigError(f"--samples: expected >= 1, got {args.samples}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected >= 1, got {args.batch_size}")
    checkpoint = find_checkpoint(args.checkpoint)
    info = read_json(checkpoint / "trainer.json", "checkpoint") if (checkpoint / "trainer.json").exists() else {}
    spec = info.get("task") or {}
    if args.data is not None or ("data" in spec and args.task is None):
        return run_text(args, checkpoint, info, device, lengths)
    text_only = [option for option, given in (("--tokenizer", args.tokenizer is not None),
                                              ("--max-tokens", args.max_tokens is not None),
                                              ("--split", args.split != "validation")) if given]
    if text_only:
        raise ConfigError(f"{'/'.join(text_only)}: only apply to text (a run trained with --data, or --data PATH); "
                          "this is a synthetic-task evaluation")
    name = args.task or spec.get("name")
    if name is None:
        raise ConfigError("--task: required (the checkpoint does not record its task)")
    task_args = dict(spec.get("args", {})) if name == spec.get("name") else {}
    task_args.update(parse_assignments(args.task_arg, "--task-arg"))
    task = make_task_checked(name, task_args)
    model = LanguageModel.load(checkpoint, device=str(device))
    if model.config.vocab_size < task.vocab_size:
        raise ConfigError(
            f"--task: {name} uses {task.vocab_size} token ids, the model has {model.config.vocab_size}; evaluate "
            "the task it was trained on, or set the task's vocab_size with --task-arg"
        )
    lengths = lengths or [info.get("seqlen") or task.default_seqlen]
    dtype = (info.get("train_config") or {}).get("dtype", "auto")
    rows = [
        evaluate_model(model, task, seqlen=length, samples=args.samples, batch_size=args.batch_size,
                       seed=args.seed, device=device, dtype=dtype)
        for length in lengths
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "task": name, "task_args": task_args, "results": rows}))
        return 0
    print(f"{name} on {checkpoint} (seed {args.seed}, {args.samples} samples per length)")
    print(f"  {'length':>8}  {'accuracy':>9}  {'exact':>7}  {'loss':>8}")
    for row in rows:
        print(f"  {row['length']:>8}  {row['accuracy']:>9.4f}  {row['exact_match']:>7.4f}  {row['loss']:>8.4f}")
    return 0


def run_text(args: argparse.Namespace, checkpoint: Path, info: dict, device, lengths: list[int] | None) -> int:
    """Loss, bits per byte and perplexity on the validation split of text (deterministic: the stream in order)."""
    from seqlab.data import TextData, evaluate_text
    from seqlab.errors import ConfigError
    from seqlab.models import LanguageModel

    spec = dict((info.get("task") or {}).get("data") or {})
    if args.data is not None:
        spec = {**spec, "data": args.data, "tokenizer": args.tokenizer}
    elif args.tokenizer is not None:
        spec["tokenizer"] = args.tokenizer
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"--max-tokens: expected >= 1, got {args.max_tokens}")
    data = TextData.from_spec(spec, split="validation")
    model = LanguageModel.load(checkpoint, device=str(device))
    if model.config.vocab_size < data.vocab_size:
        raise ConfigError(
            f"--tokenizer: the data needs {data.vocab_size} token ids, the model has {model.config.vocab_size}; "
            "pass the tokenizer the checkpoint was trained with"
        )
    lengths = lengths or [info.get("seqlen") or data.default_seqlen]
    dtype = (info.get("train_config") or {}).get("dtype", "auto")
    rows = [
        evaluate_text(model, data, seqlen=length, batch_size=args.batch_size, max_tokens=args.max_tokens,
                      device=device, dtype=dtype, split=args.split)
        for length in lengths
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "data": spec, "results": rows}))
        return 0
    scored = data.for_split(args.split).stream
    print(f"{spec['data']} {args.split} split on {checkpoint} ({scored.n_docs} documents)")
    print(f"  {'length':>8}  {'tokens':>10}  {'loss':>8}  {'bpb':>7}  {'ppl':>9}")
    for row in rows:
        print(f"  {row['seqlen']:>8}  {row['tokens']:>10}  {row['loss']:>8.4f}  {row['bpb']:>7.4f}  "
              f"{row['perplexity']:>9.3f}")  # fmt: skip
    return 0
