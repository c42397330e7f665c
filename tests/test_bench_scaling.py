"""seqlab bench scaling: records per length, failures as results, slopes, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from seqlab.bench.scaling import ScalingPoint, loglog_slope, measure
from seqlab.cli import main
from seqlab.models.presets import from_preset


@pytest.mark.parametrize("mode", ["forward", "train", "decode"])
def test_measure_records_every_length(mode):
    torch.manual_seed(0)
    model = from_preset("mamba2", "tiny")
    points = measure(model, "mamba2", mode, [16, 32], time_limit=60, decode_steps=2)
    assert [p.length for p in points] == [16, 32]
    assert all(p.status == "ok" and p.seconds > 0 and p.tokens_per_s > 0 for p in points)
    assert points[0].state_bytes == model.state_bytes(1, 16)


def test_decode_measurement_leaves_the_context_length_unchanged():
    model = from_preset("transformer", "tiny")
    # the KV cache capacity is context + decode_steps + 2: repeats that did not rewind would overflow it
    points = measure(model, "transformer", "decode", [24], decode_steps=3)
    assert points[0].status == "ok"


def test_over_time_skips_longer_lengths():
    model = from_preset("mamba", "tiny")
    points = measure(model, "mamba", "forward", [8, 16, 32], time_limit=0.0)
    assert [p.status for p in points] == ["ok", "skipped: over time", "skipped: over time"]


def test_out_of_memory_is_a_result_not_a_crash(monkeypatch):
    model = from_preset("transformer", "tiny")
    real_forward = model.forward

    def forward(ids, *args, **kwargs):
        if ids.shape[1] >= 32:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 TiB")
        return real_forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    points = measure(model, "transformer", "forward", [16, 32, 64])
    assert [p.status for p in points] == ["ok", "oom", "skipped: over time"]


def test_other_errors_are_not_swallowed(monkeypatch):
    model = from_preset("transformer", "tiny")
    monkeypatch.setattr(model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure(model, "transformer", "forward", [16])


def test_loglog_slope_recovers_the_exponent():
    linear = [ScalingPoint("m", "forward", n, 1, "ok", seconds=3e-6 * n) for n in (256, 512, 1024, 4096)]
    quadratic = [ScalingPoint("m", "forward", n, 1, "ok", seconds=1e-9 * n * n) for n in (256, 512, 1024)]
    assert loglog_slope(linear) == pytest.approx(1.0)
    assert loglog_slope(quadratic) == pytest.approx(2.0)
    assert loglog_slope(linear[:1]) is None


def test_bench_scaling_command_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "scaling.json", tmp_path / "scaling.png"
    code = main(
        ["bench", "scaling", "--models", "mamba:tiny,transformer:tiny", "--lengths", "16,32", "--device", "cpu",
         "--json", str(out), "--plot", str(plot)]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert {r["model"] for r in data["records"]} == {"mamba:tiny", "transformer:tiny"}
    assert set(data["slopes"]) == {"mamba:tiny", "transformer:tiny"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fitted log-log slope" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lengths", "abc"], "--lengths"),
        (["--models", "nosuch"], "preset"),
        (["--batch", "0"], "--batch"),
    ],
)
def test_bench_scaling_bad_arguments_fail_fast(argv, needle, capsys):
    assert main(["bench", "scaling", "--device", "cpu", *argv]) == 2
    assert needle in capsys.readouterr().err
