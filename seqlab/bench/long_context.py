"""Prefill over a very long context in chunks, at constant memory, and what a Transformer does at the same lengths.

Chunked prefill: the context is fed ``chunk`` tokens at a time into one preallocated inference state (the same
call as decode, ``model(ids_chunk, state=state)``), so an SSM holds only its fixed-size state plus one chunk's
activations however long the context grows. At each milestone (chunk, 2 chunk, 4 chunk, ..., context) a record
gives the elapsed time, the rate of the last segment, the peak memory since the start (CUDA) and the bytes of
the state. The final logits equal a one-shot forward over the whole context (tested).

Comparison: a Transformer runs one-shot causal attention over each milestone length (``F.scaled_dot_product_attention``
with ``is_causal``: the flash kernel on CUDA) until it runs out of memory or time; its KV cache bytes at that
length are listed beside it (``state_bytes``).

Passkey: with ``depths``, the context is the passkey task's sequence (``seqlab.tasks.passkey``, byte level) with
the needle at each depth; after the prefill the model decodes the answer greedily and ``retrieved`` says whether
all of it came out right. With random weights only the time and memory mean anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from seqlab.bench._device import is_oom, synchronize
from seqlab.errors import ConfigError

BYTE_VOCAB = 259


@dataclass
class LongContextPoint:
    model: str
    method: str  # "chunked" | "one-shot"
    tokens: int
    status: str  # "ok" | "oom" | "skipped: ..."
    depth: float | None = None
    seconds: float | None = None  # chunked: elapsed since the start of the prefill; one-shot: this length's call
    tokens_per_s: float | None = None  # chunked: over the segment since the previous milestone
    peak_memory_bytes: int | None = None
    state_bytes: int | None = None


@dataclass
class PasskeyResult:
    model: str
    context: int
    depth: float
    answer: str
    decoded: str
    retrieved: bool
    weights: str  # "random" | a checkpoint directory


def milestones(context: int, chunk: int) -> list[int]:
    """chunk, 2 chunk, 4 chunk, ... below ``context``, then ``context``."""
    if chunk < 1 or context < 1:
        raise ConfigError(f"--chunk and --context: expected counts >= 1, got chunk={chunk}, context={context}")
    points, n = [], chunk
    while n < context:
        points.append(n)
        n *= 2
    return points + [context]


def chunked_prefill(model, name: str, context: int, chunk: int, device, ids: torch.Tensor | None = None,
                    depth: float | None = None, extra_positions: int = 0, time_limit: float | None = None,
                    seed: int = 0, on_point: Callable[[LongContextPoint], None] | None = None):
    """Feed ``context`` tokens (``ids (1, context)``, or random ids drawn chunk by chunk) through one state.

    Returns (points at each milestone, last logits ``(1, V)``, the state, which has room for
    ``extra_positions`` more tokens). Past ``time_limit`` seconds the remaining milestones are "skipped"."""
    device = torch.device(device)
    vocab = model.config.vocab_size
    marks = milestones(context, chunk)
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = model.allocate_state(1, context + max(extra_positions, 1), device=device)
    points: list[LongContextPoint] = []
    logits = None
    done, last_mark, last_time = 0, 0, 0.0
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for mark in marks:
            if time_limit is not None and last_time > time_limit:
                point = LongContextPoint(name, "chunked", mark, f"skipped: over {time_limit:g} s", depth)
            else:
                while done < mark:
                    n = min(chunk, mark - done)
                    if ids is None:
                        piece = torch.randint(0, vocab, (1, n), device=device, generator=generator)
                    else:
                        piece = ids[:, done : done + n].to(device)
                    logits = model(piece, state=state, last_only=True)[:, -1, :vocab]  # (1, V)
                    done += n
                synchronize(device)
                elapsed = time.perf_counter() - start
                point = LongContextPoint(
                    name, "chunked", mark, "ok", depth, elapsed, (mark - last_mark) / max(elapsed - last_time, 1e-9),
                    torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None, state.nbytes(),
                )
                last_mark, last_time = mark, elapsed
            points.append(point)
            if on_point is not None:
                on_point(point)
    return points, logits, state


def one_shot(model, name: str, lengths: list[int], device, time_limit: float | None = None, seed: int = 0,
             on_point: Callable[[LongContextPoint], None] | None = None) -> list[LongContextPoint]:
    """One forward over each length (increasing) from scratch; OOM and over-time stop the longer lengths."""
    device = torch.device(device)
    vocab = model.config.vocab_size
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    points, stop = [], None
    for length in sorted(lengths):
        kv_bytes = model.state_bytes(1, length, dtype)
        point = LongContextPoint(name, "one-shot", length, stop or "ok", state_bytes=kv_bytes)
        if stop is None:
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                ids = torch.randint(0, vocab, (1, length), device=device, generator=generator)
                synchronize(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(ids, last_only=True)  # the logits of one position: the cost is the model's
                synchronize(device)
                point.seconds = time.perf_counter() - t0
                point.tokens_per_s = length / point.seconds
                if device.type == "cuda":
                    point.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
                if time_limit is not None and point.seconds > time_limit:
                    stop = f"skipped: {length} took over {time_limit:g} s"
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not is_oom(err):
                    raise
                point.status = "oom"
                stop = f"skipped: oom at {length}"
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def check_passkey_context(context: int, answer_len: int = 5) -> None:
    """ConfigError unless ``context`` tokens hold the needle and the question."""
    from seqlab.tasks.passkey import Passkey

    least = Passkey(answer_len=answer_len).min_seqlen - answer_len
    if context < least:
        raise ConfigError(f"--context: the passkey needs at least {least} tokens, got {context}")


def passkey_inputs(context: int, depth: float, answer_len: int = 5, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The passkey task's sequence up to its answer: (prompt ``(1, context)`` ending in the question, the
    ``answer_len`` answer ids)."""
    from seqlab.tasks.passkey import Passkey

    check_passkey_context(context, answer_len)
    total = context + answer_len
    task = Passkey(seqlen=total, answer_len=answer_len)
    batch = task.sample(1, total, torch.Generator().manual_seed(seed), depth=depth)
    return batch.inputs[:, :context], batch.inputs[0, context:].tolist()


def passkey_run(model, name: str, context: int, chunk: int, depth: float, device, weights: str = "random",
                answer_len: int = 5, time_limit: float | None = None, seed: int = 0,
                on_point: Callable[[LongContextPoint], None] | None = None):
    """Chunked prefill of the passkey sequence, then greedy decode of the answer: (points, PasskeyResult)."""
    if model.config.vocab_size < BYTE_VOCAB:
        raise ConfigError(f"passkey: the model needs the byte vocabulary (>= {BYTE_VOCAB} ids), "
                          f"got vocab_size={model.config.vocab_size}")
    vocab = model.config.vocab_size
    prompt, answer = passkey_inputs(context, depth, answer_len, seed)
    points, logits, state = chunked_prefill(model, name, prompt.shape[1], chunk, device, prompt, depth,
                                            extra_positions=answer_len, time_limit=time_limit, on_point=on_point)
    decoded: list[int] = []
    if logits is not None and points[-1].status == "ok":
        with torch.inference_mode():
            token = logits.argmax(-1)  # (1,)
            for i in range(answer_len):
                decoded.append(int(token))
                if i + 1 < answer_len:
                    token = model(token[:, None], state=state)[:, -1, :vocab].argmax(-1)

    def text(ids: list[int]) -> str:
        return bytes(i if i < 256 else ord("?") for i in ids).decode("utf-8", errors="replace")

    return points, PasskeyResult(name, context, depth, text(answer), text(decoded), decoded == answer, weights)


def records(items) -> list[dict]:
    return [asdict(x) for x in items]


HEADER = f"{'model':<20} {'method':<9} {'depth':>5} {'tokens':>9} {'status':<12} {'time s':>9} {'tok/s':>10} " \
         f"{'peak mem':>10} {'state':>10}"


def _mib(n: int | None) -> str:
    from seqlab.bench.memory import human_bytes

    return "-" if n is None else human_bytes(n)


def format_point(p: LongContextPoint) -> str:
    status = p.status if len(p.status) <= 12 else p.status[:11] + "…"
    return (f"{p.model:<20} {p.method:<9} {'-' if p.depth is None else f'{p.depth:.2f}':>5} {p.tokens:>9} "
            f"{status:<12} {'-' if p.seconds is None else f'{p.seconds:.3f}':>9} "
            f"{'-' if p.tokens_per_s is None else f'{p.tokens_per_s:,.0f}':>10} {_mib(p.peak_memory_bytes):>10} "
            f"{_mib(p.state_bytes):>10}")
