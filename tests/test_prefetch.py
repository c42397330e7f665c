"""L2 prefetch of a decode step's weights: the byte ranges, the argument checks, which weights each schedule
prefetches where, and that no schedule changes a result (the prefetch is a hint; on the CPU it does nothing)."""

from __future__ import annotations

import pytest
import torch

from seqlab.errors import InputError
from seqlab.mixers import base as mixer_base
from seqlab.mixers import mamba as mamba_module
from seqlab.models.presets import from_preset
from seqlab.ops.prefetch import byte_range, prefetch_l2


@pytest.fixture
def schedule():
    """Sets DECODE_PREFETCH["schedule"] for a test and restores it."""
    saved = mixer_base.DECODE_PREFETCH["schedule"]

    def set_schedule(name: str) -> None:
        mixer_base.DECODE_PREFETCH["schedule"] = name

    yield set_schedule
    mixer_base.DECODE_PREFETCH["schedule"] = saved


def test_byte_range_covers_the_aligned_span_of_a_tensor_and_its_views():
    t = torch.zeros(64, 48, dtype=torch.bfloat16)
    start, size = byte_range(t)
    assert start == t.data_ptr() and size == t.numel() * 2  # allocations are 16-byte aligned
    rows = t[3:10]  # starts 3 * 96 bytes in: 288, a multiple of 16
    assert byte_range(rows) == (t.data_ptr() + 288, 7 * 96)
    col = t[:, 5]  # a strided view: its span runs from element 5 to the last row's element 5
    first, size = byte_range(col)
    lo, hi = t.data_ptr() + 10, t.data_ptr() + 63 * 96 + 12
    assert first == -(-lo // 16) * 16 and first + size == hi // 16 * 16
    assert first % 16 == 0 and size % 16 == 0
    assert byte_range(torch.zeros(3, dtype=torch.bfloat16))[1] == 0  # under the 16-byte granule
    assert byte_range(torch.zeros(0))[1] == 0


def test_prefetch_checks_its_arguments_and_does_nothing_on_the_cpu():
    w = torch.randn(8, 8)
    before = w.clone()
    prefetch_l2(w, None, w)
    assert torch.equal(w, before)
    with pytest.raises(InputError, match="at most 4 tensors"):
        prefetch_l2(w, w, w, w, w)
    with pytest.raises(InputError, match="torch.Tensor"):
        prefetch_l2(w, [1, 2])


def test_an_unknown_schedule_is_refused_by_name(schedule):
    schedule("sometimes")
    with pytest.raises(InputError, match="SEQLAB_DECODE_PREFETCH"):
        mixer_base.decode_prefetch_schedule()


def _model():
    torch.manual_seed(0)
    return from_preset("mamba", "tiny", initializer_range=0.2).eval()


def _decode_calls(model, monkeypatch) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Run a prefill and two decode steps; returns the tensors of every prefetch_l2 call and the last logits."""
    calls = []
    monkeypatch.setattr(mamba_module, "prefetch_l2", lambda *ts: calls.append(list(ts)))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    state = model.allocate_state(2, 16)
    with torch.no_grad():
        model(ids[:, :7], state=state)
        calls.clear()  # a prefill prefetches nothing
        model(ids[:, 7:8], state=state)
        logits = model(ids[:, 8:9], state=state)
    return calls, logits


@pytest.mark.parametrize("name", ["off", "own", "early", "split"])
def test_each_schedule_prefetches_its_weights_and_leaves_the_logits_alone(name, schedule, monkeypatch):
    model = _model()
    schedule("off")
    _, reference = _decode_calls(model, monkeypatch)
    schedule(name)
    calls, logits = _decode_calls(model, monkeypatch)
    assert torch.equal(logits, reference)
    layers = [b.mixer for b in model.layers]
    own = [[m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight] for m in layers]
    nxt = [[m.in_proj.weight] for m in layers[1:]] + [[]]
    expected = {
        "off": [],
        "own": own,
        "early": [o + n for o, n in zip(own, nxt)],
        "split": [c for o, n in zip(own, nxt) for c in (o, n)],
    }[name] * 2  # two decode steps
    assert len(calls) == len(expected)
    for got, want in zip(calls, expected):
        assert len(got) == len(want) and all(g is w for g, w in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["early", "split"])
def test_cuda_graph_decode_with_prefetch_equals_eager_decode_without(name, schedule):
    """On CUDA (the prefetch kernel itself on compute capability 9+): a graph-recorded decode step with a schedule
    gives the eager step's logits without one, bit for bit, on bf16 weights."""
    from seqlab.generation import DecodeGraph

    model = _model().to("cuda", torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 12), device="cuda")
    with torch.inference_mode():
        schedule("off")
        state = model.allocate_state(4, 32)
        model(ids, state=state)
        snapshot = [{k: t.clone() for k, t in s.tensors.items()} for s in state.layers]
        reference = model(ids[:, -1:], state=state)[:, -1]
        for s, saved in zip(state.layers, snapshot):
            for k, t in saved.items():
                s[k].copy_(t)
        schedule(name)
        prefetch_l2(*[p for p in model.parameters()][:4])  # the kernel on its own, outside a graph
        graph = DecodeGraph.record(model, state, ids[:, -1], vocab)
        assert graph is not None
        logits = graph.step(ids[:, -1])
    assert torch.equal(logits.float(), reference.float()[:, : logits.shape[-1]])


def test_the_ranges_and_the_eviction_hint_reach_the_kernel(monkeypatch):
    """Where the prefetch applies, each tensor's byte range and ``evict_last`` are what the kernel is given."""
    import seqlab.ops.prefetch as prefetch

    launches = []
    monkeypatch.setattr(prefetch, "_supported", lambda device: True)
    monkeypatch.setattr(prefetch, "triton_entry", lambda *entry: lambda ranges, **kw: launches.append((ranges, kw)))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    w, v = torch.zeros(64, 8), torch.zeros(32)
    prefetch_l2(w, None, v, evict_last=True)
    prefetch_l2(w)
    assert launches == [([byte_range(w), byte_range(v)], {"evict_last": True}),
                        ([byte_range(w)], {"evict_last": False})]
