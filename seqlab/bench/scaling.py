"""How cost grows with sequence length: wall time, tokens/s and peak memory per model and length.

    forward   one parallel forward over L tokens (prefill)
    train     forward + backward over L tokens
    decode    latency of one new token after a context of L tokens (attention: grows with L; SSMs: constant)

Out-of-memory and over-time cases are results (``status`` "oom" / "skipped: over time"), never a crash: once a
model takes longer than ``time_limit`` seconds at some length, its longer lengths are skipped. The log-log slope
of time against length is fitted per model over the lengths that ran (attention forward ~2 at long L when the
score computation dominates, SSMs ~1). On CUDA, timings use CUDA events and memory is
``torch.cuda.max_memory_allocated``; on the CPU memory is the planned state size only.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from seqlab.bench._device import is_oom
from seqlab.errors import ConfigError

MODES = ("forward", "train", "decode")


@dataclass
class ScalingPoint:
    model: str
    mode: str
    length: int
    batch: int
    status: str  # "ok" | "oom" | "skipped: over time" | "error: ..."
    seconds: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    state_bytes: int | None = None


def time_call(fn: Callable[[], object], device: torch.device, min_repeats: int = 2, min_seconds: float = 0.3) -> float:
    """Median seconds of ``fn`` after one warm-up, repeated until both minimums are met (CUDA events on GPU)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < min_seconds and len(times) < 20):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _workload(model, mode: str, length: int, batch: int, device: torch.device, decode_steps: int, autocast_dtype):
    """A zero-argument callable doing one unit of ``mode`` work, and the number of tokens it processes."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device)
    if mode == "forward":

        def forward():
            with torch.inference_mode():
                model(ids)

        return forward, batch * length
    if mode == "train":

        def train_step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(ids).float().logsumexp(-1).mean()
            loss.backward()

        return train_step, batch * length
    # decode: prefill the context once (chunked so attention-free models keep constant memory), then time steps
    state = model.allocate_state(batch, length + decode_steps + 2, device=device)
    chunk = 4096
    with torch.inference_mode():
        for start in range(0, length, chunk):
            model(ids[:, start : start + chunk], state=state)
    token = ids[:, -1:]
    snapshot = state.offset

    def decode_steps_fn():
        with torch.inference_mode():
            for _ in range(decode_steps):
                model(token, state=state)
        # back to the context length, so every repeat decodes at L (a KV cache overwrites the same slots)
        state.offset = snapshot
        for layer_state in [*state.layers, *state.shared]:
            layer_state.offset = snapshot

    return decode_steps_fn, batch * decode_steps


def measure(
    model,
    name: str,
    mode: str,
    lengths: list[int],
    batch: int = 1,
    device: str | torch.device = "cpu",
    time_limit: float = 60.0,
    decode_steps: int = 8,
    dtype: torch.dtype | None = None,
    on_point: Callable[[ScalingPoint], None] | None = None,
) -> list[ScalingPoint]:
    """Run ``mode`` for each length in increasing order; see the module docstring for statuses.

    ``dtype`` (e.g. bfloat16): inference modes cast the weights to it; ``train`` keeps float32 parameters and
    runs under autocast to it.
    """
    if mode not in MODES:
        raise ConfigError(f"--mode: expected one of {MODES}, got {mode!r}")
    device = torch.device(device)
    autocast_dtype = dtype if mode == "train" else None
    model.to(device=device, dtype=dtype if (dtype is not None and mode != "train") else None)
    model.train(mode == "train")
    points: list[ScalingPoint] = []
    over_time = False
    for length in sorted(lengths):
        point = ScalingPoint(name, mode, length, batch, "ok", state_bytes=model.state_bytes(batch, length))
        if over_time:
            point.status = "skipped: over time"
        else:
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                fn, tokens = _workload(model, mode, length, batch, device, decode_steps, autocast_dtype)
                seconds = time_call(fn, device)
                point.seconds = seconds / (decode_steps if mode == "decode" else 1)
                point.tokens_per_s = tokens / seconds
                if device.type == "cuda":
                    point.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
                over_time = seconds > time_limit
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not is_oom(err):
                    raise
                point.status = "oom"
                over_time = True  # longer lengths need more memory still
            finally:
                model.zero_grad(set_to_none=True)
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def loglog_slope(points: list[ScalingPoint]) -> float | None:
    """Least-squares slope of log(seconds) against log(length) over the points that ran (None if < 2)."""
    ok = [(math.log(p.length), math.log(p.seconds)) for p in points if p.status == "ok" and p.seconds]
    if len(ok) < 2:
        return None
    mx = sum(x for x, _ in ok) / len(ok)
    my = sum(y for _, y in ok) / len(ok)
    var = sum((x - mx) ** 2 for x, _ in ok)
    return sum((x - mx) * (y - my) for x, y in ok) / var if var else None


def as_records(points: list[ScalingPoint]) -> list[dict]:
    return [asdict(p) for p in points]
