"""Specs of `seqlab bench generate` and the decode-step bandwidth floor (tiny presets on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab.bench import generate as G
from seqlab.bench.roofline import decode_step_bytes, floor_seconds, measure_bandwidth
from seqlab.cli import main
from seqlab.errors import ConfigError
from seqlab.models.presets import from_preset


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return from_preset(name, "tiny", **overrides).eval()


@pytest.mark.parametrize("name", ["transformer", "mamba", "mamba2"])
def test_generate_records_every_batch_size(name):
    results = G.bench_seqlab(tiny(name), name, [3, 1, 2], prompt_len=12, gen_len=5, device="cpu", bandwidth=1e10)
    assert [r.batch for r in results] == [1, 2, 3]
    for r in results:
        assert r.status == "ok" and r.impl == "seqlab" and (r.prompt_len, r.gen_len) == (12, 5)
        assert r.prefill_s > 0 and r.decode_s > 0
        assert r.floor_step_s == pytest.approx(r.step_bytes / 1e10)
        assert r.achieved == pytest.approx(r.floor_step_s / r.step_s)


def test_end_to_end_and_decode_only_rates_are_consistent():
    r = G.GenerateResult("m", "seqlab", batch=4, prompt_len=100, gen_len=11, status="ok", floor_step_s=0.001)
    r.finish(prefill_s=0.5, decode_s=2.0)
    assert r.total_s == 2.5
    assert r.e2e_tokens_per_s == pytest.approx(4 * 11 / 2.5)  # the prompt's time counts, all 11 tokens count
    assert r.decode_tokens_per_s == pytest.approx(4 * 10 / 2.0)  # 10 decode steps after the prefill's token
    assert r.step_s == pytest.approx(0.2)
    assert r.achieved == pytest.approx(0.001 / 0.2)
    # a measured run obeys the same identities
    (m,) = G.bench_seqlab(tiny("mamba2"), "mamba2", [2], prompt_len=8, gen_len=6, device="cpu")
    assert m.total_s == pytest.approx(m.prefill_s + m.decode_s)
    assert m.e2e_tokens_per_s == pytest.approx(2 * 6 / m.total_s)
    assert m.decode_tokens_per_s == pytest.approx(2 * 5 / m.decode_s)
    assert m.e2e_tokens_per_s < 2 * 6 / m.decode_s  # the prompt's prefill makes end-to-end slower


def test_single_new_token_has_no_decode_rate():
    (r,) = G.bench_seqlab(tiny("mamba"), "mamba", [1], prompt_len=8, gen_len=1, device="cpu")
    assert r.status == "ok" and r.decode_s == pytest.approx(0, abs=1e-3)
    assert r.decode_tokens_per_s is None and r.e2e_tokens_per_s == pytest.approx(1 / r.total_s)


def test_out_of_memory_becomes_a_result(monkeypatch):
    real = G.time_seqlab

    def fake(model, batch, *args, **kwargs):
        if batch >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(G, "time_seqlab", fake)
    seen = []
    results = G.bench_seqlab(tiny("transformer"), "t", [1, 2, 4, 8], 8, 3, "cpu", on_result=seen.append)
    assert [r.status for r in results] == ["ok", "ok", "oom", "skipped: oom at batch 4"]
    assert seen == results
    assert results[2].e2e_tokens_per_s is None and results[2].step_bytes > results[1].step_bytes


def test_other_errors_are_not_swallowed(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(G, "time_seqlab", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        G.bench_seqlab(tiny("mamba"), "m", [1], 8, 3, "cpu")


def test_over_time_skips_larger_batches():
    results = G.bench_seqlab(tiny("mamba2"), "m", [1, 2], 8, 3, "cpu", time_limit=0.0)
    assert results[0].status == "ok" and results[1].status.startswith("skipped: batch 1 took over")


def test_step_bytes_match_a_hand_count_transformer():
    model = tiny("transformer")
    c = model.config
    d, V, layers, hd = c.d_model, c.vocab_size_padded, c.n_layers, c.d_model // c.n_heads
    d_ff = model.layers[0].mlp.d_ff
    per_layer = d + 4 * d * d + d + 3 * d * d_ff  # norm, q k v o, norm2, SwiGLU
    params = V * d + layers * per_layer + d  # tied embedding/head, final norm
    batch, context = 3, 37
    kv = layers * (2 * batch * context * c.n_heads * hd * 4 + batch * 8)  # K, V float32 + doc_start int64
    counts = decode_step_bytes(model, batch, context)
    assert counts == {"weights": params * 4, "state": kv, "total": params * 4 + kv}
    half = decode_step_bytes(model.to(torch.bfloat16), batch, context)
    assert half["weights"] == params * 2 and half["state"] == layers * (2 * batch * context * c.n_heads * hd * 2 + 24)


def test_step_bytes_match_a_hand_count_mamba2():
    model = tiny("mamba2")
    c, m = model.config, model.layers[0].mixer
    conv_dim = m.d_inner + 2 * m.ngroups * m.d_state
    per_row = conv_dim * (m.d_conv - 1) + m.nheads * m.headdim * m.d_state  # conv window + SSM state, float32
    for context in (10, 1000):  # constant in the context
        counts = decode_step_bytes(model, 2, context)
        assert counts["state"] == c.n_layers * 2 * per_row * 4
        assert counts["weights"] == 4 * sum(p.numel() for p in model.parameters())


def test_untied_head_reads_only_the_looked_up_embedding_rows():
    model = tiny("mamba", tie_embeddings=False)
    table = model.embedding.weight
    full = 4 * sum(p.numel() for p in model.parameters())
    assert decode_step_bytes(model, 3, 5)["weights"] == full - (table.shape[0] - 3) * table.shape[1] * 4


def test_bandwidth_and_floor():
    bandwidth = measure_bandwidth("cpu", nbytes=2**22, repeats=2)
    assert 1e8 < bandwidth < 1e13  # bytes/s: somewhere between a slow disk and an HBM stack
    assert floor_seconds(4_000_000, 2e9) == pytest.approx(2e-3)


@pytest.mark.parametrize(
    "text, expected",
    [("1,2,4", [1, 2, 4]), ("1,2,...,16", [1, 2, 4, 8, 16]), ("1,2,...,12", [1, 2, 4, 8, 12]), ("3", [3])],
)
def test_batch_lists(text, expected):
    assert G.parse_int_list(text, "--batch") == expected


@pytest.mark.parametrize("text", ["0", "1,x", "", "1,...,8", "4,2,...,1"])
def test_bad_batch_lists_name_the_argument(text):
    with pytest.raises(ConfigError, match="--batch"):
        G.parse_int_list(text, "--batch")


def test_transformers_counterpart_runs_the_exported_model():
    pytest.importorskip("transformers")
    results = G.bench_hf(tiny("transformer"), "t", [1, 2], 8, 4, "cpu", torch.float32, bandwidth=1e10)
    assert [(r.impl, r.batch, r.status) for r in results] == [("hf", 1, "ok"), ("hf", 2, "ok")]
    assert "static cache" in results[0].notes and results[0].e2e_tokens_per_s > 0


def test_cli_end_to_end_writes_json(tmp_path, capsys):
    out = tmp_path / "gen.json"
    code = main([
        "bench", "generate", "--models", "transformer:tiny,mamba2:tiny", "--batch", "1,2", "--prompt-len", "16",
        "--gen-len", "4", "--device", "cpu", "--vocab-size", "259", "--bandwidth-bytes", "4m", "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "e2e tok/s" in printed and "bandwidth" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["bandwidth_bytes_per_s"] > 0 and data["meta"]["prompt_len"] == 16
    rows = [(r["model"], r["batch"], r["status"]) for r in data["records"]]
    assert rows == [("transformer:tiny", 1, "ok"), ("transformer:tiny", 2, "ok"), ("mamba2:tiny", 1, "ok"),
                    ("mamba2:tiny", 2, "ok")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "--batch"),
        (["--models", "nope:tiny"], "preset"),
        (["--models", "mamba:huge"], "size"),
        (["--prompt-len", "abc"], "--prompt-len"),
        (["--gen-len", "0"], "--gen-len"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_arguments_fail_fast(argv, message, capsys):
    assert main(["bench", "generate", "--models", "mamba:tiny", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------- fixed-shape (graph-ready) attention decode


@pytest.mark.parametrize(
    "overrides, capacity",
    [({}, 40), ({"n_kv_heads": 1}, 40), ({"attn_window": 6}, 40), ({"attn_window": 64}, 40)],
    ids=["mha", "gqa", "ring-window", "window-wider-than-cache"],
)
def test_fixed_shape_attention_decode_equals_eager_decode(overrides, capacity):
    """The step a CUDA graph records (position read from a device tensor) equals the eager step, token by token,
    including after a packed prefill whose last document starts mid-row (RoPE restarts there)."""
    from seqlab.generation import _device_offset

    model = tiny("transformer", initializer_range=0.2, **overrides)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    seq_idx = torch.tensor([[0] * 9, [0] * 4 + [1] * 5])
    eager_state, fixed_state = model.allocate_state(2, capacity), model.allocate_state(2, capacity)
    position = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        model(ids, state=eager_state, seq_idx=seq_idx)
        model(ids, state=fixed_state, seq_idx=seq_idx)
        token = ids[:, -1:]
        for _ in range(20):
            eager = model(token, state=eager_state)
            position.fill_(fixed_state.offset)
            with _device_offset(fixed_state, position):
                fixed = model(token, state=fixed_state)
            torch.testing.assert_close(fixed, eager, rtol=1e-5, atol=1e-5)  # float32
            token = eager[:, -1, :256].argmax(-1, keepdim=True)
    assert fixed_state.offset == eager_state.offset == 29
    for key, t in eager_state.named_tensors().items():
        torch.testing.assert_close(fixed_state.named_tensors()[key], t, rtol=1e-6, atol=1e-6)
    assert all(getattr(s, "device_offset", None) is None for _, s in fixed_state.named_states())


@pytest.mark.parametrize("name", ["transformer", "mamba2"])
def test_last_only_logits_equal_the_last_row_of_the_full_logits(name):
    model = tiny(name)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids)
        state = model.allocate_state(2, 11)
        last = model(ids, state=state, last_only=True)
    assert last.shape == (2, 1, full.shape[-1]) and state.offset == 11
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, overrides", [("transformer", {}), ("transformer", {"attn_window": 4}), ("mamba2", {})])
def test_decode_graph_snapshot_restores_three_steps_without_copying_the_whole_cache(name, overrides):
    from seqlab.generation import _restore, _snapshot

    model = tiny(name, **overrides)
    state = model.allocate_state(2, 64)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids, state=state)
        before = {k: t.clone() for k, t in state.named_tensors().items()}
        saved = _snapshot(state)
        for _ in range(3):
            model(ids[:, -1:], state=state)
        _restore(state, saved)
    assert state.offset == 7 and all(s.offset == 7 for _, s in state.named_states())
    for key, t in state.named_tensors().items():
        assert torch.equal(t, before[key]), key
    copied = sum(entry[2].numel() for entry in saved[0].values())
    if state.grows_with_length:
        assert copied < sum(t.numel() for t in before.values()) / 10  # 3 of 64 cache slots
