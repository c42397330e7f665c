"""Mixers: state carry (decode, chunked prefill), packed documents, attention masks and RoPE, MoE routing, inits.

Reference comparisons run in float32 with relative error (max |a - b| / max |b|) below 1e-4; bf16 autocast
forwards are checked against float32 within 5e-2 relative error.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqlab.errors import ConfigError, InputError
from seqlab.mixers import MIXERS, Attention, GatedRMSNorm, Mamba, Mamba2, MoE, RMSNorm, SwiGLU
from seqlab.mixers.attention import document_positions
from seqlab.mixers.mlp import default_d_ff
from seqlab.mixers.moe import load_balancing_loss
from seqlab.models.config import ModelConfig

TINY = dict(
    d_model=16, n_heads=4, s4_d_state=8, d_state=4, d_conv=3, expand=2,
    ssd_d_state=8, ssd_headdim=8, ssd_chunk_size=4, dt_rank="auto",
)
VARIANTS = {
    "attention": ("A", {}),
    "attention-gqa": ("A", {"n_kv_heads": 2}),
    "attention-mqa": ("A", {"n_kv_heads": 1}),
    "attention-window": ("A", {"attn_window": 5}),
    "s4": ("S", {}),
    "s4-lin-bilinear": ("S", {"s4_init": "lin", "s4_discretization": "bilinear"}),
    "mamba": ("M", {}),
    "mamba-bcdt-norm": ("M", {"bcdt_norm": True}),
    "mamba2": ("M2", {}),
    "mamba2-groups": ("M2", {"ssd_ngroups": 2}),
}
SEQUENCE_MIXERS = ["attention", "attention-window", "s4", "mamba", "mamba2"]


def make(variant: str, seed: int = 0):
    kind, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    mixer = MIXERS[kind].from_config(ModelConfig(**{**TINY, **overrides}), 0)
    return mixer.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def states_rel_err(s1, s2) -> float:
    assert s1.tensors.keys() == s2.tensors.keys()
    errs = []
    for name in s1.tensors:
        a, b = s1[name], s2[name]
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        errs.append(0.0 if not b.is_floating_point() and torch.equal(a, b) else rel_err(a, b))
    return max(errs)


# ----------------------------------------------------------------------------------------------- state carry


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_decode_matches_parallel_forward(variant):
    mixer = make(variant)
    x = torch.randn(2, 12, 16)
    y_parallel = mixer(x)
    state = mixer.allocate_state(2, 12)
    y_decode = torch.cat([mixer(x[:, t : t + 1], state) for t in range(12)], dim=1)
    assert state.offset == 12
    assert rel_err(y_decode, y_parallel) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_chunked_prefill_matches_one_shot(variant):
    mixer = make(variant)
    generator = torch.Generator().manual_seed(1)
    L = 23
    x = torch.randn(2, L, 16, generator=generator)
    cuts = sorted(torch.randperm(L - 1, generator=generator)[:3].add(1).tolist())
    y_ref = mixer(x)
    one_shot = mixer.allocate_state(2, 32)
    y_one = mixer(x, one_shot)
    chunked = mixer.allocate_state(2, 32)
    pieces = [mixer(x[:, s:e], chunked) for s, e in zip([0, *cuts], [*cuts, L])]
    assert rel_err(y_one, y_ref) < 1e-4
    assert rel_err(torch.cat(pieces, dim=1), y_ref) < 1e-4
    assert chunked.offset == one_shot.offset == L
    assert states_rel_err(chunked, one_shot) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_matches_allocated_tensors(variant, dtype):
    mixer = make(variant)
    for batch, seqlen in [(1, 3), (2, 17), (3, 64)]:
        state = mixer.allocate_state(batch, seqlen, dtype=dtype)
        assert mixer.state_bytes(batch, seqlen, dtype=dtype) == state.nbytes()


def test_state_bytes_grows_for_attention_and_is_constant_for_ssms():
    for variant in ["s4", "mamba", "mamba2"]:
        mixer = make(variant)
        assert mixer.state_bytes(1, 16) == mixer.state_bytes(1, 4096)
    full, windowed = make("attention"), make("attention-window")
    assert full.state_bytes(1, 4096) > full.state_bytes(1, 16)
    assert windowed.state_bytes(1, 4096) == windowed.state_bytes(1, 5)


# ----------------------------------------------------------------------------------------- packed documents


def packed_seq_idx(lengths_per_row: list[list[int]]) -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]) for lengths in lengths_per_row]
    return torch.stack(rows).to(torch.int32)


LENGTHS = [[5, 1, 8], [9, 5]]  # two rows of 14 positions


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_packed_documents_equal_separate(variant):
    mixer = make(variant)
    x = torch.randn(2, 14, 16)
    y_packed = mixer(x, seq_idx=packed_seq_idx(LENGTHS))
    for b, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            y_alone = mixer(x[b : b + 1, start : start + n])
            assert rel_err(y_packed[b : b + 1, start : start + n], y_alone) < 1e-4
            start += n


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_packed_prefill_state_continues_the_last_document(variant):
    """Prefill packed rows with a state, then decode: equals prefilling the last document alone."""
    mixer = make(variant)
    x = torch.randn(2, 14, 16)
    x_next = torch.randn(2, 3, 16)
    state = mixer.allocate_state(2, 32)
    mixer(x, state, seq_idx=packed_seq_idx(LENGTHS))
    y_next = torch.cat([mixer(x_next[:, t : t + 1], state) for t in range(3)], dim=1)
    for b, lengths in enumerate(LENGTHS):
        alone = mixer.allocate_state(1, 32)
        mixer(x[b : b + 1, 14 - lengths[-1] :], alone)
        y_alone = torch.cat([mixer(x_next[b : b + 1, t : t + 1], alone) for t in range(3)], dim=1)
        assert rel_err(y_next[b : b + 1], y_alone) < 1e-4


@pytest.mark.parametrize("variant", ["attention", "attention-window", "mamba2"])
@torch.no_grad()
def test_packed_chunked_prefill_matches_packed_one_shot(variant):
    mixer = make(variant)
    x = torch.randn(2, 14, 16)
    seq_idx = packed_seq_idx(LENGTHS)
    y_ref = mixer(x, seq_idx=seq_idx)
    state = mixer.allocate_state(2, 14)
    pieces = [mixer(x[:, s:e], state, seq_idx=seq_idx[:, s:e]) for s, e in [(0, 4), (4, 7), (7, 14)]]
    assert rel_err(torch.cat(pieces, dim=1), y_ref) < 1e-4


def test_document_positions_restart_at_each_document():
    doc, pos = document_positions(packed_seq_idx([[2, 3, 1]]))
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]


# ---------------------------------------------------------------------------------------------- attention


def reference_attention(mixer: Attention, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(hd) + mask) v with repeated KV heads and RoPE at positions 0..L-1."""
    Bsz, L, _ = x.shape
    H, Hkv, hd = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    pos = torch.arange(L)
    q = mixer.rope(mixer.q_proj(x).view(Bsz, L, H, hd), pos)
    k = mixer.rope(mixer.k_proj(x).view(Bsz, L, Hkv, hd), pos).repeat_interleave(H // Hkv, dim=2)
    v = mixer.v_proj(x).view(Bsz, L, Hkv, hd).repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    if window is not None:
        allowed &= ~torch.ones(L, L, dtype=torch.bool).tril(-window)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    y = torch.einsum("bhts,bshd->bthd", weights, v).reshape(Bsz, L, H * hd)
    return mixer.o_proj(y)


@pytest.mark.parametrize("variant", ["attention", "attention-gqa", "attention-mqa", "attention-window"])
@torch.no_grad()
def test_attention_equals_masked_reference(variant):
    mixer = make(variant)
    x = torch.randn(2, 11, 16)
    assert rel_err(mixer(x), reference_attention(mixer, x, mixer.window)) < 1e-4


@torch.no_grad()
def test_sliding_window_differs_from_full_attention_beyond_the_window():
    mixer = make("attention-window")
    x = torch.randn(1, 11, 16)
    y_window = mixer(x)
    y_full = reference_attention(mixer, x, window=None)
    assert rel_err(y_window[:, :5], y_full[:, :5]) < 1e-4  # inside the first window the two agree
    assert rel_err(y_window[:, 5:], y_full[:, 5:]) > 1e-2


@torch.no_grad()
def test_sliding_window_ring_cache_decodes_past_max_seqlen():
    mixer = make("attention-window")
    x = torch.randn(1, 20, 16)
    state = mixer.allocate_state(1, 8)  # ring buffer of window=5 slots
    assert state["k"].shape[1] == 5
    y = torch.cat([mixer(x[:, t : t + 1], state) for t in range(20)], dim=1)
    assert rel_err(y, mixer(x)) < 1e-4


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_gqa_and_mqa_projection_and_cache_shapes(n_kv_heads):
    mixer = Attention(16, n_heads=4, n_kv_heads=n_kv_heads)
    assert mixer.q_proj.weight.shape == (16, 16)
    assert mixer.k_proj.weight.shape == mixer.v_proj.weight.shape == (n_kv_heads * 4, 16)
    assert mixer.allocate_state(3, 10)["k"].shape == (3, 10, n_kv_heads, 4)
    assert mixer(torch.randn(3, 7, 16)).shape == (3, 7, 16)


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ConfigError):
        Attention(16, n_heads=4, n_kv_heads=3)


def test_kv_cache_overflow_raises_input_error():
    mixer = make("attention")
    state = mixer.allocate_state(1, 6)
    mixer(torch.randn(1, 4, 16), state)
    with pytest.raises(InputError, match="max_seqlen"):
        mixer(torch.randn(1, 3, 16), state)


def test_rope_scores_depend_only_on_the_offset():
    rope = make("attention").rope
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)

    def score(p: int, s: int) -> float:
        return (rope(q, torch.tensor([p])) * rope(k, torch.tensor([s]))).sum().item()

    for p, s in [(0, 0), (3, 1), (10, 2), (7, 7)]:
        assert score(p, s) == pytest.approx(score(p + 13, s + 13), abs=1e-5)
    assert score(5, 0) != pytest.approx(score(5, 3), abs=1e-3)


# ------------------------------------------------------------------------------------------------------- MoE


def dense_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Run every expert on every token, then combine the renormalised top-k weights."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(moe.router(tokens), dim=-1)  # (T, E)
    top_w, top_i = probs.topk(moe.top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_w / top_w.sum(-1, keepdim=True))  # (T, E)
    all_out = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (T, E, d)
    return (gates.unsqueeze(-1) * all_out).sum(dim=1).reshape(x.shape)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@torch.no_grad()
def test_moe_dropless_routing_equals_dense_reference(top_k):
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=top_k, d_ff=32)
    x = torch.randn(3, 9, 16)
    assert rel_err(moe(x), dense_moe_reference(moe, x)) < 1e-5


def test_moe_aux_loss_equals_formula_on_hand_made_routing():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    expert_idx = torch.tensor([[0, 1], [0, 1], [3, 0], [2, 3]])
    f = torch.tensor([3, 2, 1, 2]) / 8  # share of the 8 assignments per expert
    P = torch.tensor([1.65, 0.65, 0.55, 1.15]) / 4  # mean router probability per expert
    assert load_balancing_loss(probs, expert_idx, 4).item() == pytest.approx(4 * (f * P).sum().item())
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(uniform, balanced, 4).item() == pytest.approx(1.0)


def test_moe_forward_stores_its_aux_loss():
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=2, d_ff=32)
    x = torch.randn(2, 5, 16)
    moe(x)
    probs, _, expert_idx = moe.route(x.reshape(-1, 16))
    assert moe.aux_loss.item() == pytest.approx(load_balancing_loss(probs, expert_idx, 4).item())
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_from_config_reads_expert_fields():
    config = ModelConfig(**TINY, n_experts=3, moe_top_k=1, d_ff=24)
    moe = MoE.from_config(config, 1)
    assert (moe.n_experts, moe.top_k, moe.experts[0].d_ff) == (3, 1, 24)
    with pytest.raises(ConfigError):
        MoE(16, n_experts=2, top_k=3)


# --------------------------------------------------------------------------------------------- MLP and norms


def test_swiglu_default_width_and_formula():
    assert default_d_ff(256) == 704 and default_d_ff(16) == 64
    torch.manual_seed(0)
    mlp = SwiGLU(16)
    x = torch.randn(2, 3, 16)
    want = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    assert rel_err(mlp(x), want) < 1e-5


def test_rms_norms_match_their_formulas():
    x, z = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert rel_err(norm(x), want) < 1e-5
    assert RMSNorm(8, weight=False).weight is None
    gated = GatedRMSNorm(8, eps=1e-6, group_size=4)
    h = (x * F.silu(z)).view(2, 3, 2, 4)
    want = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).view(2, 3, 8)
    assert rel_err(gated(x, z), want) < 1e-5


# ---------------------------------------------------------------------------------------------------- inits


def test_mamba_init_dt_bias_and_s4d_real_A():
    config = ModelConfig(**TINY, dt_min=0.01, dt_max=0.05, dt_init_floor=1e-4)
    mixer = Mamba.from_config(config, 0)
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    bound = mixer.dt_rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    A_expected = torch.log(torch.arange(1, 5, dtype=torch.float32)).repeat(mixer.d_inner, 1)
    assert torch.equal(mixer.A_log.data, A_expected)
    assert torch.equal(mixer.D.data, torch.ones(mixer.d_inner))
    assert mixer.conv1d.weight.shape == (mixer.d_inner, 1, 3)


def test_mamba2_init_and_config_checks():
    mixer = Mamba2.from_config(ModelConfig(**TINY, dt_min=0.01, dt_max=0.05), 0)
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1 - 1e-5 and A.max() <= 16 + 1e-4
    assert mixer.conv1d.weight.shape == (mixer.d_inner + 2 * 8, 1, 3)
    with pytest.raises(ConfigError, match="ssd_headdim"):
        Mamba2(16, headdim=12)


def test_registry_builds_every_kind_from_the_default_config():
    config = ModelConfig()
    for kind, cls in MIXERS.items():
        mixer = cls.from_config(config, 0)
        assert isinstance(mixer, cls), kind
    assert {"A", "S", "M", "M2"} <= set(MIXERS)  # the four core families; more families add tokens


# ---------------------------------------------------------------------------------------- gradients, dtypes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_flow_to_every_parameter(variant):
    mixer = make(variant).train()
    x = torch.randn(2, 9, 16, requires_grad=True)
    mixer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", SEQUENCE_MIXERS)
def test_bf16_autocast_forward_runs_on_cpu(variant):
    mixer = make(variant)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        y32 = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = mixer(x)
            state = mixer.allocate_state(2, 12)
            mixer(x[:, :8], state)
            y_step = mixer(x[:, 8:], state)
    assert torch.isfinite(y16.float()).all()
    assert rel_err(y16, y32) < 5e-2
    assert rel_err(y_step, y32[:, 8:]) < 5e-2
    assert all(p.dtype == torch.float32 for p in mixer.parameters())


def test_moe_and_swiglu_run_under_bf16_autocast():
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=2, d_ff=32)
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert rel_err(y, moe(x).detach()) < 5e-2


# ---------------------------------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_forward_decode_and_backward_match_cpu(variant):
    """On CUDA (Triton kernels where the ops have them): forward and gradients equal the CPU float32 ones (2e-3,
    Triton's tl.dot may use TF32), decode equals the parallel forward, and bf16 autocast stays within 5e-2."""
    mixer = make(variant).train()
    x = torch.randn(2, 70, 16)
    y_cpu = mixer(x)
    y_cpu.square().mean().backward()
    grads_cpu = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    cuda = mixer.to("cuda")
    xc = x.cuda()
    y_cuda = cuda(xc)
    y_cuda.square().mean().backward()
    assert rel_err(y_cuda.cpu(), y_cpu) < 2e-3
    for name, p in cuda.named_parameters():
        assert rel_err(p.grad.cpu(), grads_cpu[name]) < 1e-2, name
    with torch.no_grad():
        state = cuda.allocate_state(2, 70)
        y_prefill = cuda(xc[:, :60], state)
        y_decode = torch.cat([cuda(xc[:, t : t + 1], state) for t in range(60, 70)], dim=1)
        assert rel_err(torch.cat([y_prefill, y_decode], dim=1).cpu(), y_cpu) < 2e-3
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y16 = cuda(xc)
            state16 = cuda.allocate_state(2, 70)
            cuda(xc[:, :60], state16)
            y16_step = cuda(xc[:, 60:61], state16)
        assert rel_err(y16.float().cpu(), y_cpu) < 5e-2
        assert rel_err(y16_step.float().cpu(), y_cpu[:, 60:61]) < 5e-2
