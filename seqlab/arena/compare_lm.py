"""Language-model comparison on real text at equal tokens: loss against training FLOPs and wall time.

A small-scale replica of the scaling figure of the Mamba paper (Gu & Dao 2023, Fig. 4): every (family, size)
trains on the same packed text stream (``seqlab.data.TextData``) for the same number of tokens, with the same
optimiser settings, then is scored on the held-out documents in bits per byte.

    results = compare_lm(CompareConfig(models=["transformer", "mamba"], sizes=["tiny"], tokens=200_000))

Output folder::

    results.json   {"meta": {...}, "results": [record per run], "curves": [{"model", "size", "points"}]}
                   record: model, size, params, params_nonembedding, flops_per_token, flops (training FLOPs),
                   tokens, steps, train_loss, val_loss, val_bpb, val_ppl, val_tokens, wall_s, tokens_per_s
                   (or "error"); points: {"step", "tokens", "flops", "wall_s", "loss"} from metrics.jsonl
    report.html    tables and figures (seqlab.report.lm_plots)
    runs/<model>-<size>/   each run's checkpoint (``seqlab generate --checkpoint``) and metrics.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seqlab.errors import ConfigError, SeqlabError
from seqlab.io import write_json

DEFAULT_MODELS = ("transformer", "mamba", "mamba2", "jamba")


@dataclass
class CompareConfig:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    sizes: list[str] = field(default_factory=lambda: ["tiny"])
    tokens: int = 200_000  # training tokens per run (rounded up to whole steps)
    data: str = "stdlib"
    tokenizer: str | None = None
    seqlen: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    seed: int = 0
    eval_tokens: int | None = 65_536  # validation tokens scored per run (None: the whole split)
    device: str = "auto"
    out_dir: str = "runs/compare-lm"
    cache_dir: str | None = None

    def validate(self) -> CompareConfig:
        from seqlab.models.presets import PRESETS, sizes_of

        if not self.models:
            raise ConfigError("--models: expected at least one model preset")
        for name in self.models:
            if name not in PRESETS or name == "hybrid":
                choices = ", ".join(p for p in PRESETS if p != "hybrid")
                raise ConfigError(f"--models: unknown preset {name!r}; choose from {choices}")
        if not self.sizes:
            raise ConfigError("--sizes: expected at least one size (e.g. tiny,small)")
        for name in self.models:
            for size in self.sizes:
                if size not in sizes_of(name):
                    raise ConfigError(f"--sizes: preset {name!r} has sizes {list(sizes_of(name))}, got {size!r}")
        checks = [
            ("tokens", self.tokens >= 1, "a positive count"),
            ("seqlen", self.seqlen >= 2, "an integer >= 2"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a positive number"),
            ("eval_tokens", self.eval_tokens is None or self.eval_tokens >= 1, "a positive count"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")
        return self

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seqlen)))


def compare_lm(config: CompareConfig, log: Callable[[str], None] | None = None, command: str | None = None) -> dict:
    """Train and score every (model, size); write results.json (after every run) and report.html; return results."""
    from seqlab.data import TextData
    from seqlab.report.lm_plots import write_lm_report
    from seqlab.train import resolve_device

    config.validate()
    device = resolve_device(config.device)
    log = log or (lambda line: None)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = TextData(config.data, tokenizer=config.tokenizer, seqlen=config.seqlen, cache_dir=config.cache_dir)
    validation = data.for_split("validation")
    if len(validation) < 2:
        raise ConfigError(f"--data: {config.data!r} leaves no validation text; give it at least two documents")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
        "machine": _machine(device),
        "device": str(device),
        "data": data.spec(),
        "train_tokens_available": len(data),
        "validation_tokens_available": len(validation),
        "validation_documents": validation.stream.n_docs,
        "config": dataclasses.asdict(config),
        "steps": config.steps,
        "tokens_per_step": config.batch_size * config.seqlen,
    }
    results: dict = {"meta": meta, "results": [], "curves": []}
    for name in config.models:
        for size in config.sizes:
            log(f"{name}/{size}: training {config.steps} steps x {config.batch_size} x {config.seqlen} tokens")
            try:
                record, curve = _run_one(name, size, config, data, device, out)
            except (SeqlabError, RuntimeError, ValueError) as err:
                record, curve = {"model": name, "size": size, "error": f"{type(err).__name__}: {err}"}, None
                log(f"{name}/{size}: failed: {err}")
            else:
                log(f"{name}/{size}: {record['params']:,} params, val loss {record['val_loss']:.4f}, "
                    f"{record['val_bpb']:.3f} bpb, {record['wall_s']:.1f} s")  # fmt: skip
            results["results"].append(record)
            if curve is not None:
                results["curves"].append(curve)
            write_json(out / "results.json", results)
    write_lm_report(results, out / "report.html")
    return results


def _run_one(name: str, size: str, config: CompareConfig, data, device, out: Path) -> tuple[dict, dict]:
    from seqlab.bench.flops import model_flops
    from seqlab.data import evaluate_text
    from seqlab.models.presets import from_preset
    from seqlab.train import TrainConfig, Trainer

    run_dir = out / "runs" / f"{name}-{size}"
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a rerun into the same folder starts a fresh curve
    torch.manual_seed(config.seed)
    model = from_preset(name, size, vocab_size=data.vocab_size)
    steps = config.steps
    train_config = TrainConfig(
        steps=steps, batch_size=config.batch_size, seqlen=config.seqlen, lr=config.lr,
        warmup_steps=max(1, int(steps * config.warmup_fraction)), seed=config.seed, eval_batches=2,
        log_every=max(1, steps // 60), out_dir=str(run_dir), device=config.device,
    )  # fmt: skip
    task_spec = {"name": "text", "args": {}, "data": data.spec()}
    trainer = Trainer(model, data, train_config, task_spec=task_spec, quiet=True)
    result = trainer.fit()
    count = model_flops(model, config.seqlen)
    tokens = steps * config.batch_size * config.seqlen
    val = evaluate_text(model, data, seqlen=config.seqlen, batch_size=16, max_tokens=config.eval_tokens,
                        device=device)  # fmt: skip
    record = {
        "model": name,
        "size": size,
        "params": model.num_params(),
        "params_nonembedding": model.num_params(exclude_embeddings=True),
        "flops_per_token": count.training,
        "flops": count.training * tokens,
        "flops_breakdown": {k: count.to_dict()[k] for k in ("matmul", "attention", "scan", "conv")},
        "tokens": tokens,
        "steps": result.step,
        "train_loss": result.loss,
        "val_loss": val["loss"],
        "val_bpb": val["bpb"],
        "val_ppl": val["perplexity"],
        "val_tokens": val["tokens"],
        "wall_s": result.train_time_s,
        "tokens_per_s": result.tokens_per_s,
        "checkpoint": str(trainer.checkpoint_path),
    }
    if count.uncounted:
        record["flops_uncounted"] = count.uncounted
    per_step, per_token = config.batch_size * config.seqlen, count.training
    points = [
        {"step": r["step"], "tokens": r["step"] * per_step, "flops": r["step"] * per_step * per_token,
         "wall_s": r.get("elapsed"), "loss": r["loss"]}
        for r in _read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "eval_loss" not in r
    ]  # fmt: skip
    return record, {"model": name, "size": size, "points": points}


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
