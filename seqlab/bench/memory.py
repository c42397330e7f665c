"""The memory planner: weights, KV cache, recurrent state and activations of a model at a context length.

Everything here is arithmetic on an ``ArchSpec`` (the layer counts and shapes that decide memory), so the same
formulas serve seqlab's presets and the public models in ``public_configs.json``. Tests check the formulas
against the real modules (``num_params`` and ``state_bytes`` of models built on the meta device).

Accounting, per sequence of ``context`` tokens and a batch of ``batch`` sequences:
- weights: parameter count x bytes of ``dtype``.
- KV cache: attention layers x 2 (K and V) x n_kv_heads x head_dim x min(context, window) x dtype bytes.
- other families (linear attention, RWKV, Griffin, mLSTM): parameters and state bytes come from the modules
  themselves, built on the meta device (their states are constant-size).
- recurrent state: per Mamba-1 layer d_inner x d_state (the SSM state) plus the conv window d_inner x (d_conv - 1),
  both in ``state_dtype`` (float32 by default, or bf16/fp16: ``allocate_state(..., state_dtype=...)``); Mamba-2
  likewise with nheads x headdim x d_state and conv_dim = d_inner + 2 ngroups d_state; S4D H x N/2 complex64.
  Constant in ``context``.
- activations: the most bytes alive at one moment of a one-shot prefill (``prefill_phases``): the embedding
  output, the residual stream and the block's normed input stay alive across a layer; on top of them the worst
  step of the largest layer, its tensors counted from the CUDA code paths under inference mode (Triton conv,
  selective scan and SSD with their contiguous copies and SSD's entering chunk states; no scan checkpoints or
  tensors saved for a backward; Mamba-2's float32 gated norm; fused attention and its float32 RoPE, but not its
  (B, L, cache) mask; SwiGLU's three hidden tensors; the residual added to the out_proj output inside the mixer);
  the head computes the last position's logits only.
  Chunked prefill replaces ``context`` by the chunk length here (layers of the other families count a generic six
  projections of width d_model). With eager (non-fused) attention the (heads x context x context) score matrix
  comes on top: ``attention_score_entries`` counts it.
- CUDA graph recording (``graph_capture_bytes``): ``DecodeGraph.record`` keeps one snapshot of the state (and of 3
  positions of each KV cache) while it records and checks the replay; the total takes the larger of this and the
  activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources

from seqlab.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}
# dtypes a recurrent state may be kept in (seqlab.mixers.base.RECURRENT_STATE_DTYPES)
STATE_DTYPES = ("fp32", "bf16", "fp16")


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
    ssd_chunk_size: int = 256
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


def recurrent_state_bytes(spec: ArchSpec, batch: int, state_bytes: int = 4) -> int:
    """Bytes of the constant-size states: Mamba's SSM state and conv window in the state dtype (``state_bytes``
    per element, float32 by default); S4D's complex64 modes and the other families' states as they allocate them."""
    di, w = spec.d_inner, spec.d_conv - 1
    mamba = di * (spec.d_state + w) * state_bytes
    conv_dim = di + 2 * spec.ssd_ngroups * spec.ssd_d_state
    mamba2 = (spec.ssd_nheads * spec.ssd_headdim * spec.ssd_d_state + conv_dim * w) * state_bytes
    s4 = spec.d_model * (spec.s4_d_state // 2) * 8
    modelled = spec.mamba_layers * mamba + spec.mamba2_layers * mamba2 + spec.s4_layers * s4
    return batch * (modelled + spec.other_state_bytes)


def attention_score_entries(spec: ArchSpec, context: int) -> int:
    """Entries of the (heads x T x T) score matrices over all attention layers, per sequence, if materialised."""
    kept = min(context, spec.window) if spec.window else context
    return spec.attn_layers * spec.n_heads * context * kept


# ------------------------------------------------------------------------------------------------ activations
#
# The prefill's peak is the most bytes alive at one moment of the forward. Every layer runs the same steps on
# (batch x prefill) tokens, so the peak is the largest layer's worst moment ("phase") on top of the tensors that
# stay alive across it ("resident"). Phases follow the CUDA paths of seqlab's mixers (Triton kernels for the
# conv, the selective scan and SSD; fused attention) under ``torch.inference_mode`` with a preallocated state, as
# ``seqlab generate`` and ``seqlab bench generate`` prefill.


@dataclass(frozen=True)
class Buffer:
    """One tensor alive at a moment of the prefill, over the whole batch."""

    name: str
    nbytes: int


@dataclass(frozen=True)
class Phase:
    """A moment of the prefill and every tensor alive then (resident tensors included)."""

    name: str
    buffers: tuple[Buffer, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def largest(self, count: int | None = 3) -> list[Buffer]:
        """The ``count`` largest buffers (all with None), largest first."""
        return sorted(self.buffers, key=lambda b: b.nbytes, reverse=True)[:count]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def ssd_chunk_len(chunk_size: int) -> int:
    """The SSD Triton forward's chunk length under no_grad / inference_mode: the inference tile, chunk_size rounded
    up to a power of two and clamped to [16, 128] (training takes at most 64)."""
    return min(128, max(16, _next_pow2(chunk_size)))


def ssd_chunk_state_bytes(dtype_bytes: int) -> int:
    """Bytes per element of the SSD's entering chunk states: the fused state pass stores them in the input dtype
    when it is 16-bit, else in float32."""
    return dtype_bytes if dtype_bytes == 2 else 4


def _resident(spec: ArchSpec, tokens: int, nbytes: int) -> tuple[Buffer, ...]:
    """Alive through every layer: the embedding output (LanguageModel.forward keeps ``x_emb``), the residual
    stream h and the block's normed input (an argument of the mixer's forward until it returns)."""
    width = tokens * spec.d_model * nbytes
    return (Buffer("embedding output", width), Buffer("residual stream", width), Buffer("normed layer input", width))


def _conv_window(batch: int, channels: int, d_conv: int, nbytes: int) -> Buffer:
    """The conv's final state: a view of a (B, channels, 2 (W-1)) concatenation, kept by the mixer's forward."""
    return Buffer("conv final-state window", batch * channels * 2 * (d_conv - 1) * nbytes)


def _mamba_phases(spec: ArchSpec, batch: int, seqlen: int, nbytes: int) -> list[Phase]:
    """Mamba-1 block: in_proj, Triton causal conv, x_proj / dt_proj, Triton selective scan, out_proj."""
    n, di, N, R = batch * seqlen, spec.d_inner, spec.d_state, _resolve(spec)
    A = Buffer("A = -exp(A_log) fp32", di * N * 4)
    proj = Buffer("in_proj output (x, z)", n * 2 * di * nbytes)
    conv = Buffer("conv output", n * di * nbytes)
    window = _conv_window(batch, di, spec.d_conv, nbytes)
    x_proj = Buffer("x_proj output (dt, B, C)", n * (R + 2 * N) * nbytes)
    delta = Buffer("delta = dt_proj(dt)", n * di * nbytes)
    y = Buffer("scan output y", n * di * nbytes)
    final = Buffer("final state (B, D, N) fp32", batch * di * N * 4)
    # without autograd the scan stores no checkpoints and saves nothing for a backward (the time-segment carries
    # of a split scan, a few (B, D, N) float32 at small batch, are left out)
    kept = (A, proj, conv, window, x_proj, delta, y, final)  # alive from the scan until the block returns
    return [
        Phase("mamba conv", (A, proj, Buffer("contiguous copy of x for the conv", n * di * nbytes), conv)),
        Phase("mamba selective scan", kept + (Buffer("contiguous copies of B, C", n * 2 * N * nbytes),
                                              Buffer("contiguous copy of z", n * di * nbytes))),
        Phase("mamba out_proj", kept + _out_proj_and_residual(spec, n, nbytes)),
    ]


def _out_proj_and_residual(spec: ArchSpec, tokens: int, nbytes: int) -> tuple[Buffer, ...]:
    """The mixer's out_proj output and the block's next residual stream (``residual + out``, formed inside the
    mixer's forward while its locals are alive)."""
    width = tokens * spec.d_model * nbytes
    return (Buffer("out_proj output", width), Buffer("residual + out_proj output", width))


def _mamba2_phases(spec: ArchSpec, batch: int, seqlen: int, nbytes: int) -> list[Phase]:
    """Mamba-2 block: in_proj, Triton causal conv over xBC, Triton SSD, gated RMSNorm (float32), out_proj."""
    n, di, h = batch * seqlen, spec.d_inner, spec.ssd_nheads
    g, N, P = spec.ssd_ngroups, spec.ssd_d_state, spec.ssd_headdim
    conv_dim = di + 2 * g * N
    proj = Buffer("in_proj output (z, xBC, dt)", n * (di + conv_dim + h) * nbytes)
    conv = Buffer("conv output (x, B, C)", n * conv_dim * nbytes)
    window = _conv_window(batch, conv_dim, spec.d_conv, nbytes)
    y = Buffer("SSD output y", n * di * nbytes)
    final = Buffer("final state (B, H, P, N) fp32", batch * h * P * N * 4)
    T = ssd_chunk_len(spec.ssd_chunk_size)
    nchunks = -(-seqlen // T)
    state_nbytes = ssd_chunk_state_bytes(nbytes)
    state_name = "fp32" if state_nbytes == 4 else "in the input dtype"
    upcast = 4 if nbytes < 4 else 0  # .float() of a float32 tensor returns the tensor itself
    kept = (proj, conv, window, y, final)  # alive from the SSD until the block returns
    return [
        Phase("mamba2 conv", (proj, Buffer("contiguous copy of xBC for the conv", n * conv_dim * nbytes), conv)),
        # the bare forward (no autograd): the copies live while it runs, nothing is kept for a backward
        Phase("mamba2 SSD", kept + (
            Buffer("contiguous copies of x, dt, B, C", n * (di + h + 2 * g * N) * nbytes),
            Buffer(f"chunk states (B, L/{T}, H, P, N) {state_name}", batch * nchunks * h * P * N * state_nbytes),
            Buffer("chunk log-decays fp32", batch * h * nchunks * T * 4),
            Buffer(f"C Bᵀ per chunk and group (B, L/{T}, G, T, T) fp32", batch * nchunks * g * T * T * 4),
        )),
        # GatedRMSNorm: y.float() * silu(z.float()); at silu the upcasts of y and z and silu's output are alive
        Phase("mamba2 gated RMSNorm", kept + (
            Buffer("y in fp32", n * di * upcast), Buffer("z in fp32", n * di * upcast),
            Buffer("silu(z) fp32", n * di * 4), Buffer("y * silu(z) fp32", n * di * 4 if not upcast else 0),
        )),
        Phase("mamba2 out_proj", kept + (Buffer("gated norm output", n * di * nbytes),)
              + _out_proj_and_residual(spec, n, nbytes)),
    ]


def _rope_buffers(name: str, tokens: int, width: int, head_dim: int, nbytes: int) -> tuple[Buffer, ...]:
    """The worst moment of ``RotaryEmbedding._rotate`` on a (tokens, width) input: its float32 copy, the float32
    angles, cos and sin (tokens, head_dim / 2), and four float32 half-width products alive at once (the first half
    of the rotation while the second half's two products and their sum are formed)."""
    upcast = tokens * width * 4 if nbytes < 4 else 0  # .float() of a float32 tensor returns the tensor itself
    return (
        Buffer(f"{name} in fp32 for RoPE", upcast),
        Buffer("RoPE angles, cos, sin fp32", 3 * tokens * (head_dim // 2) * 4),
        Buffer(f"RoPE products of {name} fp32", 4 * tokens * (width // 2) * 4),
    )


def _attention_phases(spec: ArchSpec, batch: int, seqlen: int, nbytes: int) -> list[Phase]:
    """Attention over a preallocated KV cache (``Attention._attend_cached``, fused SDPA, no score matrix): the q, k, v
    projections stay alive while RoPE rotates q, then k, in float32, and while SDPA runs. Left out: the (B, L, S)
    boolean mask over the whole cache and SDPA's additive copy of it in the query dtype (3 bytes per query-key pair
    in bf16), small while the prompt fills most of the cache (S ~ L) but not for a short chunk of a long cache."""
    n = batch * seqlen
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    base = [Buffer("q, k, v projections", n * (q + 2 * kv) * nbytes),
            Buffer("RoPE positions and document ids (int64)", n * 2 * 8)]
    if spec.shared_attention:  # Zamba's shared block reads [h, x_emb] of width 2 d_model, and its norm
        base.append(Buffer("shared block input [h, x_emb] and its norm", n * 4 * spec.d_model * nbytes))
    q_rotated = Buffer("q after RoPE", n * q * nbytes)
    return [
        Phase("attention RoPE(q)", (*base, *_rope_buffers("q", n, q, spec.head_dim, nbytes))),
        Phase("attention RoPE(k)", (*base, q_rotated, *_rope_buffers("k", n, kv, spec.head_dim, nbytes))),
        Phase("attention", (*base, Buffer("q, k after RoPE", n * (q + kv) * nbytes),
                            Buffer("attention output", n * q * nbytes))),
    ]


def _layer_phases(spec: ArchSpec, batch: int, seqlen: int, nbytes: int) -> list[Phase]:
    """The phases of every kind of layer the model has (without the resident tensors)."""
    n, d = batch * seqlen, spec.d_model
    phases = []
    if spec.attn_layers:
        phases += _attention_phases(spec, batch, seqlen, nbytes)
    if spec.mamba_layers:
        phases += _mamba_phases(spec, batch, seqlen, nbytes)
    if spec.mamba2_layers:
        phases += _mamba2_phases(spec, batch, seqlen, nbytes)
    if spec.s4_layers:
        phases.append(Phase("s4", (Buffer("S4 intermediates (~4 x d_model)", n * 4 * d * nbytes),)))
    if spec.other_layers:  # a generic estimate: ~6 projections of width d_model live at once
        phases.append(Phase("other mixers", (Buffer("~6 projections of d_model", n * 6 * d * nbytes),)))
    if spec.mlp_layers:
        hidden = n * spec.d_ff * nbytes
        phases.append(Phase("SwiGLU", (Buffer("act(gate)", hidden), Buffer("up projection", hidden),
                                       Buffer("act(gate) * up", hidden))))
    if spec.moe_layers:
        experts = Buffer("experts' hidden (top-k x 3 x d_ff)", spec.top_k * 3 * n * spec.d_ff * nbytes)
        phases.append(Phase("MoE", (experts, Buffer("router logits", n * spec.n_experts * nbytes))))
    return phases


def prefill_phases(spec: ArchSpec, seqlen: int, batch: int, dtype_bytes: int) -> list[Phase]:
    """Every modelled moment of a one-shot prefill of ``seqlen`` tokens per sequence, resident tensors included;
    the last is the head, which computes the logits of the last position only (``last_only``)."""
    resident = _resident(spec, batch * seqlen, dtype_bytes)
    phases = [Phase(p.name, resident + p.buffers) for p in _layer_phases(spec, batch, seqlen, dtype_bytes)]
    logits = batch * spec.vocab_size
    head = (Buffer("last-position logits", logits * dtype_bytes), Buffer("logits in fp32", logits * 4))
    phases.append(Phase("head", resident[:2] + head))
    return phases


def activation_peak(spec: ArchSpec, context: int, batch: int, dtype_bytes: int) -> Phase:
    """The moment of the prefill with the most bytes alive (besides weights and state)."""
    return max(prefill_phases(spec, context, batch, dtype_bytes), key=lambda p: p.nbytes)


def activation_bytes(spec: ArchSpec, context: int, batch: int, dtype_bytes: int) -> int:
    """Peak live intermediates of a one-shot prefill of ``context`` tokens (fused attention, no score matrix)."""
    return activation_peak(spec, context, batch, dtype_bytes).nbytes


def graph_capture_bytes(spec: ArchSpec, context: int, batch: int, dtype_bytes: int, state_bytes: int = 4) -> int:
    """Transient bytes of recording the decode step as a CUDA graph (``seqlab.generation.DecodeGraph.record``):
    one snapshot of the state, alive while it records and checks the replay: a copy of every fixed-size state
    tensor and of 3 positions of each KV cache."""
    kv_slots = kv_cache_bytes(spec, min(context, 3), batch, dtype_bytes)
    return recurrent_state_bytes(spec, batch, state_bytes) + kv_slots


def plan(spec: ArchSpec, context: int, batch: int = 1, dtype: str = "bf16", prefill_chunk: int | None = None,
         state_dtype: str = "fp32") -> dict:
    """All the numbers for one model, plus notes where a common shortcut gets them wrong.

    ``dtype``: weights, KV cache and activations. ``state_dtype``: the recurrent states (Mamba's SSM state and
    conv window). ``prefill_chunk``: the prompt is consumed in chunks of this many tokens (activations scale with
    the chunk).
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if state_dtype not in STATE_DTYPES:
        raise ConfigError(f"state_dtype: expected one of {list(STATE_DTYPES)}, got {state_dtype!r}")
    if context < 1 or batch < 1:
        raise ConfigError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ConfigError(f"prefill_chunk: expected a positive count, got {prefill_chunk}")
    nbytes, state_nbytes = DTYPE_BYTES[dtype], DTYPE_BYTES[state_dtype]
    params = param_count(spec)
    prefill_tokens = min(context, prefill_chunk) if prefill_chunk else context
    peak = activation_peak(spec, prefill_tokens, batch, nbytes)
    result = {
        "model": spec.name,
        "source": spec.source,
        "context": context,
        "batch": batch,
        "dtype": dtype,
        "state_dtype": state_dtype,
        "params": params,
        "published_params": spec.published_params,
        "weights_bytes": params * nbytes,
        "kv_cache_bytes": kv_cache_bytes(spec, context, batch, nbytes),
        "recurrent_state_bytes": recurrent_state_bytes(spec, batch, state_nbytes),
        "prefill_chunk": prefill_chunk,
        "activation_bytes": peak.nbytes,
        "activation_peak": {"phase": peak.name, "buffers": [dataclasses.asdict(b) for b in peak.largest(None)]},
        "graph_capture_bytes": graph_capture_bytes(spec, context, batch, nbytes, state_nbytes),
        "attention_score_entries": attention_score_entries(spec, context),
        "notes": [],
    }
    result["inference_state_bytes"] = result["kv_cache_bytes"] + result["recurrent_state_bytes"]
    transient = max(result["activation_bytes"], result["graph_capture_bytes"])
    result["total_bytes"] = result["weights_bytes"] + result["inference_state_bytes"] + transient
    if result["graph_capture_bytes"] > result["activation_bytes"]:
        result["notes"].append(
            f"recording the CUDA decode graph keeps a snapshot of the state "
            f"({human_bytes(result['graph_capture_bytes'])}), more than the prefill's activations "
            f"({human_bytes(result['activation_bytes'])}); the total counts the larger."
        )
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
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ConfigError(f"{argument}: expected a positive whole count, got {text!r}")
    return int(value)


def public_specs() -> dict[str, ArchSpec]:
    data = json.loads(resources.files("seqlab.bench").joinpath("public_configs.json").read_text())
    fields = {f.name for f in dataclasses.fields(ArchSpec)}
    return {entry["name"]: ArchSpec(**{k: v for k, v in entry.items() if k in fields}) for entry in data["models"]}
