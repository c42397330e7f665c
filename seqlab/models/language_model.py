"""LanguageModel: token embedding, a stack of pre-norm residual blocks given by ``config.pattern``, a head.

    h = embed(ids)                                   # (B, L, d)
    for layer i:  h = h + mixer_i(norm_i(h))         # mixer_i = MIXERS[pattern[i]]: A | S | M | M2
                  h = h + mlp_i(norm2_i(h))          # only when config.channel_mixer(i) is swiglu / moe
    logits = head(norm_f(h))                         # (B, L, V_padded) float32; head tied to embed by default

Zamba (``shared_attention_every = k > 0``): before every k-th layer one *shared* block reads the
concatenation z = [h, embed(ids)] (width 2d), runs attention + SwiGLU on it (pre-norm residual, width 2d)
and a linear owned by that application projects the result back: h = h + W_j block(z) (Glorioso et al.
2024, "Zamba", Sec. 3). The block's weights are reused; each application has its own KV cache.

Families are never special-cased here: layer i is ``MIXERS[token].from_config(config, i)``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from seqlab.errors import InputError
from seqlab.mixers import base as mixer_base
from seqlab.mixers.base import MixerState, recurrent_state_dtype
from seqlab.models.config import ModelConfig
from seqlab.models.state import InferenceState, config_fingerprint

# output projections that write into the residual stream (scaled at init, GPT-2 / Mamba)
_RESIDUAL_OUTPUTS = ("out_proj.weight", "o_proj.weight", "down_proj.weight", "shared_proj.weight")
# linears whose weights a mixer initialises itself (Mamba's dt_proj: U(-R^-1/2, R^-1/2), Sec. 3.6), kept as built
_MIXER_INITIALISED = ("dt_proj",)


def _mixers():
    from seqlab.mixers import MIXERS

    return MIXERS


def _channel_mixer(kind: str, config: ModelConfig, layer_idx: int) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "swiglu":
        from seqlab.mixers.mlp import SwiGLU

        return SwiGLU.from_config(config, layer_idx)
    from seqlab.mixers.moe import MoE

    return MoE.from_config(config, layer_idx)


def _norm(d: int, eps: float) -> nn.Module:
    from seqlab.mixers.norm import RMSNorm

    return RMSNorm(d, eps=eps)


def _fuses_norm(mixer: nn.Module) -> bool:
    return mixer_base.FUSE_DECODE and getattr(mixer, "fuses_norm", False)


def _plain(module: nn.Module) -> bool:
    """No hooks: the module may be folded into another op without anyone missing its call."""
    return not (module._forward_pre_hooks or module._forward_hooks)


def _state_dtype_kwarg(mixer: nn.Module, state_dtype: torch.dtype | None) -> dict:
    """``{"state_dtype": ..}`` for mixers that take one (see seqlab.mixers.base), else nothing."""
    takes = state_dtype is not None and getattr(mixer, "takes_state_dtype", False)
    return {"state_dtype": state_dtype} if takes else {}


class Block(nn.Module):
    """One layer: ``h + mixer(norm(h))`` then, if the layer has one, ``h + mlp(norm2(h))``."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.layer_kinds()[layer_idx]
        self.norm = _norm(config.d_model, config.norm_eps)
        self.mixer = _mixers()[self.kind].from_config(config, layer_idx)
        self.channel = config.channel_mixer(layer_idx)
        mlp = _channel_mixer(self.channel, config, layer_idx)
        self.norm2 = _norm(config.d_model, config.norm_eps) if mlp is not None else None
        self.mlp = mlp

    def forward(self, h: torch.Tensor, state: MixerState | None = None, seq_idx=None,
                prefetch: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """``prefetch``: in a decode step, the next layer's first weights, for a mixer that prefetches them
        (``takes_prefetch``; seqlab.mixers.base.DECODE_PREFETCH)."""
        if state is not None and h.shape[1] == 1 and _fuses_norm(self.mixer) and _plain(self.norm):
            # a decode step: the mixer applies the norm inside its input projection (one launch, no normed copy)
            extra = {"prefetch": prefetch} if prefetch and getattr(self.mixer, "takes_prefetch", False) else {}
            h = self.mixer(h, state=state, seq_idx=seq_idx, residual=h, norm=self.norm, **extra)
        elif getattr(self.mixer, "adds_residual", False):
            h = self.mixer(self.norm(h), state=state, seq_idx=seq_idx, residual=h)
        else:
            h = h + self.mixer(self.norm(h), state=state, seq_idx=seq_idx)
        if self.mlp is not None:
            if getattr(self.mlp, "adds_residual", False):
                h = self.mlp(self.norm2(h), residual=h)
            else:
                h = h + self.mlp(self.norm2(h))
        return h


class SharedBlock(nn.Module):
    """Zamba's shared attention + SwiGLU block on ``z = [h, x_emb]`` of width 2 d_model -> (B, L, 2 d_model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        wide = dataclasses.replace(
            config, d_model=2 * config.d_model, d_ff=None if config.d_ff is None else 2 * config.d_ff
        )
        self.norm1 = _norm(wide.d_model, config.norm_eps)
        self.attn = _mixers()["A"].from_config(wide, 0)
        self.norm2 = _norm(wide.d_model, config.norm_eps)
        self.mlp = _channel_mixer("swiglu", wide, 0)

    def forward(self, h, x_emb, state: MixerState | None = None, seq_idx=None) -> torch.Tensor:
        z = torch.cat([h, x_emb.to(h.dtype)], dim=-1)  # (B, L, 2d)
        z = z + self.attn(self.norm1(z), state=state, seq_idx=seq_idx)
        return z + self.mlp(self.norm2(z))


class LanguageModel(nn.Module):
    """``forward(input_ids (B, L) int64, state=None, seq_idx=None) -> logits (B, L, V_padded) float32``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, V = config.d_model, config.vocab_size_padded
        self.embedding = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        k = config.shared_attention_every
        # layer index -> index of the shared-block application that runs just before it
        self.shared_before = {i: j for j, i in enumerate(i for i in range(config.n_layers) if k and (i + 1) % k == 0)}
        if self.shared_before:
            self.shared_block = SharedBlock(config)
            self.shared_proj = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in self.shared_before)
        else:
            self.shared_block, self.shared_proj = None, None
        self.norm_f = _norm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.aux_loss = torch.zeros(())
        self._seq_dims: dict[tuple[int, int], dict[str, int]] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------ init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Published init: N(0, initializer_range) for linears and the embedding, zero biases; parameters a
        mixer initialised itself (marked ``_no_reinit``, e.g. dt_proj, A_log, conv) are left alone. With
        ``rescale_prenorm_residual`` the projections into the residual stream are divided by
        sqrt(branches per layer * n_layers) (GPT-2, Radford et al. 2019, Sec. 2.3; Mamba's init)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                own = name.rsplit(".", 1)[-1] in _MIXER_INITIALISED
                if not own and not getattr(module.weight, "_no_reinit", False):
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        if self.config.rescale_prenorm_residual:
            branches = 1 + any(block.mlp is not None for block in self.layers)
            scale = 1.0 / math.sqrt(branches * self.config.n_layers)
            for name, p in self.named_parameters():
                if name.endswith(_RESIDUAL_OUTPUTS) and not getattr(p, "_no_reinit", False):
                    p.mul_(scale)

    # --------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        state: InferenceState | None = None,
        seq_idx: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """``last_only``: logits of the last position only, ``(B, 1, V_padded)`` (a prefill before generation
        needs no more; the full ``(B, L, V)`` float32 logits of a long batch can outweigh the model)."""
        self._check_inputs(input_ids, state)
        x_emb = self.embedding(input_ids)  # (B, L, d)
        if self.config.embed_scale != 1.0:
            x_emb = x_emb * self.config.embed_scale  # Gemma: sqrt(d_model)
        h = x_emb
        prefetch = self._decode_prefetch(state is not None and input_ids.shape[1] == 1)
        for i, block in enumerate(self.layers):
            j = self.shared_before.get(i)
            if j is not None:
                shared_state = None if state is None else state.shared[j]
                h = h + self.shared_proj[j](self.shared_block(h, x_emb, state=shared_state, seq_idx=seq_idx))
            h = block(h, state=None if state is None else state.layers[i], seq_idx=seq_idx, prefetch=prefetch[i])
        if last_only:
            h = h[:, -1:]  # (B, 1, d)
        logits = self.lm_head(self.norm_f(h)).float()  # (B, L, V_padded)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap  # Gemma 2 / RecurrentGemma soft-capping
        if state is not None:
            state.offset += input_ids.shape[1]
        self.aux_loss = self._aux_loss(logits.device)
        return logits

    def _decode_prefetch(self, decoding: bool) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the weights the next layer's decode step reads first (its mixer's ``decode_first_weights``),
        when a decode step prefetches them (seqlab.mixers.base.DECODE_PREFETCH); empty tuples otherwise."""
        if not decoding or mixer_base.decode_prefetch_schedule() in ("off", "own"):
            return [()] * len(self.layers)
        return [getattr(b.mixer, "decode_first_weights", tuple)() for b in self.layers[1:]] + [()]

    def _aux_loss(self, device) -> torch.Tensor:
        losses = [b.mlp.aux_loss for b in self.layers if b.channel == "moe" and b.mlp.aux_loss is not None]
        if not losses:
            return torch.zeros((), device=device)
        return self.config.moe_aux_loss_weight * torch.stack([loss.float() for loss in losses]).sum()

    def _check_inputs(self, input_ids: torch.Tensor, state: InferenceState | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            given = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise InputError("input_ids", "a (B, L) tensor of token ids", given)
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise InputError("input_ids", "an integer tensor (int64)", input_ids.dtype)
        if input_ids.shape[1] == 0:
            raise InputError("input_ids", "at least one position", f"shape {tuple(input_ids.shape)}")
        if input_ids.device.type == "cpu" and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size_padded:
                raise InputError("input_ids", f"ids in [0, {self.config.vocab_size_padded})", f"ids in [{lo}, {hi}]")
        if state is not None:
            if not isinstance(state, InferenceState) or len(state.layers) != len(self.layers):
                raise InputError("state", "an InferenceState from this model's allocate_state", type(state).__name__)
            if state.batch != input_ids.shape[0]:
                raise InputError("state", f"a state for batch {input_ids.shape[0]}", f"batch {state.batch}")

    # ----------------------------------------------------------------------------------------------- state

    def allocate_state(self, batch: int, max_seqlen: int, device=None, dtype=None,
                       state_dtype: torch.dtype | None = None) -> InferenceState:
        """Preallocate every layer's state for ``batch`` rows and up to ``max_seqlen`` positions.

        ``dtype``: the KV caches' dtype (default: the model's); ``state_dtype``: the recurrent states of the mixers
        that take one (Mamba, Mamba-2; default float32; a 16-bit float halves their bytes, as the reference
        implementations keep them); other mixers keep their own."""
        if not isinstance(batch, int) or batch < 1:
            raise InputError("batch", "an integer >= 1", batch)
        if not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise InputError("max_seqlen", "an integer >= 1", max_seqlen)
        recurrent_state_dtype(state_dtype)
        device = self.embedding.weight.device if device is None else device
        layers, shared = self._allocate(batch, max_seqlen, device, dtype, state_dtype)
        return InferenceState(
            layers, shared, batch, max_seqlen, config_fingerprint(self.config), self._state_seq_dims(batch, max_seqlen)
        )

    def _allocate(self, batch, max_seqlen, device, dtype,
                  state_dtype=None) -> tuple[list[MixerState], list[MixerState]]:
        layers = [b.mixer.allocate_state(batch, max_seqlen, device=device, dtype=dtype,
                                         **_state_dtype_kwarg(b.mixer, state_dtype)) for b in self.layers]
        shared = [
            self.shared_block.attn.allocate_state(batch, max_seqlen, device=device, dtype=dtype)
            for _ in self.shared_before
        ]
        return layers, shared

    def _state_seq_dims(self, batch: int, max_seqlen: int) -> dict[str, int]:
        """Tensor key -> the dim that grows with capacity, found by allocating (shape-only) at two capacities."""
        cache_key = (batch, max_seqlen)
        if cache_key not in self._seq_dims:
            shapes = []
            for m in (max_seqlen, max_seqlen + 1):
                layers, shared = self._allocate(batch, m, "meta", None)
                probe = InferenceState(layers, shared, batch, m, "")
                shapes.append({k: tuple(t.shape) for k, t in probe.named_tensors().items()})
            dims = {}
            for key, a in shapes[0].items():
                b = shapes[1][key]
                differing = [d for d in range(len(a)) if a[d] != b[d]]
                if len(differing) == 1:
                    dims[key] = differing[0]
            self._seq_dims = {cache_key: dims}
        return self._seq_dims[cache_key]

    def state_bytes(self, batch: int, seqlen: int, dtype: torch.dtype = torch.float32,
                    state_dtype: torch.dtype | None = None) -> int:
        """Analytic bytes of ``allocate_state(batch, seqlen)``: the sum of the mixers' own accounts."""
        total = sum(b.mixer.state_bytes(batch, seqlen, dtype, **_state_dtype_kwarg(b.mixer, state_dtype))
                    for b in self.layers)
        if self.shared_before:
            total += len(self.shared_before) * self.shared_block.attn.state_bytes(batch, seqlen, dtype)
        return total

    # ---------------------------------------------------------------------------------------------- counts

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied head counts once); ``exclude_embeddings`` drops the embedding and head."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` atomically."""
        from seqlab.models.checkpoint import save_model

        return save_model(self, directory, metadata=metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
        """A model rebuilt from ``directory`` (written by ``save``), weights restored exactly."""
        from seqlab.models.checkpoint import load_model

        return load_model(directory, device=device)

    @classmethod
    def from_hf(cls, directory: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
        """A model read from a local Hugging Face checkpoint directory (see ``seqlab.interop.from_hf``)."""
        from seqlab.interop import from_hf

        return from_hf(directory, device=device)

    def to_hf(self, directory: str | Path, arch: str | None = None) -> Path:
        """Write this model as a Hugging Face checkpoint (see ``seqlab.interop.to_hf``)."""
        from seqlab.interop import to_hf

        return to_hf(self, directory, arch=arch)

    def extra_repr(self) -> str:
        c = self.config
        pattern = "".join(c.layer_kinds())
        return f"preset={c.preset!r}, pattern={pattern!r}, d_model={c.d_model}, params={self.num_params():,}"
