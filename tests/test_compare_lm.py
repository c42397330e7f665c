"""FLOPs per token against hand counts and their growth in L; compare-lm end to end on a tiny corpus."""

from __future__ import annotations

import json

import pytest

from seqlab.arena.compare_lm import CompareConfig, compare_lm
from seqlab.bench.flops import model_flops, selective_scan_flops, ssd_flops
from seqlab.errors import ConfigError
from seqlab.models.presets import from_preset


def test_transformer_flops_match_a_hand_count():
    # tiny transformer: d 32, 2 layers, 2 heads of 16, SwiGLU d_ff 128 (8/3 * 32 rounded up to 64), vocab 259 -> 264
    model = from_preset("transformer", "tiny")
    d, layers, d_ff, vocab = 32, 2, 128, 264
    n_matmul = layers * (4 * d * d + 3 * d * d_ff) + vocab * d  # q, k, v, o + gate, up, down + the output head
    for L in (64, 256):
        count = model_flops(model, L)
        assert count.matmul_params == n_matmul == 41216
        forward = 2 * n_matmul + layers * 4 * L * d  # 2N + per layer (q.k + weights.v) over L keys of width d
        assert count.forward == forward and count.training == 3 * forward
        assert count.scan == count.conv == 0


@pytest.mark.parametrize("preset", ["mamba", "mamba2"])
def test_ssm_flops_are_linear_in_length(preset):
    model = from_preset(preset, "tiny")  # chunk size 16 for mamba2
    per_token = [model_flops(model, L).training for L in (64, 256, 4096)]
    assert per_token[0] == per_token[1] == per_token[2]  # constant per token -> total linear in L
    count = model_flops(model, 256)
    assert count.attention == 0 and count.scan > 0 and count.conv > 0


def test_attention_flops_grow_quadratically_in_length():
    model = from_preset("transformer", "tiny")
    per_token = {L: model_flops(model, L).forward for L in (128, 256, 1024)}
    # per token = a + b L (total a L + b L^2) with b = layers * 4 * d_attn = 2 * 4 * 32
    assert per_token[256] - per_token[128] == 2 * 4 * 32 * 128
    assert per_token[1024] - per_token[256] == 2 * 4 * 32 * 768


def test_scan_terms_by_hand():
    assert selective_scan_flops(d_inner=64, d_state=8) == 7 * 64 * 8
    # Q = 16, N = 16, P = 16, H = 4, G = 1
    assert ssd_flops(256, nheads=4, headdim=16, d_state=16, ngroups=1, chunk_size=16) == (
        2 * 16 * 16 + 4 * (16 + 2 * 16 * 16 + 4 * 16 * 16 + 2 * 16 * 16 / 16)
    )


def test_moe_counts_only_the_active_experts():
    model = from_preset("jamba", "tiny")  # 4 experts, top-2
    count = model_flops(model, 128)
    n_linear = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear")
    expert = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if ".experts." in name and type(m).__name__ == "Linear")  # fmt: skip
    assert count.matmul_params == n_linear - expert // 2
    assert count.attention > 0 and count.scan > 0


def make_corpus(root, n_docs=10):
    root.mkdir()
    for i in range(n_docs):
        (root / f"d{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 2))
    return root


def test_compare_lm_end_to_end_writes_results_and_report(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    config = CompareConfig(models=["transformer", "mamba2"], sizes=["tiny"], tokens=384, data=str(corpus),
                           seqlen=32, batch_size=4, eval_tokens=256, device="cpu", out_dir=str(tmp_path / "out"),
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    results = compare_lm(config)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results["results"]))
    assert [(r["model"], r["size"]) for r in saved["results"]] == [("transformer", "tiny"), ("mamba2", "tiny")]
    for record in saved["results"]:
        assert record["tokens"] == 3 * 4 * 32 and record["steps"] == 3
        assert record["flops"] == pytest.approx(record["flops_per_token"] * record["tokens"])
        assert 0 < record["val_bpb"] < 20 and record["val_loss"] > 0 and record["wall_s"] > 0
        assert (tmp_path / "out" / "runs" / f"{record['model']}-tiny" / "checkpoint" / "model.safetensors").exists()
    for curve in saved["curves"]:
        assert [p["step"] for p in curve["points"]] == [1, 2, 3]
        assert all(p["flops"] > 0 and p["loss"] > 0 for p in curve["points"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "transformer" in page and "<table" in page


def test_compare_lm_command_prints_the_table(tmp_path, monkeypatch, capsys):
    from seqlab.cli import main

    monkeypatch.setenv("SEQLAB_CACHE", str(tmp_path / "cache"))
    corpus = make_corpus(tmp_path / "corpus")
    argv = ["compare-lm", "--models", "mamba", "--sizes", "tiny", "--tokens", "128", "--data", str(corpus),
            "--seqlen", "32", "--batch-size", "4", "--eval-tokens", "64", "--out", str(tmp_path / "out"),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mamba" in out and "results:" in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"models": ["gpt5"]}, "unknown preset"), ({"sizes": ["huge"]}, "has sizes"), ({"tokens": 0}, "--tokens"),
     ({"models": []}, "at least one"), ({"seqlen": 1}, "--seqlen")],
)  # fmt: skip
def test_compare_lm_rejects_bad_arguments(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CompareConfig(**{"models": ["mamba"], "sizes": ["tiny"], **overrides}).validate()


def test_compare_lm_names_a_missing_corpus(tmp_path, capsys):
    from seqlab.cli import main

    assert main(["compare-lm", "--models", "mamba", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
