"""Inference throughput: a prompt of ``prompt_len`` tokens, then ``gen_len`` new tokens per row, against batch size
(the experiment of Gu & Dao 2023, "Mamba", Sec. 4.5 / Fig. 8).

Each model runs its best path: the whole prompt in one prefill call into a preallocated state (KV cache or
constant-size recurrent state), then greedy decode steps; a step is replayed from a recorded CUDA graph when
it can be recorded (``seqlab.generation.DecodeGraph``: SSM states have a fixed size; attention decodes at
fixed shapes over the whole preallocated KV cache, its write position held in a device tensor). Fused kernels
come from the ops' ``backend="auto"``. ``cuda_graph`` in the results says whether the graph was used.

Reported per (model, batch):
    prefill_s, decode_s        the prompt's one call (its last logits give the first new token); the
                               gen_len - 1 decode steps that give the other tokens
    e2e_tokens_per_s           batch * gen_len / (prefill_s + decode_s)   (the paper's metric: prompt included)
    decode_tokens_per_s        batch * (gen_len - 1) / decode_s
    floor_step_s, achieved     the memory-bandwidth floor of one step (``seqlab.bench.roofline``) at the mean
                               context of the decode, and floor / measured step time
Out of memory is a result (``status`` "oom"), as is "skipped: ..." for larger batches after an OOM or a run
over ``time_limit``. With ``hf=True`` the same architectures also run through transformers' own
implementations (exported with ``seqlab.interop.to_hf``), timed with ``model.generate`` (greedy, a static KV
cache for Llama; transformers' Mamba runs fused only when the mamba_ssm / causal_conv1d packages are installed,
which the results' notes record).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from seqlab.bench._device import is_oom, synchronize
from seqlab.bench.roofline import decode_step_bytes, floor_seconds
from seqlab.errors import ConfigError

STATIC_CACHE_TYPES = ("llama",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class GenerateResult:
    model: str
    impl: str  # "seqlab" | "hf"
    batch: int
    prompt_len: int
    gen_len: int
    status: str  # "ok" | "oom" | "skipped: ..." | "unavailable: ..." | "error: ..."
    prefill_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    e2e_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    step_s: float | None = None
    cuda_graph: bool = False
    step_bytes: int | None = None
    weight_bytes: int | None = None
    state_bytes: int | None = None
    floor_step_s: float | None = None
    achieved: float | None = None
    peak_memory_bytes: int | None = None
    state_dtype: str | None = None  # the recurrent states' dtype on the seqlab side ("fp32" | "bf16" | "fp16")
    notes: list[str] = field(default_factory=list)

    def finish(self, prefill_s: float, decode_s: float) -> None:
        """Fill the derived rates from the two measured times."""
        self.prefill_s, self.decode_s = prefill_s, decode_s
        self.total_s = prefill_s + decode_s
        self.e2e_tokens_per_s = self.batch * self.gen_len / self.total_s if self.total_s > 0 else None
        steps = self.gen_len - 1
        if steps > 0 and decode_s > 0:
            self.step_s = decode_s / steps
            self.decode_tokens_per_s = self.batch * steps / decode_s
            if self.floor_step_s is not None:
                self.achieved = self.floor_step_s / self.step_s


# ------------------------------------------------------------------------------------------------ arguments


def parse_int_list(text: str, argument: str) -> list[int]:
    """'1,2,4' or '1,2,4,...,128' (doubling) -> [1, 2, 4, ...]; every entry a whole number >= 1."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if "..." in parts:
        i = parts.index("...")
        if i < 2 or i != len(parts) - 2:
            raise ConfigError(f"{argument}: '...' needs two values before it and one after, e.g. 1,2,...,128")
        head = parse_int_list(",".join(parts[:i]), argument)
        last = parse_int_list(parts[-1], argument)[0]
        ratio = head[-1] / head[-2]
        if ratio <= 1 or ratio != int(ratio):
            raise ConfigError(f"{argument}: '...' continues a doubling-style series, got {text!r}")
        values = list(head)
        while values[-1] * ratio <= last:
            values.append(int(values[-1] * ratio))
        if values[-1] != last:
            values.append(last)
        return values
    values = []
    for p in parts:
        try:
            value = int(p)
        except ValueError:
            raise ConfigError(f"{argument}: expected whole numbers >= 1 separated by commas, got {text!r}") from None
        if value < 1:
            raise ConfigError(f"{argument}: expected whole numbers >= 1, got {value} in {text!r}")
        values.append(value)
    if not values:
        raise ConfigError(f"{argument}: expected at least one value, got {text!r}")
    return values


def parse_models(text: str, default_size: str = "small", option: str = "--models",
                 **overrides) -> list[tuple[str, str, str]]:
    """'transformer:1.3b,mamba2' -> [(spec, preset, size)], each checked against the presets now (fail fast);
    errors name ``option``."""
    from seqlab.models.presets import preset_config

    specs = []
    for spec in [m.strip() for m in str(text).split(",") if m.strip()]:
        name, _, size = spec.partition(":")
        size = size or default_size
        try:
            preset_config(name, size, **overrides)
        except ConfigError as err:
            raise ConfigError(f"{option}: {spec!r}: {err}") from None
        specs.append((spec, name, size))
    if not specs:
        raise ConfigError(f"{option}: expected a comma list of NAME[:SIZE] presets, got {text!r}")
    return specs


# ---------------------------------------------------------------------------------------------- seqlab path


def time_seqlab(model, batch: int, prompt_len: int, gen_len: int, device: torch.device, repeats: int = 1,
                cuda_graph: bool = True, generator: torch.Generator | None = None,
                state_dtype: torch.dtype | None = None) -> tuple[float, float, str]:
    """Median (prefill seconds, decode seconds) of greedy generation, and how the step ran: "graph", "eager" or
    "eager: out of memory while recording" (recording copies the state; a KV cache near the memory limit fails).

    One untimed warm-up run first; the state is allocated and the graph recorded once, outside the timing."""
    from seqlab.generation import DecodeGraph

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device, generator=generator)
    state = model.allocate_state(batch, prompt_len + gen_len, device=device, state_dtype=state_dtype)
    with torch.inference_mode():
        step = lambda token: model(token[:, None], state=state)[:, -1, :vocab]  # noqa: E731
        graph, how = None, "eager"
        if cuda_graph and device.type == "cuda" and gen_len > 1:
            try:
                graph = DecodeGraph.record(model, state, ids[:, -1], vocab, verify=True)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not is_oom(err):
                    raise
                how = "eager: out of memory while recording"
                state.reset()
                torch.cuda.empty_cache()
            if graph is not None:
                step, how = graph.step, "graph"
            elif how == "eager":
                how = f"eager: {DecodeGraph.last_rejection}"

        def once() -> tuple[float, float]:
            state.reset()
            synchronize(device)
            t0 = time.perf_counter()
            token = model(ids, state=state, last_only=True)[:, -1, :vocab].argmax(-1)  # (B,) first new token
            synchronize(device)
            t1 = time.perf_counter()
            for _ in range(gen_len - 1):
                token = step(token).argmax(-1)
            synchronize(device)
            return t1 - t0, time.perf_counter() - t1

        once()
        runs = [once() for _ in range(max(repeats, 1))]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), how


def bench_seqlab(model, name: str, batches: list[int], prompt_len: int, gen_len: int, device, repeats: int = 1,
                 bandwidth: float | None = None, time_limit: float = 120.0, cuda_graph: bool = True,
                 on_result: Callable[[GenerateResult], None] | None = None,
                 state_dtype: torch.dtype | None = None) -> list[GenerateResult]:
    """One GenerateResult per batch size (increasing); OOM and over-time become results for larger batches.
    ``state_dtype``: the recurrent states' dtype (``LanguageModel.allocate_state``; default float32)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def measure(batch: int, result: GenerateResult) -> None:
        prefill_s, decode_s, how = time_seqlab(model, batch, prompt_len, gen_len, device, repeats, cuda_graph,
                                               generator, state_dtype)
        result.cuda_graph = how == "graph"
        if how.startswith("eager:"):
            result.notes.append(how)
        result.finish(prefill_s, decode_s)

    return _sweep(model, name, "seqlab", batches, prompt_len, gen_len, device, bandwidth, time_limit, measure,
                  on_result, recurrent_dtype=state_dtype)


def takes_state_dtype(model) -> bool:
    """Whether any layer of a seqlab model keeps a recurrent state whose dtype ``state_dtype`` sets."""
    return any(getattr(b.mixer, "takes_state_dtype", False) for b in getattr(model, "layers", ()))


def _sweep(model, name: str, side: str, batches: list[int], prompt_len: int, gen_len: int, device: torch.device,
           bandwidth: float | None, time_limit: float, measure: Callable[[int, GenerateResult], None],
           on_result: Callable[[GenerateResult], None] | None, notes: tuple[str, ...] = (),
           record_errors: bool = False, recurrent_dtype: torch.dtype | None = None) -> list[GenerateResult]:
    """``measure(batch, result)`` for each batch size (increasing), into results that carry the decode step's byte
    floor. Out of memory and over-time stop the sweep and are recorded; other errors too when ``record_errors``."""
    results: list[GenerateResult] = []
    stop = None
    recurrent = side == "seqlab" and takes_state_dtype(model)
    for batch in sorted(batches):
        result = GenerateResult(name, side, batch, prompt_len, gen_len, "ok", notes=list(notes))
        if recurrent:
            result.state_dtype = DTYPE_NAMES[recurrent_dtype or torch.float32]
        counts = decode_step_bytes(model, batch, prompt_len + gen_len // 2, recurrent_dtype=recurrent_dtype)
        result.step_bytes, result.weight_bytes, result.state_bytes = counts["total"], counts["weights"], counts["state"]
        if bandwidth:
            result.floor_step_s = floor_seconds(counts["total"], bandwidth)
        if stop is not None:
            result.status = stop
        else:
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                measure(batch, result)
                if device.type == "cuda":
                    result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
                if result.total_s > time_limit:
                    stop = f"skipped: batch {batch} took over {time_limit:g} s"
            except Exception as err:
                if is_oom(err):
                    result.status = "oom"
                    stop = f"skipped: oom at batch {batch}"
                elif record_errors:
                    result.status = f"error: {type(err).__name__}: {err}"[:300]
                    stop = "skipped: an earlier batch failed"
                else:
                    raise
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# -------------------------------------------------------------------------------------------- transformers


def _hf_generate_kwargs(hf_model, gen_len: int, static_cache: bool) -> dict:
    kwargs = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
    # a static (preallocated) KV cache exists for attention models; Mamba models keep their own fixed-size cache
    if static_cache and getattr(hf_model.config, "model_type", "") in STATIC_CACHE_TYPES:
        kwargs["cache_implementation"] = "static"
    return kwargs


def load_hf(model, directory: str, dtype: torch.dtype, device: torch.device, compile_step: bool = False):
    """Export ``model`` with ``seqlab.interop.to_hf`` into ``directory`` and load it with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    from seqlab.interop import to_hf

    to_hf(model, directory)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        hf_model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=dtype)
    hf_model = hf_model.to(device).eval()
    if hasattr(hf_model, "generation_config") and not compile_step:
        hf_model.generation_config.disable_compile = True
    return hf_model


def hf_notes(hf_model) -> list[str]:
    """What transformers' implementation runs with (fast kernels present or not)."""
    notes = [f"transformers {__import__('transformers').__version__}, {type(hf_model).__name__}"]
    try:
        from transformers.utils import import_utils

        checks = ("is_mamba_ssm_available", "is_mamba_2_ssm_available", "is_causal_conv1d_available")
        found = {c[3:-10]: bool(getattr(import_utils, c)()) for c in checks if hasattr(import_utils, c)}
        if "Mamba" in type(hf_model).__name__:
            notes.append("fused kernels: " + ", ".join(f"{k}={v}" for k, v in found.items()))
    except Exception:  # an older or newer transformers without these helpers
        pass
    return notes


def time_hf(hf_model, batch: int, prompt_len: int, gen_len: int, vocab: int, device: torch.device,
            repeats: int = 1, static_cache: bool = True) -> tuple[float, float]:
    """Median (prefill seconds, decode seconds) of ``hf_model.generate`` (greedy, exactly ``gen_len`` tokens).

    A logits processor notes the time when the prompt's logits first arrive: prefill = start to then,
    decode = then to the end (the same split as the seqlab side)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstLogitsClock(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                synchronize(device)
                self.at = time.perf_counter()
            return scores

    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kwargs = _hf_generate_kwargs(hf_model, gen_len, static_cache)

    def once() -> tuple[float, float]:
        clock = FirstLogitsClock()
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([clock]), **kwargs)
        synchronize(device)
        end = time.perf_counter()
        if out.shape[1] != prompt_len + gen_len:
            raise RuntimeError(f"transformers generated {out.shape[1] - prompt_len} tokens, not {gen_len}")
        return clock.at - t0, end - clock.at

    once()
    runs = [once() for _ in range(max(repeats, 1))]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def bench_hf(model, name: str, batches: list[int], prompt_len: int, gen_len: int, device, dtype: torch.dtype,
             repeats: int = 1, bandwidth: float | None = None, time_limit: float = 120.0, static_cache: bool = True,
             compile_step: bool = False, on_result: Callable[[GenerateResult], None] | None = None,
             ) -> list[GenerateResult]:
    """The transformers counterpart of ``bench_seqlab`` (``model`` is the seqlab model to export, any dtype)."""
    device = torch.device(device)

    def unavailable(reason: str) -> list[GenerateResult]:
        out = [GenerateResult(name, "hf", b, prompt_len, gen_len, f"unavailable: {reason}") for b in sorted(batches)]
        for r in out:
            if on_result is not None:
                on_result(r)
        return out

    try:
        import transformers  # noqa: F401
    except ImportError:
        return unavailable("transformers is not installed")
    with tempfile.TemporaryDirectory(prefix="seqlab-hf-") as directory:
        try:
            hf_model = load_hf(model, directory, dtype, device, compile_step)
        except Exception as err:  # an architecture without an export, or a transformers that cannot load it
            return unavailable(f"{type(err).__name__}: {err}"[:300])
    vocab = model.config.vocab_size

    def measure(batch: int, result: GenerateResult) -> None:
        static = static_cache and "cache_implementation" in _hf_generate_kwargs(hf_model, gen_len, True)
        result.notes.append("static cache" if static else "transformers' default cache")
        result.finish(*time_hf(hf_model, batch, prompt_len, gen_len, vocab, device, repeats, static_cache))

    return _sweep(model, name, "hf", batches, prompt_len, gen_len, device, bandwidth, time_limit, measure,
                  on_result, notes=tuple(hf_notes(hf_model)), record_errors=True)


# ------------------------------------------------------------------------------------------------- driver


def build_model(name: str, size: str, device: torch.device, dtype: torch.dtype, **overrides):
    """A randomly initialised preset, built directly on ``device`` and cast to ``dtype`` (float32 parameters are
    the library default; the benchmark measures the chosen storage dtype)."""
    from seqlab.models.presets import from_preset

    torch.manual_seed(0)
    with torch.device(device):
        model = from_preset(name, size, **overrides)
    return model.to(dtype=dtype).eval()


def records(results: list[GenerateResult]) -> list[dict]:
    return [asdict(r) for r in results]


HEADER = (f"{'model':<18} {'impl':<7} {'state':<5} {'batch':>5} {'status':<10} {'prefill s':>10} {'decode s':>10} "
          f"{'e2e tok/s':>11} {'dec tok/s':>11} {'step ms':>8} {'floor ms':>9} {'of floor':>8} {'graph':>5} "
          f"{'peak mem':>10}")


def format_row(r: GenerateResult) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    status = r.status if len(r.status) <= 10 else r.status[:9] + "…"
    share = "-" if r.achieved is None else f"{100 * r.achieved:.1f}%"
    mem = "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.1f} GiB"
    return (f"{r.model:<18} {r.impl:<7} {r.state_dtype or '-':<5} {r.batch:>5} {status:<10} "
            f"{num(r.prefill_s, '10.4f')} "
            f"{num(r.decode_s, '10.4f')} {num(r.e2e_tokens_per_s, '11,.0f')} {num(r.decode_tokens_per_s, '11,.0f')} "
            f"{num(None if r.step_s is None else r.step_s * 1e3, '8.3f')} "
            f"{num(None if r.floor_step_s is None else r.floor_step_s * 1e3, '9.3f')} "
            f"{share:>8} {('yes' if r.cuda_graph else 'no'):>5} "
            f"{mem:>10}")
