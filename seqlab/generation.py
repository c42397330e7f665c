"""Autoregressive generation with a preallocated inference state.

The prompt is prefilled in one call; each new token is then one decode step that reuses the state, so an
SSM model decodes in constant memory and constant time per token, and a Transformer appends to its KV cache.

Sampling: logits / temperature, then top-k, then top-p (nucleus: the smallest set of tokens whose probability
reaches p; Holtzman et al. 2020), then a draw from a seeded ``torch.Generator``. ``temperature=0`` is greedy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from seqlab.errors import InputError


def generate(
    model,
    input_ids,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_token: Callable[[int, torch.Tensor], object] | None = None,
    eos_id: int | None = None,
    state=None,
    cuda_graph: bool | None = None,
    state_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` by up to ``max_new_tokens`` tokens; returns ``(B, L + new)`` int64 ids.

    input_ids       (B, L) or (L,) tensor, or a list (of lists) of ints; every row the same length (left-padding
                    of ragged batches is not supported: group prompts by length or generate them separately)
    temperature     0 -> greedy (deterministic); > 0 divides the logits before sampling
    top_k, top_p    keep the k most likely tokens / the nucleus of probability mass p
    seed            seeds the sampling generator (same seed, same model, same prompt -> same tokens)
    on_token        called as on_token(step, token_ids (B,)) after each new token (streaming)
    eos_id          stop when every row has produced it; rows that finished early are filled with eos_id
    state           an InferenceState to continue from (e.g. loaded from a file); ``input_ids`` are then the
                    tokens that follow it, and on return the state has consumed every returned token
    cuda_graph      replay the decode step as a CUDA graph (None = when possible: CUDA, batch rows of one
                    length, and a recorded step that matches an eager one; KV caches decode at fixed shapes)
    state_dtype     dtype of the recurrent states the call allocates (Mamba, Mamba-2): float32 (default) or
                    torch.bfloat16 / torch.float16, half the bytes per decode step, rounded once per token
    """
    ids = _as_batch(input_ids, model)
    _check_options(max_new_tokens, temperature, top_k, top_p, eos_id)
    Bsz, L = ids.shape
    vocab = model.config.vocab_size
    own_state = state is None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if own_state:
                state = model.allocate_state(Bsz, L + max(max_new_tokens, 1), state_dtype=state_dtype)
            else:
                _check_state(state, Bsz, L + max_new_tokens)
            generator = torch.Generator(device=ids.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))

            logits = model(ids, state=state, last_only=True)[:, -1, :vocab]  # prefill: (B, V)
            step_fn = lambda token: model(token[:, None], state=state)[:, -1, :vocab]  # noqa: E731
            if max_new_tokens > 2 and cuda_graph is not False and ids.device.type == "cuda":
                graph = DecodeGraph.record(model, state, logits.argmax(-1), vocab, verify=True)
                if graph is not None:
                    step_fn = graph.step
                elif cuda_graph:
                    raise InputError("cuda_graph", "a model whose decode step can be recorded", "a step that differs")
            new_tokens: list[torch.Tensor] = []
            finished = torch.zeros(Bsz, dtype=torch.bool, device=ids.device)
            fed = True  # whether the last sampled token has been consumed by the state
            for step in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_id), token)
                new_tokens.append(token)
                fed = False
                if on_token is not None:
                    on_token(step, token)
                if eos_id is not None:
                    finished |= token == eos_id
                    if bool(finished.all()):
                        break
                if step + 1 < max_new_tokens:
                    logits = step_fn(token)
                    fed = True
            if not own_state and not fed:
                model(new_tokens[-1][:, None], state=state)
    finally:
        model.train(was_training)
    if not new_tokens:
        return ids.clone()
    return torch.cat([ids, torch.stack(new_tokens, dim=1)], dim=1)


class DecodeGraph:
    """One decode step recorded as a CUDA graph and replayed for every new token.

    A decode step launches a few kernels per layer, each too small to keep the GPU busy, so at batch 1 the
    Python and launch overhead dominates; replaying a recorded graph removes it. The recording is valid only
    when the step's kernels do not depend on Python-side values that change between steps. An SSM's in-place
    state update does not; a KV cache's write position would, so while recording every MixerState carries
    ``device_offset``, a device tensor that ``step`` sets to the position before each replay, and attention
    reads its position from it (fixed-shape decode over the whole preallocated cache). ``record(verify=True)``
    replays the graph once at a later position and keeps it only if it matches the eager step.
    """

    last_rejection: str | None = None  # why the latest ``record`` returned None (benchmarks report it)

    def __init__(self, graph, token: torch.Tensor, logits: torch.Tensor, state, position: torch.Tensor):
        self.graph, self.token, self.logits, self.state, self.position = graph, token, logits, state, position

    @classmethod
    def record(cls, model, state, token: torch.Tensor, vocab: int, verify: bool = True) -> DecodeGraph | None:
        """Record ``model(token (B, 1), state)``; the state is left as it was. None when it cannot be used."""
        if not hasattr(state, "named_states"):
            return None
        start = _snapshot(state)
        static_token = token[:, None].clone()  # (B, 1)
        position = torch.zeros(1, dtype=torch.long, device=token.device)  # the step's position, on the device
        try:
            side = _side_stream(token.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compile / autotune kernels outside the recording
                    position.fill_(state.offset)
                    with _device_offset(state, position):
                        model(static_token, state=state)
            torch.cuda.current_stream().wait_stream(side)
            _restore(state, start)
            graph = torch.cuda.CUDAGraph()
            position.fill_(state.offset)
            with _autocast_without_cache(), _device_offset(state, position), torch.cuda.graph(graph):
                static_logits = model(static_token, state=state)[:, -1, :vocab]
            _restore(state, start)
        except Exception as err:  # a kernel or op that cannot be recorded: decode eagerly
            _restore(state, start)
            cls.last_rejection = f"recording failed: {type(err).__name__}: {err}"[:200]
            return None
        recorded = cls(graph, static_token, static_logits, state, position)
        if verify and not recorded._matches_eager(model, token, vocab, start):
            _restore(state, start)
            cls.last_rejection = "the replay did not match an eager step"
            return None
        _restore(state, start)
        return recorded

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Consume ``token (B,)``; returns the next logits ``(B, V)`` (a view reused by the next step)."""
        self.token.copy_(token[:, None])
        self.position.fill_(self.state.offset)
        self.graph.replay()
        for _, mixer_state in self.state.named_states():
            mixer_state.offset += 1
        self.state.offset += 1
        return self.logits

    def _matches_eager(self, model, token: torch.Tensor, vocab: int, start) -> bool:
        """Two eager steps from ``start`` (a snapshot of the state), then two replays from ``start``: the second
        step of each, at a later position than the recording's, must agree (one snapshot held, not two)."""
        model(token[:, None], state=self.state)
        eager = model(token[:, None], state=self.state)[:, -1, :vocab].clone()
        _restore(self.state, start)
        self.step(token)
        replayed = self.step(token).clone()
        return bool(torch.allclose(eager, replayed, rtol=1e-3, atol=1e-3))


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One warm-up stream per device for every recording (each new stream would get its own cuBLAS workspace)."""
    index = torch.device(device).index
    key = torch.cuda.current_device() if index is None else index
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


@contextlib.contextmanager
def _device_offset(state, position: torch.Tensor):
    """Within the block every MixerState of ``state`` exposes ``device_offset = position`` (a (1,) int64 device
    tensor holding ``state.offset``): mixers whose step depends on the position (attention) read it from there."""
    states = [s for _, s in state.named_states()]
    for s in states:
        s.device_offset = position
    try:
        yield
    finally:
        for s in states:
            s.device_offset = None


# positions the recording and its check write before restoring: warm-up and capture at the offset, the check at
# offset and offset + 1
_WRITTEN_POSITIONS = 3


def _snapshot(state) -> tuple[dict[str, tuple[int | None, int, torch.Tensor]], list[int], int]:
    """Copies of what a few decode steps can change: fixed-size tensors whole; of a tensor sized by the capacity
    (a KV cache, ``state.seq_dims``) only the slots from the offset on, so recording a graph for a large cache
    does not double its memory."""
    tensors = {}
    seq_dims = getattr(state, "seq_dims", {})
    for key, t in state.named_tensors().items():
        dim = seq_dims.get(key)
        if dim is None:
            tensors[key] = (None, 0, t.clone())
        else:
            start = min(state.offset, t.shape[dim])
            tensors[key] = (dim, start, t.narrow(dim, start, min(_WRITTEN_POSITIONS, t.shape[dim] - start)).clone())
    return tensors, [s.offset for _, s in state.named_states()], state.offset


def _restore(state, snapshot) -> None:
    tensors, offsets, offset = snapshot
    for key, t in state.named_tensors().items():
        dim, start, saved = tensors[key]
        (t if dim is None else t.narrow(dim, start, saved.shape[dim])).copy_(saved)
    for (_, s), o in zip(state.named_states(), offsets):
        s.offset = o
    state.offset = offset


def _autocast_without_cache():
    """Autocast as the caller set it, but without its weight-cast cache (cached casts cannot be recorded)."""
    if not torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits (B, V)`` -> next token ids ``(B,)``."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach p (the top token always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_batch(input_ids, model) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    else:
        rows = list(input_ids)
        if rows and all(isinstance(r, (list, tuple)) for r in rows):
            lengths = sorted({len(r) for r in rows})
            if len(lengths) > 1:
                raise InputError(
                    "input_ids",
                    "prompts of one length (left-padding is not supported: group prompts by length or call "
                    "generate once per prompt)",
                    f"lengths {lengths}",
                )
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise InputError("input_ids", "a non-empty (B, L) or (L,) sequence of token ids", f"shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError("input_ids", "integer token ids", ids.dtype)
    return ids.to(device=device, dtype=torch.long)


def _check_options(max_new_tokens, temperature, top_k, top_p, eos_id) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError("max_new_tokens", "an integer >= 0", max_new_tokens)
    if temperature is None or not temperature >= 0:  # also rejects NaN
        raise InputError("temperature", "a number >= 0 (0 = greedy)", temperature)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError("top_k", "None or an integer >= 1", top_k)
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError("top_p", "None or a number in (0, 1]", top_p)
    if eos_id is not None and (not isinstance(eos_id, int) or eos_id < 0):
        raise InputError("eos_id", "None or a token id >= 0", eos_id)


def _check_state(state, batch: int, needed: int) -> None:
    if getattr(state, "batch", None) != batch:
        raise InputError("state", f"an InferenceState for batch {batch}", f"batch {getattr(state, 'batch', None)}")
    if state.grows_with_length and state.offset + needed > state.max_seqlen:
        raise InputError(
            "state",
            f"room for {needed} more positions (its KV caches hold max_seqlen={state.max_seqlen}, "
            f"{state.offset} used); reload it with InferenceState.load(path, model, max_seqlen=...)",
            f"room for {state.max_seqlen - state.offset}",
        )
