"""The memory planner: weights, KV cache, recurrent state and activations of a model at a context length.

Everything here is arithmetic on an ``ArchSpec`` (the layer counts and shapes that decide memory), so the same
formulas serve seqlab's presets and the public models in ``public_configs.json``. Tests check the formulas
against the real modules (``num_params`` and ``state_bytes`` of models built on the meta device).

Accounting, per sequence of ``context`` tokens and a batch of ``batch`` sequences:
- weights: parameter count x bytes of ``dtype``.
- KV cache: attention layers x 2 (K and V) x n_kv_heads x head_dim x min(context, window) x dtype bytes.
- other families (linear attention, RWKV, Griffin, mLSTM): parameters and state bytes come from the modules
  themselves, built on the meta device (their states are constant-size).
- recurrent state: per Mamba-1 layer d_inner x d_state (float32, the scan's accumulator) plus the conv window
  d_inner x (d_conv - 1) in ``dtype``; Mamba-2 likewise with nheads x headdim x d_state and conv_dim =
  d_inner + 2 ngroups d_state; S4D H x N/2 complex64. Constant in ``context``.
- activations: the peak of one layer's live intermediates during a one-shot prefill of the whole context
  (projections, conv and scan outputs, MLP hidden) plus the residual stream; logits of the last position only.
  Chunked prefill replaces ``context`` by the chunk length here (layers of the other families count a generic
  six projections of width d_model). With eager (non-fused) attention the
  (heads x context x context) score matrix comes on top: ``attention_score_entries`` counts it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources

from seqlab.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}


@dataclass
class ArchSpec:
    name: str
    d_model: int
    n_layers: int
    vocab_size: int
    tie_embeddings: bool = True
    source: str = ""
    published_params: float | None = None
    # attention
    attn_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None
    shared_attention: bool = False  # one block's weights reused at every attention position (Zamba)
    # Mamba-1
    mamba_layers: int = 0
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None
    # Mamba-2
    mamba2_layers: int = 0
    ssd_d_state: int = 128
    ssd_headdim: int = 64
    ssd_ngroups: int = 1
    # S4D
    s4_layers: int = 0
    s4_d_state: int = 64
    # layers of other families (linear attention, RWKV, Griffin, mLSTM, ...): counted from the built modules
    other_layers: int = 0
    other_params: int = 0
    other_state_bytes: int = 0  # per sequence; these families keep a constant-size state
    # channel mixing
    d_ff: int = 0
    mlp_layers: int = 0
    moe_layers: int = 0
    n_experts: int = 0
    top_k: int = 0

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def ssd_nheads(self) -> int:
        return self.d_inner // self.ssd_headdim


def _resolve(spec: ArchSpec) -> int:
    return spec.dt_rank if spec.dt_rank is not None else math.ceil(spec.d_model / 16)


def param_count(spec: ArchSpec) -> int:
    """Parameters implied by the shapes (norm weights included; biases as in the reference blocks)."""
    d, di = spec.d_model, spec.d_inner
    total = spec.vocab_size * d * (1 if spec.tie_embeddings else 2) + d  # embeddings, head, final norm
    if spec.attn_layers:
        width = 2 * d if spec.shared_attention else d
        q_out, kv_out = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        attn = width * q_out + 2 * width * kv_out + q_out * width + width
        total += attn * (1 if spec.shared_attention else spec.attn_layers)
    if spec.mamba_layers:
        n, r = spec.d_state, _resolve(spec)
        layer = d * 2 * di + di * spec.d_conv + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d + d
        total += layer * spec.mamba_layers
    if spec.mamba2_layers:
        g, n, h = spec.ssd_ngroups, spec.ssd_d_state, spec.ssd_nheads
        conv_dim = di + 2 * g * n
        layer = d * (2 * di + 2 * g * n + h) + conv_dim * (spec.d_conv + 1) + 3 * h + di + di * d + d
        total += layer * spec.mamba2_layers
    if spec.s4_layers:
        h = d
        # log_dt, D; log A_real, A_imag and complex C over N/2 modes; GLU out-projection (H -> 2H, bias); norm
        layer = 2 * h + 4 * h * (spec.s4_d_state // 2) + 2 * h * h + 2 * h + d
        total += layer * spec.s4_layers
    total += spec.other_params
    total += (3 * d * spec.d_ff + d) * spec.mlp_layers
    total += (spec.n_experts * 3 * d * spec.d_ff + d * spec.n_experts + d) * spec.moe_layers
    return total


def kv_cache_bytes(spec: ArchSpec, context: int, batch: int, dtype_bytes: int, kv_heads: int | None = None) -> int:
    kept = min(context, spec.window) if spec.window else context
    heads = spec.n_kv_heads if kv_heads is None else kv_heads
    return spec.attn_layers * 2 * heads * spec.head_dim * kept * batch * dtype_bytes


def recurrent_state_bytes(spec: ArchSpec, batch: int, dtype_bytes: int) -> int:
    di, w = spec.d_inner, spec.d_conv - 1
    mamba = di * spec.d_state * 4 + di * w * dtype_bytes
    conv_dim = di + 2 * spec.ssd_ngroups * spec.ssd_d_state
    mamba2 = spec.ssd_nheads * spec.ssd_headdim * spec.ssd_d_state * 4 + conv_dim * w * dtype_bytes
    s4 = spec.d_model * (spec.s4_d_state // 2) * 8
    modelled = spec.mamba_layers * mamba + spec.mamba2_layers * mamba2 + spec.s4_layers * s4
    return batch * (modelled + spec.other_state_bytes)


def attention_score_entries(spec: ArchSpec, context: int) -> int:
    """Entries of the (heads x T x T) score matrices over all attention layers, per sequence, if materialised."""
    kept = min(context, spec.window) if spec.window else context
    return spec.attn_layers * spec.n_heads * context * kept


def activation_bytes(spec: ArchSpec, context: int, batch: int, dtype_bytes: int) -> int:
    """Peak live intermediates of the largest layer during one-shot prefill (fused attention, no score matrix)."""
    d, di, tokens = spec.d_model, spec.d_inner, batch * context
    per_token = [0]
    if spec.attn_layers:
        width = 2 * d if spec.shared_attention else d
        per_token.append(2 * spec.n_heads * spec.head_dim + 2 * spec.n_kv_heads * spec.head_dim + width)
    if spec.mamba_layers:
        per_token.append(5 * di + _resolve(spec) + 2 * spec.d_state)
    if spec.mamba2_layers:
        g, n = spec.ssd_ngroups, spec.ssd_d_state
        per_token.append(2 * di + 2 * g * n + spec.ssd_nheads + (di + 2 * g * n) + di)
    if spec.s4_layers:
        per_token.append(4 * d)
    if spec.other_layers:  # a generic estimate: ~6 projections of width d_model live at once
        per_token.append(6 * d)
    if spec.mlp_layers:
        per_token.append(3 * spec.d_ff)
    if spec.moe_layers:
        per_token.append(spec.top_k * 3 * spec.d_ff + spec.n_experts)
    residual = 2 * d
    logits = batch * spec.vocab_size * 4  # float32 logits of the last position
    return tokens * (max(per_token) + residual) * dtype_bytes + logits


def plan(spec: ArchSpec, context: int, batch: int = 1, dtype: str = "bf16", prefill_chunk: int | None = None) -> dict:
    """All the numbers for one model, plus notes where a common shortcut gets them wrong.

    ``prefill_chunk``: the prompt is consumed in chunks of this many tokens (activations scale with the chunk).
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if context < 1 or batch < 1:
        raise ConfigError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ConfigError(f"prefill_chunk: expected a positive count, got {prefill_chunk}")
    nbytes = DTYPE_BYTES[dtype]
    params = param_count(spec)
    prefill_tokens = min(context, prefill_chunk) if prefill_chunk else context
    result = {
        "model": spec.name,
        "source": spec.source,
        "context": context,
        "batch": batch,
        "dtype": dtype,
        "params": params,
        "published_params": spec.published_params,
        "weights_bytes": params * nbytes,
        "kv_cache_bytes": kv_cache_bytes(spec, context, batch, nbytes),
        "recurrent_state_bytes": recurrent_state_bytes(spec, batch, nbytes),
        "prefill_chunk": prefill_chunk,
        "activation_bytes": activation_bytes(spec, prefill_tokens, batch, nbytes),
        "attention_score_entries": attention_score_entries(spec, context),
        "notes": [],
    }
    result["inference_state_bytes"] = result["kv_cache_bytes"] + result["recurrent_state_bytes"]
    result["total_bytes"] = result["weights_bytes"] + result["inference_state_bytes"] + result["activation_bytes"]
    if spec.attn_layers and spec.n_kv_heads < spec.n_heads:
        naive = kv_cache_bytes(spec, context, batch, nbytes, kv_heads=spec.n_heads)
        result["notes"].append(
            f"KV cache uses n_kv_heads={spec.n_kv_heads}, not n_heads={spec.n_heads} (grouped-query attention): "
            f"{spec.attn_layers} layers x 2 x {spec.n_kv_heads} x {spec.head_dim} x {context} tokens x {batch} x "
            f"{nbytes} B = {human_bytes(result['kv_cache_bytes'])}; the common estimate with n_heads gives "
            f"{human_bytes(naive)} ({spec.n_heads // spec.n_kv_heads}x too much)."
        )
    if spec.window and context > spec.window:
        result["notes"].append(
            f"sliding window {spec.window}: the cache holds the last {spec.window} tokens, not {context}."
        )
    if spec.attn_layers and spec.attn_layers < spec.n_layers:
        result["notes"].append(
            f"only {spec.attn_layers} of {spec.n_layers} layers keep a KV cache; the other layers' state is constant "
            f"({human_bytes(result['recurrent_state_bytes'])} at any context)."
        )
    if spec.moe_layers:
        active = params - (spec.n_experts - spec.top_k) * 3 * spec.d_model * spec.d_ff * spec.moe_layers
        result["active_params"] = active
        result["notes"].append(
            f"mixture of experts: all {spec.n_experts} experts' weights must be resident "
            f"({human_bytes(params * nbytes)}) although each token uses {spec.top_k} "
            f"({active / 1e9:.1f}B active parameters)."
        )
    return result


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_count(text: str, argument: str = "context") -> int:
    """'4096', '128k' (x1024), '1m' (x1024^2) or '1.5k' -> an int."""
    raw = str(text).strip().lower().replace("_", "")
    scale = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise ConfigError(f"{argument}: expected a count like 4096, 128k or 1m, got {text!r}") from None
    if value < 1 or value != int(value):
        raise ConfigError(f"{argument}: expected a positive whole count, got {text!r}")
    return int(value)


def public_specs() -> dict[str, ArchSpec]:
    data = json.loads(resources.files("seqlab.bench").joinpath("public_configs.json").read_text())
    fields = {f.name for f in dataclasses.fields(ArchSpec)}
    return {entry["name"]: ArchSpec(**{k: v for k, v in entry.items() if k in fields}) for entry in data["models"]}
