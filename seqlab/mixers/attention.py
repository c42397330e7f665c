"""Causal multi-head attention with rotary positions, grouped KV heads, an optional sliding window and a KV cache.

    q, k, v = x W_q, x W_k, x W_v            # (B, L, H, hd), (B, L, H_kv, hd) x2
    q, k    = RoPE(q, pos), RoPE(k, pos)
    y       = softmax(q k^T / sqrt(hd) + mask) v,   o_proj(y)

Glossary: H = n_heads, H_kv = n_kv_heads (H_kv = H: MHA; 1: MQA; between: GQA, each KV head serves
H / H_kv query heads), hd = head_dim, W = attn_window (query t sees keys t-W+1 .. t).

Packed documents (``seq_idx (B, L)``): attention is block-diagonal causal (never across a document start) and
RoPE positions restart at 0 at each document start.

State (the KV cache): ``k, v (B, S, H_kv, hd)`` hold rotated keys and values, ``doc_start (B,)`` the absolute
position where the row's current document began. ``S = max_seqlen`` for full attention (overflow raises);
with a window ``S = min(W, max_seqlen)`` and, when S = W, the cache is a ring buffer (position p in slot
p mod W), so generation may run past ``max_seqlen``. As with the SSM states, a cache feeds only the first
document of a packed chunk. Decode writes the new key first and attends over all S slots with a mask (slots
not yet written are masked): the shapes stay fixed from step to step, so kernels that plan per shape (cuDNN
attention on Hopper spends ~35 ms per new key length) plan once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.mixers.base import MixerState, check_mixer_input, project
from seqlab.mixers.rope import RotaryEmbedding

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def document_positions(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``seq_idx (B, L)`` -> (``doc (B, L)`` document number counted from 0 in each row, ``pos (B, L)`` position
    inside the document)."""
    L = seq_idx.shape[1]
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    doc = starts.long().cumsum(dim=1)
    t = torch.arange(L, device=seq_idx.device).expand_as(doc)
    last_start = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, L)
    return doc, t - last_start


class Attention(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``; Llama-style projections without bias."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        window: int | None = None,
        head_dim: int | None = None,
        rope_fraction: float = 1.0,
        out_bias: bool = False,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ConfigError(f"Attention: n_kv_heads must divide n_heads, got {n_heads=} {n_kv_heads=}")
        if head_dim is None:
            if d_model % n_heads:
                raise ConfigError(f"Attention: n_heads must divide d_model, got {d_model=} {n_heads=}")
            head_dim = d_model // n_heads
        if window is not None and window < 1:
            raise ConfigError(f"Attention: attn_window must be None or >= 1, got {window}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.window = window
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)  # bias: RecurrentGemma
        if not 0.0 <= rope_fraction <= 1.0:
            raise ConfigError(f"Attention: rope_fraction must be in [0, 1], got {rope_fraction}")
        # rotated channels per head, as GPT-NeoX / transformers count them: int(head_dim * fraction)
        self.rope = RotaryEmbedding(head_dim, rope_theta, rotary_dim=int(head_dim * rope_fraction))

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> Attention:
        return cls(
            config.d_model,
            config.n_heads,
            n_kv_heads=getattr(config, "n_kv_heads", None),
            rope_theta=getattr(config, "rope_theta", 10000.0),
            window=getattr(config, "attn_window", None),
            rope_fraction=getattr(config, "rope_fraction", 1.0),
            out_bias=getattr(config, "attn_out_bias", False),
        )

    # ----------------------------------------------------------------------------------------------- state

    def _cache_len(self, max_seqlen: int) -> int:
        return max_seqlen if self.window is None else min(self.window, max_seqlen)

    def allocate_state(self, batch: int, max_seqlen: int, device=None, dtype=None) -> MixerState:
        if max_seqlen < 1:
            raise InputError("max_seqlen", "an integer >= 1", max_seqlen)
        device = self.q_proj.weight.device if device is None else device
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        shape = (batch, self._cache_len(max_seqlen), self.n_kv_heads, self.head_dim)
        return MixerState(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            doc_start=torch.zeros(batch, device=device, dtype=torch.long),
        )

    def state_bytes(self, batch: int, seqlen: int, dtype: torch.dtype = torch.float32) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        kv = 2 * batch * self._cache_len(seqlen) * self.n_kv_heads * self.head_dim * element
        return kv + batch * 8  # + doc_start (int64)

    # --------------------------------------------------------------------------------------------- forward

    adds_residual = True  # Block passes its residual stream in (added inside the decode step's o_proj GEMM)

    def forward(
        self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model); ``residual`` (B, L, d_model), if given, is added to the output."""
        check_mixer_input(x, self.d_model, seq_idx)
        Bsz, L, _ = x.shape
        decode = state is not None and L == 1
        q = project(self.q_proj, x, few_rows=decode).view(Bsz, L, self.n_heads, self.head_dim)  # (B, L, H, hd)
        k = project(self.k_proj, x, few_rows=decode).view(Bsz, L, self.n_kv_heads, self.head_dim)  # (B, L, H_kv, hd)
        v = project(self.v_proj, x, few_rows=decode).view(Bsz, L, self.n_kv_heads, self.head_dim)

        if state is None:
            y = self._attend_fresh(q, k, v, seq_idx)
        else:
            y = self._attend_cached(q, k, v, state, seq_idx)
        return project(self.o_proj, y.reshape(Bsz, L, self.n_heads * self.head_dim), residual, few_rows=decode)

    def _sdpa(self, q, k, v, mask=None, is_causal=False) -> torch.Tensor:
        """q (B, L, H, hd), k/v (B, T, H_kv, hd), mask (B or 1, 1, L, T) bool -> (B, L, H, hd)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L|T, hd)
        kwargs = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                repeat = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kwargs)
        return y.transpose(1, 2)

    def _attend_fresh(self, q, k, v, seq_idx) -> torch.Tensor:
        """No cache: causal attention within the chunk (training and one-shot prefill)."""
        L = q.shape[1]
        t = torch.arange(L, device=q.device)
        windowed = self.window is not None and self.window < L
        if seq_idx is None:
            pos = t  # (L,)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if not windowed:
                return self._sdpa(q, k, v, is_causal=True)
            return self._attend_windowed(q, k, v, None)
        doc, pos = document_positions(seq_idx)  # (B, L) each
        q, k = self.rope(q, pos), self.rope(k, pos)
        if windowed:
            return self._attend_windowed(q, k, v, doc)
        mask = self._position_mask(t, t)[None] & (doc[:, :, None] == doc[:, None, :])  # (B, L, L)
        return self._sdpa(q, k, v, mask.unsqueeze(1))

    def _attend_windowed(self, q, k, v, doc) -> torch.Tensor:
        """Sliding-window attention in O(L·W) memory: queries in blocks of Q = max(W, 16) positions, each block
        against the W - 1 keys before it and its own Q keys (an (L, L) mask would need L² entries: 512 GiB of
        scores at L = 65536). q (B, L, H, hd), k/v (B, L, H_kv, hd), doc (B, L) or None -> (B, L, H, hd)."""
        Bsz, L, H, hd = q.shape
        W = self.window
        Q = max(W, 16)
        nb = -(-L // Q)
        pad_end = nb * Q - L

        def keys(t):  # (B, L, h, hd) -> (B * nb, Q + W - 1, h, hd): block b's keys are positions b*Q-W+1 .. b*Q+Q-1
            t = F.pad(t, (0, 0, 0, 0, W - 1, pad_end))
            return t.unfold(1, Q + W - 1, Q).permute(0, 1, 4, 2, 3).reshape(Bsz * nb, Q + W - 1, t.shape[2], hd)

        qb = F.pad(q, (0, 0, 0, 0, 0, pad_end)).reshape(Bsz * nb, Q, H, hd)
        i = torch.arange(Q, device=q.device)
        j = torch.arange(Q + W - 1, device=q.device)
        delta = i[:, None] + (W - 1) - j[None, :]  # query position minus key position
        block_start = torch.arange(nb, device=q.device) * Q
        key_pos = block_start[:, None] + j[None, :] - (W - 1)  # (nb, Q + W - 1)
        mask = ((delta >= 0) & (delta < W))[None] & (key_pos >= 0)[:, None, :]  # (nb, Q, Q + W - 1)
        mask = mask[None].expand(Bsz, nb, Q, Q + W - 1)
        if doc is not None:
            doc_pad = F.pad(doc, (W - 1, pad_end), value=-1)  # (B, W - 1 + nb * Q)
            doc_q = doc_pad[:, W - 1:].reshape(Bsz, nb, Q)
            doc_k = doc_pad.unfold(1, Q + W - 1, Q)  # (B, nb, Q + W - 1)
            mask = mask & (doc_q[..., :, None] == doc_k[..., None, :])
        y = self._sdpa(qb, keys(k), keys(v), mask.reshape(Bsz * nb, 1, Q, Q + W - 1))  # (B * nb, Q, H, hd)
        return y.reshape(Bsz, nb * Q, H, hd)[:, :L]

    def _position_mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """(L, T) bool: key at ``kpos`` is visible from query at ``qpos`` (causal, within the window)."""
        delta = qpos[:, None] - kpos[None, :]
        mask = delta >= 0
        if self.window is not None:
            mask = mask & (delta < self.window)
        return mask

    def _decode_fixed(self, q, k, v, state: MixerState, position: torch.Tensor) -> torch.Tensor:
        """One-token decode that reads the position from the device tensor ``position (1,)`` int64 (set by the
        caller to ``state.offset``) instead of from Python: every shape and kernel argument is the same at each
        step, so the step can be recorded once as a CUDA graph and replayed (``seqlab.generation.DecodeGraph``).
        Same result as the eager one-token step: write the key into its slot, attend over all S slots, masked."""
        k_cache, v_cache, doc_start = state["k"], state["v"], state["doc_start"]
        S = k_cache.shape[1]
        pos = (position - doc_start)[:, None]  # (B, 1) RoPE positions inside the current document
        q, k = self.rope(q, pos), self.rope(k, pos)
        slot = torch.remainder(position, S)  # (1,) linear cache: the position itself; ring: position mod S
        k_cache.index_copy_(1, slot, k.detach().to(k_cache.dtype))
        v_cache.index_copy_(1, slot, v.detach().to(v_cache.dtype))
        kpos = position - torch.remainder(position - torch.arange(S, device=q.device), S)  # (S,) position per slot
        # (B, S): written and in the current document; S <= window, so every slot is inside the window
        mask = (kpos >= 0) & (kpos[None, :] >= doc_start[:, None])
        y = self._sdpa(q.to(k_cache.dtype), k_cache, v_cache, mask[:, None, None, :]).to(v.dtype)
        state.offset += 1
        return y

    def _attend_cached(self, q, k, v, state: MixerState, seq_idx) -> torch.Tensor:
        """Attend over the cached past plus this chunk; the chunk is appended to the cache."""
        Bsz, L = q.shape[:2]
        k_cache, v_cache, doc_start = state["k"], state["v"], state["doc_start"]
        S = k_cache.shape[1]
        offset = state.offset
        ring = self.window is not None and S >= self.window
        if not ring and offset + L > S:
            raise InputError(
                "x", f"at most {S - offset} more positions (KV cache allocated for max_seqlen={S})", f"{L} positions"
            )
        position = getattr(state, "device_offset", None)
        if position is not None and L == 1 and seq_idx is None:
            return self._decode_fixed(q, k, v, state, position)
        device = q.device
        t = torch.arange(L, device=device)
        qpos = offset + t  # (L,) absolute positions

        # documents: the chunk's first document (number 0) continues the cached one
        if seq_idx is None:
            doc = torch.zeros(Bsz, L, dtype=torch.long, device=device)
            pos_in_doc = t.expand(Bsz, L)
        else:
            doc, pos_in_doc = document_positions(seq_idx)
        pos = torch.where(doc == 0, pos_in_doc + (offset - doc_start)[:, None], pos_in_doc)  # (B, L) RoPE positions
        q, k = self.rope(q, pos), self.rope(k, pos)

        if not ring or L == 1:
            # write first, then attend over the whole cache: the key length stays S on every call, so attention
            # kernels that plan per shape (cuDNN) plan once. Positions not yet written are masked out.
            slots = torch.remainder(qpos, S) if ring else slice(offset, offset + L)
            k_cache[:, slots] = k.detach().to(k_cache.dtype)
            v_cache[:, slots] = v.detach().to(v_cache.dtype)
            end = offset + L
            kpos = end - 1 - torch.remainder(end - 1 - torch.arange(S, device=device), S)  # (S,) position per slot
            kdoc = torch.where(kpos[None, :] >= doc_start[:, None], 0, -1)  # (B, S)
            if seq_idx is not None:
                kdoc[:, slots] = doc
            mask = self._position_mask(qpos, kpos) & (kpos >= 0)  # (L, S); kpos < 0: never written
            mask = mask[None] & (doc[:, :, None] == kdoc[:, None, :])  # (B, L, S)
            y = self._sdpa(q.to(k_cache.dtype), k_cache, v_cache, mask.unsqueeze(1)).to(v.dtype)
        else:
            # a ring chunk longer than one position would overwrite keys its own first queries need: gather the
            # cached past, attend over [past, chunk], then keep the chunk's last S positions
            if offset <= S:  # slots 0..offset-1 hold positions 0..offset-1
                past_slots = torch.arange(offset, device=device)
                kpos_past = past_slots
            else:  # slot s holds the latest position p < offset with p = s (mod S)
                past_slots = torch.arange(S, device=device)
                kpos_past = offset - 1 - torch.remainder(offset - 1 - past_slots, S)
            doc_past = torch.where(kpos_past[None, :] >= doc_start[:, None], 0, -1)  # (B, P)
            kpos = torch.cat([kpos_past, qpos])  # (P + L,)
            kdoc = torch.cat([doc_past, doc], dim=1)  # (B, P + L)
            mask = self._position_mask(qpos, kpos)[None] & (doc[:, :, None] == kdoc[:, None, :])  # (B, L, P + L)
            k_all = torch.cat([k_cache[:, past_slots].to(k.dtype), k], dim=1)  # (B, P + L, H_kv, hd)
            v_all = torch.cat([v_cache[:, past_slots].to(v.dtype), v], dim=1)
            y = self._sdpa(q, k_all, v_all, mask.unsqueeze(1))
            n = min(L, S)
            slots = torch.remainder(qpos[L - n :], S)
            k_cache[:, slots] = k[:, L - n :].detach().to(k_cache.dtype)
            v_cache[:, slots] = v[:, L - n :].detach().to(v_cache.dtype)

        if seq_idx is not None:
            last_doc = doc[:, -1:]
            first_of_last = (doc == last_doc).long().argmax(dim=1)  # (B,) chunk index where the last document starts
            doc_start.copy_(torch.where(last_doc[:, 0] > 0, offset + first_of_last, doc_start))
        state.offset = offset + L
        return y
