"""Specification of seqlab.generate and the byte tokenizer: greedy decoding equals the argmax of repeated full
forwards; seeded sampling is reproducible; top-k=1 is greedy; batches equal single prompts; streaming callbacks
fire once per token; the tokenizer round-trips any text and streams multi-byte characters whole."""

from __future__ import annotations

import pytest
import torch

import seqlab
from seqlab.errors import InputError
from seqlab.generation import sample_next
from seqlab.models.presets import from_preset
from seqlab.tokenizer import ByteTokenizer


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return from_preset(name, "tiny", initializer_range=0.2, **overrides).eval()


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_full_forwards(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The obviously-right reference: re-run the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids)[:, -1, : model.config.vocab_size]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("preset", ["transformer", "mamba", "mamba2", "s4", "zamba"])
def test_greedy_equals_argmax_of_repeated_full_forwards(preset):
    model = tiny(preset)
    ids = prompt(2, 5, seed=1)
    out = seqlab.generate(model, ids, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 13) and out.dtype == torch.long
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(out, greedy_by_full_forwards(model, ids, 8))
    assert torch.equal(out, seqlab.generate(model, ids, max_new_tokens=8, temperature=0, seed=123))


def test_seeded_sampling_is_reproducible():
    model = tiny("mamba")
    ids = prompt(2, 4, seed=2)
    a = seqlab.generate(model, ids, 12, temperature=1.0, seed=7)
    b = seqlab.generate(model, ids, 12, temperature=1.0, seed=7)
    c = seqlab.generate(model, ids, 12, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny("transformer")
    ids = prompt(2, 4, seed=3)
    greedy = seqlab.generate(model, ids, 10, temperature=0)
    assert torch.equal(seqlab.generate(model, ids, 10, temperature=1.5, top_k=1, seed=0), greedy)
    assert torch.equal(seqlab.generate(model, ids, 10, temperature=1.5, top_p=1e-6, seed=0), greedy)


def test_batched_prompts_equal_single_prompts():
    model = tiny("zamba")
    ids = prompt(3, 6, seed=4)
    batched = seqlab.generate(model, ids, 7, temperature=0)
    for row in range(3):
        assert torch.equal(batched[row : row + 1], seqlab.generate(model, ids[row : row + 1], 7, temperature=0))


def test_on_token_is_called_once_per_step_with_the_new_ids():
    model = tiny("mamba2")
    ids = prompt(2, 3, seed=5)
    calls = []
    out = seqlab.generate(model, ids, 6, seed=1, on_token=lambda step, tok: calls.append((step, tok.clone())))
    assert [step for step, _ in calls] == list(range(6))
    assert all(tok.shape == (2,) for _, tok in calls)
    assert torch.equal(torch.stack([tok for _, tok in calls], dim=1), out[:, 3:])


def test_stops_when_every_row_has_produced_eos():
    model = tiny("mamba")
    ids = prompt(1, 4, seed=6)
    first = int(seqlab.generate(model, ids, 1, temperature=0)[0, -1])
    out = seqlab.generate(model, ids, 20, temperature=0, eos_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


def test_accepts_lists_and_rejects_ragged_batches():
    model = tiny("mamba")
    out = seqlab.generate(model, [1, 2, 3], 2, temperature=0)
    assert out.shape == (1, 5)
    with pytest.raises(InputError, match="left-padding"):
        seqlab.generate(model, [[1, 2, 3], [4, 5]], 2)
    with pytest.raises(InputError, match="temperature"):
        seqlab.generate(model, [1, 2], 2, temperature=-1)
    with pytest.raises(InputError, match="top_p"):
        seqlab.generate(model, [1, 2], 2, top_p=0)


def test_generation_restores_training_mode_and_needs_no_grad():
    model = tiny("mamba").train()
    seqlab.generate(model, [1, 2], 3)
    assert model.training


def test_sampling_filters_keep_only_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    top2 = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    # probabilities ~ [.64, .24, .09, ...]: p = 0.8 keeps the two most likely tokens (0.64 < 0.8 <= 0.88)
    nucleus = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(nucleus.tolist()) == {0, 1}
    full = sample_next(logits, 1.0, generator=g)
    assert set(full.tolist()) == {0, 1, 2, 3, 4}
    frequency = (full == 0).float().mean().item()
    assert abs(frequency - logits[0].softmax(-1)[0].item()) < 0.05


# ------------------------------------------------------------------------------------------------ tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂\n\t"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.encode("a", add_bos=True, add_eos=True) == [257, 97, 258]


def test_decode_ignores_specials_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([257, 104, 105, 258, 256]) == "hi"
    assert tok.decode(torch.tensor([104, 0xFF, 105])) == "h\ufffdi"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a truncated 3-byte character


def test_stream_decoder_holds_back_split_multibyte_characters():
    tok = ByteTokenizer()
    text = "aé日🙂b"
    pieces = []
    decoder = tok.stream_decoder()
    for i in tok.encode(text):
        pieces.append(decoder.push(i))
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[:3] == ["a", "", "é"]  # é is two bytes: nothing is printed after the first


# ------------------------------------------------------------------------------------------ CUDA graph decode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["mamba", "mamba2", "s4"])
def test_cuda_graph_decode_equals_eager_decode(preset):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = from_preset(preset, "tiny", initializer_range=0.2).eval()
    ids = torch.randint(0, 256, (3, 9), device="cuda")
    for temperature in (0.0, 1.0):
        eager = seqlab.generate(model, ids, 20, temperature=temperature, seed=1, cuda_graph=False)
        graphed = seqlab.generate(model, ids, 20, temperature=temperature, seed=1, cuda_graph=True)
        assert torch.equal(eager, graphed)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("overrides", [{}, {"attn_window": 4}], ids=["full", "ring-window"])
def test_kv_cache_decode_graph_equals_eager_decode(overrides):
    from seqlab.generation import DecodeGraph

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = from_preset("transformer", "tiny", initializer_range=0.2, **overrides).eval()
    ids = torch.randint(0, 256, (2, 5), device="cuda")
    state = model.allocate_state(2, 32)
    with torch.inference_mode():
        model(ids, state=state)
        assert DecodeGraph.record(model, state, ids[:, -1], 259) is not None  # fixed-shape decode records
    assert torch.equal(
        seqlab.generate(model, ids, 20, temperature=0, cuda_graph=True),
        seqlab.generate(model, ids, 20, temperature=0, cuda_graph=False),
    )
