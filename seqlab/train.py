"""The training loop: AdamW + warmup/decay schedule, periodic evaluation, early stop, exact resume.

A model is any ``nn.Module`` mapping input ids (B, L) int64 to logits (B, L, V); when it sets ``model.aux_loss``
(MoE load balancing) that term is added to the loss. Data comes from ``task.sample(batch, seqlen, generator)``
with a generator the trainer owns, so a checkpoint stores the exact data position (the generator state).

Checkpoint layout (safetensors + JSON only, written atomically through ``seqlab.io.atomic_dir``)::

    model.safetensors, config.json   the model (``LanguageModel.load`` reads the directory as is)
    optimizer.safetensors            AdamW moments, keys "<param index>.<name>"
    optimizer.json                   param groups and per-parameter step counters
    trainer_state.safetensors        RNG states as uint8 tensors: data stream, torch CPU (and CUDA)
    trainer.json                     step, TrainConfig, task spec, elapsed time, last metrics

Resuming restores all of the above, so a run split by a checkpoint makes the same updates, bit for bit on CPU,
as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import CheckpointError, ConfigError
from seqlab.io import atomic_dir, atomic_write_text, load_tensors, read_json, save_tensors, write_json
from seqlab.tasks.base import IGNORE, SEED_LIMIT, TRAIN, split_seed

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "bf16", "fp32")
CHECKPOINT_NAME = "checkpoint"
FORMAT_VERSION = 1

# Parameters that are never decayed whatever their shape: SSM dynamics and skip terms (Mamba: A_log, D, dt_bias).
NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias", "delta_bias", "log_dt", "A_real", "A_imag", "A_re", "A_im"})


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    seqlen: int | None = None  # None -> the task's default_seqlen
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0  # data stream seed (train split); also seeds torch before the model is built by callers
    eval_every: int = 0  # steps between evaluations on the test split (0: only at the end)
    eval_batches: int = 4
    eval_batch_size: int | None = None  # None -> batch_size
    target_accuracy: float | None = None  # stop once test accuracy reaches this
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end (and on Ctrl-C)
    out_dir: str | None = None  # None: nothing written
    device: str = "auto"  # auto -> cuda when available
    dtype: str = "auto"  # autocast dtype: auto -> bf16 on CUDA, fp32 on CPU (parameters always fp32)
    max_time_s: float | None = None  # wall-clock cap on training; the result records that it stopped early
    # scaling out (seqlab.distributed; launch with torchrun). Global batch = batch_size x grad_accum x DP world size
    parallel: str = "none"  # none | ddp | fsdp
    tp: int = 1  # tensor-parallel degree (attention/Mamba-2 heads, Mamba/S4 channels, SwiGLU, MoE experts)
    checkpoint_activations: bool = False  # recompute each block's activations in backward
    grad_accum: int = 1  # micro batches of batch_size per optimizer step

    def validate(self) -> TrainConfig:
        checks = [
            ("steps", self.steps >= 0, "an integer >= 0"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("seqlen", self.seqlen is None or self.seqlen >= 2, "an integer >= 2"),
            ("lr", self.lr > 0, "a positive number"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "a number in [0, 1]"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 disables)"),
            ("eval_every", self.eval_every >= 0, "an integer >= 0"),
            ("eval_batches", self.eval_batches >= 1, "an integer >= 1"),
            ("log_every", self.log_every >= 1, "an integer >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, "an integer >= 0"),
            ("dtype", self.dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
            ("parallel", self.parallel in ("none", "ddp", "fsdp"), "one of none, ddp, fsdp"),
            ("tp", self.tp >= 1, "an integer >= 1"),
            ("grad_accum", self.grad_accum >= 1, "an integer >= 1"),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT, "an integer in [0, 2**31)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy: expected a number in (0, 1], got {self.target_accuracy!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay or constant."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * factor)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices; never decay biases, norms, embeddings, SSM dynamics (A_log, D, dt_bias) or
    parameters flagged ``_no_weight_decay``. Shared (tied) parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            skip = (
                param.ndim < 2
                or isinstance(module, nn.Embedding)
                or name in NO_DECAY_NAMES
                or getattr(param, "_no_weight_decay", False)
            )
            (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device!r} requested but CUDA is not available on this machine")
    return dev


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless bf16 is asked for."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def scored_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over scored positions. logits (B, L, V), targets (B, L) with IGNORE elsewhere."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def count_correct(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> tuple[int, int]:
    """(correct, scored) positions; argmax over the task's vocabulary only (padding logits ignored)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    mask = targets != IGNORE
    correct = (logits.argmax(-1) == targets) & mask
    return int(correct.sum()), int(mask.sum())


@dataclass
class TrainResult:
    step: int
    loss: float | None
    accuracy: float | None  # last training-batch accuracy
    eval: dict | None  # last evaluation on the test split
    tokens_per_s: float  # training throughput (optimizer steps only, evaluation excluded)
    train_time_s: float
    stopped: str  # "steps" | "target_accuracy" | "time_limit"
    losses: list[float]  # per-step training loss of this call to fit()
    peak_memory_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated over this fit(); None on CPU


class Progress:
    """One self-overwriting line on stderr; silent when stderr is not a terminal or quiet is set."""

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = False

    def update(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class Trainer:
    """Train ``model`` on ``task``. ``task_spec`` ({"name", "args"}) is stored in checkpoints so runs can resume."""

    def __init__(
        self,
        model: nn.Module,
        task,
        config: TrainConfig,
        task_spec: dict | None = None,
        quiet: bool = False,
        callback: Callable[[Trainer, dict], None] | None = None,
        checkpoint_dir: str | Path | None = None,
        metrics_path: str | Path | None = None,
    ):
        self.config = config.validate()
        self.parallel = None  # seqlab.distributed.training.ParallelContext when scaling out
        if config.parallel != "none" or config.tp > 1 or config.checkpoint_activations:
            from seqlab.distributed.training import ParallelContext

            self.parallel = ParallelContext(config)
        self.device = resolve_device(config.device) if self.parallel is None else self.parallel.device
        self.raw_model = model.to(self.device)  # unwrapped: aux_loss, evaluation, saving
        self.model = self.raw_model if self.parallel is None else self.parallel.wrap(self.raw_model)
        self.is_main = self.parallel is None or self.parallel.is_main
        self.task = task
        self.task_spec = task_spec or {"name": getattr(task, "name", type(task).__name__), "args": {}}
        self.seqlen = config.seqlen or task.default_seqlen
        self.quiet = quiet
        self.callback = callback
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.raw_model, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=1e-8
        )
        if self.parallel is None:
            self.generator = torch.Generator().manual_seed(split_seed(config.seed, TRAIN))
        else:  # per data-parallel rank, disjoint and deterministic
            self.generator = self.parallel.generator(config.seed)
        self.step = 0
        self.elapsed = 0.0  # training seconds over all runs of this job (evaluation excluded)
        self.last_eval: dict | None = None
        self.best_accuracy: float | None = None
        self._interrupt_requested = False
        out = Path(config.out_dir) if config.out_dir else None
        self._metrics_path = Path(metrics_path) if metrics_path else (out / "metrics.jsonl" if out else None)
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else (out / CHECKPOINT_NAME if out else None)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        """One optimizer step on ``grad_accum`` fresh micro batches; returns its metrics (averaged over ranks)."""
        cfg = self.config
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, correct, scored = 0.0, 0, 0
        for micro in range(cfg.grad_accum):
            batch = self.task.sample(cfg.batch_size, self.seqlen, self.generator)
            inputs = batch.inputs.to(self.device, non_blocking=True)
            targets = batch.targets.to(self.device, non_blocking=True)
            extra = {} if batch.seq_idx is None else {"seq_idx": batch.seq_idx.to(self.device, non_blocking=True)}
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.parallel is None else self.parallel.no_sync(self.model)
            with sync:
                with autocast_context(self.device, cfg.dtype):
                    logits = self.model(inputs, **extra)  # (B, L, V)
                loss = scored_loss(logits, targets)
                aux = getattr(self.raw_model, "aux_loss", None)
                total = loss + aux.float() if isinstance(aux, torch.Tensor) else loss
                (total / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            c, s = count_correct(logits.detach(), targets, getattr(self.task, "vocab_size", None))
            correct, scored = correct + c, scored + s
        if cfg.grad_clip > 0:
            if self.parallel is None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            else:
                self.parallel.clip(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        loss_mean, acc = loss_sum / cfg.grad_accum, correct / max(scored, 1)
        if self.parallel is not None:
            loss_mean, acc = self.parallel.mean(loss_mean, acc)
        return {"step": self.step, "loss": loss_mean, "acc": acc, "lr": lr}

    def evaluate(self) -> dict:
        from seqlab.evaluate import evaluate_model

        cfg = self.config
        result = evaluate_model(
            self.raw_model,
            self.task,
            seqlen=self.seqlen,
            samples=cfg.eval_batches * (cfg.eval_batch_size or cfg.batch_size),
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            seed=cfg.seed,
            device=self.device,
            dtype=cfg.dtype,
        )
        self.last_eval = {"step": self.step, **result}
        acc = result["accuracy"]
        self.best_accuracy = acc if self.best_accuracy is None else max(self.best_accuracy, acc)
        return self.last_eval

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train until ``config.steps``, the target accuracy or the time cap; Ctrl-C saves a checkpoint first."""
        cfg = self.config
        progress = Progress(self.quiet or not self.is_main)
        data_world = 1 if self.parallel is None else self.parallel.data_world
        tokens_per_step = cfg.batch_size * cfg.grad_accum * data_world * self.seqlen  # global
        losses: list[float] = []
        record: dict = {}
        stopped = "steps"
        run_time = 0.0
        window_tokens, window_time = 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        previous_handler = self._install_sigint_handler()
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                record = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - start
                run_time += dt
                self.elapsed += dt
                window_tokens += tokens_per_step
                window_time += dt
                losses.append(record["loss"])
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                    record["elapsed"] = round(self.elapsed, 4)
                    window_tokens, window_time = 0, 0.0
                    self._log(record)
                    progress.update(
                        f"step {self.step}/{cfg.steps}  loss {record['loss']:.4f}  acc {record['acc']:.3f}  "
                        f"{record['tokens_per_s']:.0f} tok/s"
                    )
                if self.callback is not None:
                    self.callback(self, record)
                if self._interrupt_requested:
                    raise KeyboardInterrupt
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    result = self.evaluate()
                    self._log({"step": self.step, **{f"eval_{k}": v for k, v in result.items() if k != "step"}})
                    if cfg.target_accuracy is not None and result["accuracy"] >= cfg.target_accuracy:
                        stopped = "target_accuracy"
                        break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.checkpoint_path:
                    self.save_checkpoint()
                if cfg.max_time_s is not None and run_time >= cfg.max_time_s and self.step < cfg.steps:
                    stopped = "time_limit"
                    break
        except KeyboardInterrupt:
            progress.close()
            if self.checkpoint_path is not None:
                path = self.save_checkpoint()
                print(f"interrupted at step {self.step}; checkpoint written to {path}", file=sys.stderr)
            raise
        finally:
            self._restore_sigint_handler(previous_handler)
            progress.close()
        if self.last_eval is None or self.last_eval["step"] != self.step:
            result = self.evaluate()
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in result.items() if k != "step"}})
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        steps_run = len(losses)
        return TrainResult(
            step=self.step,
            loss=losses[-1] if losses else None,
            accuracy=record.get("acc"),
            eval=self.last_eval,
            tokens_per_s=steps_run * tokens_per_step / max(run_time, 1e-9),
            train_time_s=run_time,
            stopped=stopped,
            losses=losses,
            peak_memory_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
        )

    def _log(self, record: dict) -> None:
        if self._metrics_path is None or not self.is_main:
            return
        self._metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self._metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _install_sigint_handler(self):
        """First Ctrl-C (or SIGTERM, what schedulers and ``kill`` send) finishes the current step, then
        checkpoints; a second one interrupts at once. Returns {signal: previous handler} to restore."""
        if threading.current_thread() is not threading.main_thread():
            return None
        installed = {}
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            previous = signal.getsignal(signum)
            if previous is not default:
                continue  # someone else owns it (e.g. a test runner, torchrun's agent); leave it alone

            def handler(num, frame, previous=previous):
                self._interrupt_requested = True
                signal.signal(num, previous)

            signal.signal(signum, handler)
            installed[signum] = previous
        return installed or None

    @staticmethod
    def _restore_sigint_handler(previous) -> None:
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self._checkpoint_dir

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ConfigError("train: cannot save a checkpoint without --out (no checkpoint directory)")
        if self.parallel is not None and self.parallel.env.distributed:  # sharded (DCP); every rank takes part
            return self.parallel.save_checkpoint(self, path, lambda tmp, rng: write_json(
                tmp / "trainer.json", self._trainer_info(world_size=self.parallel.env.world_size)))
        with atomic_dir(path) as tmp:
            save_model(self.raw_model, tmp)
            tensors, meta = optimizer_state(self.optimizer)
            save_tensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "optimizer.json", meta)
            rng = {"data_generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
            save_tensors(tmp / "trainer_state.safetensors", rng)
            write_json(tmp / "trainer.json", self._trainer_info())
        return path

    def _trainer_info(self, world_size: int = 1) -> dict:
        return {
            "format": FORMAT_VERSION,
            "step": self.step,
            "elapsed_s": self.elapsed,
            "train_config": dataclasses.asdict(self.config),
            "task": self.task_spec,
            "seqlen": self.seqlen,
            "last_eval": self.last_eval,
            "best_accuracy": self.best_accuracy,
            "rng_states": "trainer_state.safetensors",
            "world_size": world_size,
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, step, data position and RNG states saved by ``save_checkpoint``."""
        path = Path(path)
        if (path / "dcp").is_dir():  # written by a distributed run: resharded to this world size
            from seqlab.distributed.training import load_trainer_checkpoint

            self._restore_progress(load_trainer_checkpoint(self, path))
            return
        if self.parallel is not None and self.config.tp > 1 and self.config.parallel == "none":
            from seqlab.distributed.training import load_plain_checkpoint

            self._restore_progress(load_plain_checkpoint(self, path))  # every rank keeps its shards of the full state
            return
        if self.parallel is not None and self.config.parallel == "fsdp":
            raise CheckpointError(
                f"checkpoint: {str(path)!r} was written by a single process; resume it with --parallel none, ddp or "
                "--tp (fsdp resumes from checkpoints written by a distributed run)"
            )
        info = read_trainer_json(path)
        load_model_weights(self.raw_model, path)
        tensors = load_tensors(path / "optimizer.safetensors", what="optimizer state")
        meta = read_json(path / "optimizer.json", what="optimizer state")
        load_optimizer_state(self.optimizer, tensors, meta, self.device)
        rng = load_tensors(path / "trainer_state.safetensors", what="trainer RNG state")
        try:
            self.generator.set_state(rng["data_generator"])
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        except (KeyError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"checkpoint: {str(path)!r} has a damaged RNG state ({err})") from err
        self._restore_progress(info)

    def _restore_progress(self, info: dict) -> None:
        """Step, time and evaluation state from trainer.json; metrics logged after that step (by a run killed
        before its next checkpoint) are dropped, so the log reads as one run."""
        self.step = int(info["step"])
        self.elapsed = float(info.get("elapsed_s", 0.0))
        self.last_eval = info.get("last_eval")
        self.best_accuracy = info.get("best_accuracy")
        if self._metrics_path is not None and self.is_main and self._metrics_path.is_file():
            kept = [line for line in self._metrics_path.read_text().splitlines(keepends=True)
                    if _logged_step(line) <= self.step]
            atomic_write_text(self._metrics_path, "".join(kept))


# ---------------------------------------------------------------------- checkpoint helpers
def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line that cannot be read counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_model(model: nn.Module, directory: Path) -> None:
    """model.safetensors + config.json; a LanguageModel writes them itself so ``LanguageModel.load`` reads them."""
    if hasattr(model, "save") and hasattr(model, "config"):
        model.save(directory)
        return
    save_tensors(directory / "model.safetensors", dict(model.state_dict()))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        write_json(directory / "config.json", config.to_dict())


def load_model_weights(model: nn.Module, directory: Path) -> None:
    state = load_tensors(directory / "model.safetensors", what="model weights")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    # tied weights may be stored once; accept a checkpoint lacking an alias of a stored tensor
    missing = [k for k in missing if not any(own[k].data_ptr() == own[s].data_ptr() for s in state if s in own)]
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint: {str(directory)!r} does not match the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint: {str(directory)!r} does not match the model ({err})") from err


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an AdamW state dict: tensors keyed "<param index>.<name>", step counters and groups as JSON."""
    state_dict = optimizer.state_dict()
    tensors, steps = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if name == "step":
                steps[str(index)] = float(value)
            elif isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "steps": steps}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, device: torch.device) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            index = int(index)
            if not 0 <= index < len(params) or value.shape != params[index].shape:
                raise ValueError(f"tensor {key!r} of shape {tuple(value.shape)} matches no parameter of the model")
            state.setdefault(index, {})[name] = value.to(device)
        for index, step in (meta.get("steps") or {}).items():
            state.setdefault(int(index), {})["step"] = torch.tensor(float(step), dtype=torch.float32)
    except (ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint: optimizer state is damaged or from another model ({err})") from err
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise CheckpointError("checkpoint: optimizer.json does not match the model's parameter groups")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint: optimizer state does not match the model ({err})") from err


def read_trainer_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a checkpoint directory (it does not exist)")
    info = read_json(path / "trainer.json", what="checkpoint")
    if not isinstance(info, dict) or "step" not in info or "train_config" not in info:
        raise CheckpointError(f"checkpoint: {str(path / 'trainer.json')!r} lacks step/train_config; not a checkpoint")
    task = info.get("task")
    step = info["step"]
    if (not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(info["train_config"], dict)
            or not isinstance(task, dict) or not isinstance(task.get("name"), str)
            or not isinstance(task.get("args", {}), dict)):
        raise CheckpointError(
            f"checkpoint: {str(path / 'trainer.json')!r} is damaged: expected an int step >= 0, a train_config "
            f"object and a task object with a name, got step={step!r}, task={task!r}"
        )
    number = (int, float)
    for key, kinds in (("elapsed_s", number), ("best_accuracy", (*number, type(None))),
                       ("last_eval", (dict, type(None)))):
        value = info.get(key)
        if key in info and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(f"checkpoint: {str(path / 'trainer.json')!r} is damaged: {key} = {value!r}")
    return info
