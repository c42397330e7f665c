"""Specs of `seqlab bench long-context`: chunked prefill at constant memory (tiny presets on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab.bench import long_context as LC
from seqlab.cli import main
from seqlab.errors import ConfigError
from seqlab.models.presets import from_preset
from seqlab.tasks.passkey import QUESTION


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return from_preset(name, "tiny", **overrides).eval()


@pytest.mark.parametrize("name", ["mamba2", "mamba", "transformer"])
def test_chunked_prefill_matches_one_shot_logits(name):
    model = tiny(name)
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    points, logits, state = LC.chunked_prefill(model, name, 300, 64, "cpu", ids=ids)  # last chunk is short (44)
    with torch.inference_mode():
        expected = model(ids)[:, -1, : model.config.vocab_size]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)  # float32
    assert [p.tokens for p in points] == [64, 128, 256, 300] and state.offset == 300


@pytest.mark.parametrize("name", ["mamba2", "mamba"])
def test_ssm_state_size_is_constant_across_milestones(name):
    model = tiny(name)
    points, _, _ = LC.chunked_prefill(model, name, 2048, 128, "cpu")
    assert [p.tokens for p in points] == [128, 256, 512, 1024, 2048]
    assert {p.state_bytes for p in points} == {model.state_bytes(1, 1)}
    assert all(p.status == "ok" and p.seconds > 0 and p.tokens_per_s > 0 for p in points)
    assert [p.seconds for p in points] == sorted(p.seconds for p in points)  # elapsed time accumulates


def test_transformer_kv_cache_grows_with_length_in_one_shot_runs():
    model = tiny("transformer")
    points = LC.one_shot(model, "t", [64, 128, 256], "cpu")
    assert [p.state_bytes for p in points] == [model.state_bytes(1, n) for n in (64, 128, 256)]
    assert points[2].state_bytes > 3 * points[0].state_bytes


def test_one_shot_out_of_memory_becomes_a_result(monkeypatch):
    model = tiny("transformer")
    real = model.forward

    def forward(ids, *args, **kwargs):
        if ids.shape[1] >= 256:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 GiB")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    points = LC.one_shot(model, "t", [128, 256, 512], "cpu")
    assert [p.status for p in points] == ["ok", "oom", "skipped: oom at 256"]
    assert points[1].seconds is None and points[2].state_bytes == model.state_bytes(1, 512)


def test_time_limit_skips_the_remaining_milestones():
    points, _, _ = LC.chunked_prefill(tiny("mamba2"), "m", 512, 128, "cpu", time_limit=0.0)
    assert points[0].status == "ok" and all(p.status.startswith("skipped") for p in points[1:])


def test_milestones_double_up_to_the_context():
    assert LC.milestones(1024**2, 8192) == [8192 * 2**i for i in range(7)] + [1024**2]
    assert LC.milestones(1000, 300) == [300, 600, 1000]
    with pytest.raises(ConfigError, match="--chunk"):
        LC.milestones(100, 0)


@pytest.mark.parametrize("depth", [0.1, 0.9])
def test_passkey_prompt_hides_the_answer_at_the_depth(depth):
    prompt, answer = LC.passkey_inputs(1000, depth, answer_len=5)
    text = bytes(prompt[0, 1:].tolist()).decode()
    assert prompt.shape == (1, 1000) and text.endswith(QUESTION) and len(answer) == 5
    needle = text.index("The magic word is " + bytes(answer).decode())
    assert abs(needle / len(text) - depth) < 0.1


def test_passkey_run_decodes_the_answer_length():
    points, result = LC.passkey_run(tiny("mamba2"), "m", 600, 128, 0.5, "cpu")
    assert points[-1].tokens == 600 and len(result.decoded) == 5 and result.weights == "random"
    assert result.retrieved == (result.decoded == result.answer)


def test_passkey_needs_the_byte_vocabulary():
    with pytest.raises(ConfigError, match="byte vocabulary"):
        LC.passkey_run(tiny("mamba2", vocab_size=100), "m", 600, 128, 0.5, "cpu")


def test_cli_end_to_end_writes_json(tmp_path, capsys):
    out = tmp_path / "lc.json"
    code = main([
        "bench", "long-context", "--model", "mamba2:tiny", "--context", "2k", "--chunk", "512",
        "--passkey-depths", "0.1,0.9", "--compare", "transformer:tiny", "--device", "cpu", "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "passkey at depth 0.10" in printed
    data = json.loads(out.read_text())
    chunked = [p for p in data["points"] if p["method"] == "chunked"]
    one_shot = [p for p in data["points"] if p["method"] == "one-shot"]
    assert [p["tokens"] for p in chunked] == [512, 1024, 2048] * 2
    assert [p["depth"] for p in chunked] == [0.1] * 3 + [0.9] * 3
    assert [p["tokens"] for p in one_shot] == [512, 1024, 2048] and all(p["status"] == "ok" for p in one_shot)
    assert [p["depth"] for p in data["passkey"]] == [0.1, 0.9]


@pytest.mark.parametrize("run_dir", [False, True], ids=["checkpoint", "train-out"])
def test_cli_with_a_checkpoint(tmp_path, capsys, run_dir):
    """--checkpoint takes a checkpoint or a `seqlab train --out` run directory holding one, as eval does."""
    model = tiny("mamba")
    model.save(tmp_path / "run" / "checkpoint")
    given = tmp_path / "run" if run_dir else tmp_path / "run" / "checkpoint"
    assert main(["bench", "long-context", "--checkpoint", str(given), "--context", "300", "--chunk",
                 "128", "--passkey-depths", "0.5", "--device", "cpu"]) == 0
    assert "retrieved" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--chunk", "4k", "--context", "1k"], "--chunk"),
        (["--context", "1.5x"], "--context"),
        (["--passkey-depths", "0.5,1.5"], "--passkey-depths"),
        (["--passkey-depths", "half"], "--passkey-depths"),
        (["--passkey-depths", "0.5", "--context", "20", "--chunk", "10"], "passkey needs at least"),
        (["--model", "mamba2:giant"], "size"),
        (["--compare", "nope"], "preset"),
    ],
)
def test_bad_arguments_fail_fast(argv, message, capsys):
    base = ["bench", "long-context", "--model", "mamba2:tiny", "--context", "1k", "--chunk", "256", "--device", "cpu"]
    assert main([*base, *argv]) == 2
    assert message in capsys.readouterr().err
