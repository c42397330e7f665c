"""Concurrent branches of a decode step (seqlab.mixers.base.DECODE_BRANCHES): Mamba's in_proj split into its x and
z halves, z on a second CUDA stream. Off CUDA the setting changes nothing; on CUDA a recorded step with the branch
gives the eager step's logits without it (to bf16 rounding: two half GEMMs may round differently from one)."""

from __future__ import annotations

import pytest
import torch

from seqlab.mixers import base as mixer_base
from seqlab.models.presets import from_preset


def _model():
    torch.manual_seed(0)
    return from_preset("mamba", "tiny", initializer_range=0.2).eval()


def test_off_cuda_the_branch_is_not_taken_and_nothing_changes(monkeypatch):
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def decode():
        state = model.allocate_state(2, 16)
        with torch.no_grad():
            model(ids[:, :8], state=state)
            return model(ids[:, 8:], state=state)

    reference = decode()
    monkeypatch.setitem(mixer_base.DECODE_BRANCHES, "z", True)
    assert not model.layers[0].mixer._z_branch(ids.float())
    assert torch.equal(decode(), reference)


def test_the_side_stream_is_made_once_per_device(monkeypatch):
    made = []

    class FakeStream:
        def __init__(self, device):
            made.append(device)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(mixer_base, "_SIDE_STREAMS", {})
    first = mixer_base.side_stream(torch.device("cuda", 0))
    assert mixer_base.side_stream(torch.device("cuda", 0)) is first
    mixer_base.side_stream(torch.device("cuda", 1))
    assert made == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_with_the_z_branch_equals_eager_decode_without(monkeypatch):
    from seqlab.generation import DecodeGraph

    model = _model().to("cuda", torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 12), device="cuda")
    with torch.inference_mode():
        state = model.allocate_state(4, 32)
        model(ids, state=state)
        snapshot = [{k: t.clone() for k, t in s.tensors.items()} for s in state.layers]
        reference = model(ids[:, -1:], state=state)[:, -1, :vocab].float()
        for s, saved in zip(state.layers, snapshot):
            for k, t in saved.items():
                s[k].copy_(t)
        monkeypatch.setitem(mixer_base.DECODE_BRANCHES, "z", True)
        assert model.layers[0].mixer._z_branch(ids.float())
        eager = model(ids[:, -1:], state=state)[:, -1, :vocab].float()
        for s, saved in zip(state.layers, snapshot):
            for k, t in saved.items():
                s[k].copy_(t)
        graph = DecodeGraph.record(model, state, ids[:, -1], vocab)
        assert graph is not None, DecodeGraph.last_rejection
        logits = graph.step(ids[:, -1]).float()
    scale = reference.abs().max()
    assert (eager - reference).abs().max() <= 2e-2 * scale
    assert (logits - reference).abs().max() <= 2e-2 * scale
